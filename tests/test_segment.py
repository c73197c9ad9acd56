"""stage=segment: the BEiT pyramid and UPerNet, the relative position bias resized to the crop, layer decay, the
dataset-level mIoU with ignored pixels, slide and whole inference, and the stage end to end on synthetic and
ADE20K-layout data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY, compose, dense_lrs, run_stage
from fdlight.errors import FDLightError
from fdlight.models.pyramid import Backbone, BeitPyramid, default_indices
from fdlight.models.students import build_student, student_kwargs
from fdlight.models.upernet import UPerNet, resize_bilinear
from fdlight.models.exports import export_timm
from fdlight.modules.segment import SemanticSegmentation
from fdlight.optim import WarmupSchedule
from fdlight.bench.segment import bench
from fdlight.models.exports import load_segmenter
from fdlight.stages.dense import backbone_model
from fdlight.stages.segment import build_segmentation, segmentation_miou
from test_dense_data import write_ade20k

STEP = ["stage=segment", "segment.max_steps=1", "segment.epochs=1", "segment.batch_size=2", "segment.num_vis=2"]
FAST = [*STEP, "data.num_val=4"]


def beit(img_size=64, patch=16, depth=4, dim=32):
    return timm.create_model("beit_base_patch16_224", pretrained=False, img_size=img_size, patch_size=patch,
                             embed_dim=dim, depth=depth, num_heads=2, num_classes=0, use_abs_pos_emb=False,
                             use_rel_pos_bias=True)


def tiny_swin(img_size=64):
    return timm.create_model("swinv2_base_window8_256", pretrained=False, img_size=img_size, window_size=8,
                             embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], num_classes=0)


# --------------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("patch", [16, 8])
def test_beit_pyramid_gives_strides_4_to_32_with_the_vit_width(patch):
    backbone = Backbone(beit(img_size=128, patch=patch))
    maps = backbone(torch.randn(2, 3, 128, 128))
    assert [m.shape[-1] for m in maps] == [128 // patch] * 4
    neck = BeitPyramid(32, patch)
    out = neck(maps)
    assert neck.strides == [4, 8, 16, 32] and neck.channels == [32] * 4
    assert [tuple(o.shape) for o in out] == [(2, 32, 128 // s, 128 // s) for s in (4, 8, 16, 32)]


def test_vit_levels_come_from_distinct_blocks():
    assert default_indices(12) == [3, 5, 7, 11] and default_indices(24) == [7, 11, 15, 23]
    assert default_indices(2) == [0, 0, 1, 1] and default_indices(8) == [1, 3, 5, 7]
    vit = beit(depth=4)
    backbone = Backbone(vit, indices=[0, 1, 1, 3])
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert torch.equal(maps[1], maps[2]) and not torch.equal(maps[0], maps[1])
    assert isinstance(vit.fc_norm, torch.nn.Identity)  # pruned: no unused parameters in the optimizer
    with pytest.raises(FDLightError, match="must name 4 of the model's 4 blocks"):
        Backbone(beit(depth=4), indices=[0, 1, 2, 9])


def test_swin_stages_feed_upernet_directly():
    backbone = Backbone(tiny_swin())
    assert backbone.strides == [4, 8, 16, 32] and backbone.channels == [16, 32, 64, 128]
    model = UPerNet(backbone, num_classes=5, channels=16, aux_channels=8).train()
    logits, aux = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)


def test_upernet_on_a_vit_returns_stride_4_logits_and_rejects_other_sizes():
    model = UPerNet(Backbone(beit()), num_classes=7, channels=16, aux_channels=0).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7, 16, 16)
    with pytest.raises(FDLightError, match="takes 64x64 inputs"):
        model(torch.randn(1, 3, 96, 96))


def test_layer_ids_follow_the_official_rule():
    vit = Backbone(beit(depth=4))
    assert vit.num_layers == 6
    assert [vit.layer_id(n) for n in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                      "blocks.3.attn.relative_position_bias_table", "head.weight")] == [0, 0, 1, 4, 5]
    swin = Backbone(tiny_swin())  # depths 1-1-2-1: 7 layers
    assert swin.num_layers == 7
    assert [swin.layer_id(n) for n in ("patch_embed.proj.weight", "layers.0.blocks.0.mlp.fc1.weight",
                                       "layers.2.downsample.reduction.weight", "layers.2.blocks.1.attn.qkv.weight",
                                       "layers.3.blocks.0.norm1.weight")] == [0, 1, 2, 4, 5]


def test_layer_decay_really_scales_the_learning_rates():
    cfg = compose(["stage=segment", "segment.layer_decay=0.5", "segment.warmup_steps=0"])
    module, *_ = build_segmentation(cfg, cfg.segment, 10)
    lrs = dense_lrs(module)
    peak = cfg.segment.lr
    assert lrs["backbone.model.patch_embed.proj.weight"] == pytest.approx(peak * 0.5 ** 3)
    assert lrs["backbone.model.blocks.1.attn.qkv.weight"] == pytest.approx(peak * 0.5)
    assert lrs["head.fuse.0.weight"] == pytest.approx(peak)
    curve = WarmupSchedule(1.0, 0.0, 0.0, 2, 10, decay="poly")
    assert [round(curve.lr(s), 3) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]


# --------------------------------------------------------------------------------- relative position bias
def test_relative_position_bias_is_resized_to_the_crop_keeping_what_the_resize_keeps(tmp_path):
    """timm's Beit filter (BEiT's geometric-progression resampling) places the old offsets on a stretched grid and
    interpolates: the new table equals the old one at offsets -1..1 and at the farthest corners, keeps the 3 CLS
    entries, stays within the old range, and is untouched when the crop equals the distillation size."""
    cfg = compose(["stage=segment"])
    student = build_student(cfg.student)  # 32 px / 8: a 4x4 window, table 7x7 + 3
    table = student.rel_pos_bias.relative_position_bias_table
    with torch.no_grad():
        table.copy_(torch.randn_like(table))
    export_timm(student, tmp_path / "student.safetensors", cfg.student.model, student_kwargs(cfg.student))
    cfg.segment.pretrained = str(tmp_path / "student.safetensors")
    module, *_ = build_segmentation(cfg, cfg.segment, 10)  # crop 64: an 8x8 window, table 15x15 + 3
    old = table.detach()
    o = old[:-3].view(7, 7, -1)
    for block in module.model.backbone.model.blocks:
        new = block.attn.relative_position_bias_table.detach()
        assert block.attn.window_size == (8, 8) and new.shape == (15 * 15 + 3, 2)
        n = new[:-3].view(15, 15, -1)
        assert torch.allclose(n[6:9, 6:9], o[2:5, 2:5], rtol=0, atol=1e-6)   # offsets -1..1 in both axes
        for (ny, nx), (oy, ox) in {(0, 0): (0, 0), (0, 14): (0, 6), (14, 0): (6, 0), (14, 14): (6, 6)}.items():
            assert torch.allclose(n[ny, nx], o[oy, ox], atol=1e-5)        # the farthest offsets map to each other
        assert torch.equal(new[-3:], old[-3:])                            # CLS-to-token, token-to-CLS, CLS-to-CLS
        assert new.min() >= old.min() - 1e-5 and new.max() <= old.max() + 1e-5
        assert not torch.allclose(n[9, 7], o[5, 3])                       # offset 2 is interpolated, not copied
    same, *_ = backbone_model(cfg, cfg.segment, 32, "segment")
    assert all(torch.equal(b.attn.relative_position_bias_table, table) for b in same.blocks)


# -------------------------------------------------------------------------------------------------- metric
def test_miou_is_dataset_level_with_ignored_pixels_left_out():
    """Two batches through the module's metric vs a hand-computed confusion matrix over both."""
    model = UPerNet(Backbone(beit()), num_classes=3, channels=8, aux_channels=0)
    module = SemanticSegmentation(model, optim={})
    preds = [torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]]), torch.tensor([[1, 1, 1, 1], [0, 0, 2, 2]])]
    labels = [torch.tensor([[0, 1, 1, 255], [2, 2, 0, 255]]), torch.tensor([[1, 1, 255, 255], [0, 0, 2, 255]])]
    for p, t in zip(preds, labels):
        module.miou.update(p[None], t[None])
        module.acc.update(p[None], t[None])
    confusion = np.zeros((3, 3))                  # rows = truth, columns = prediction, scored pixels only
    for p, t in zip(preds, labels):
        for pi, ti in zip(p.flatten().tolist(), t.flatten().tolist()):
            if ti != 255:
                confusion[ti, pi] += 1
    assert confusion.tolist() == [[3, 0, 1], [1, 3, 0], [0, 0, 3]]  # 11 scored pixels of 16
    tp = np.diag(confusion)
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
    assert iou.tolist() == pytest.approx([3 / 5, 3 / 4, 3 / 4])
    assert float(module.miou.compute()) == pytest.approx(iou.mean())
    assert float(module.acc.compute()) == pytest.approx(tp.sum() / confusion.sum())
    per_image = []  # the mean of per-image mIoUs differs: the metric must not average images
    for p, t in zip(preds, labels):
        c = np.zeros((3, 3))
        for pi, ti in zip(p.flatten().tolist(), t.flatten().tolist()):
            if ti != 255:
                c[ti, pi] += 1
        d = np.diag(c)
        per_image.append(np.nanmean(d / (c.sum(0) + c.sum(1) - d)))
    assert np.mean(per_image) == pytest.approx(0.75) and iou.mean() == pytest.approx(0.7)


# ----------------------------------------------------------------------------------------------- inference
def test_slide_and_whole_inference_cover_any_image_size():
    model = UPerNet(Backbone(beit()), num_classes=4, channels=8, aux_channels=0).eval()
    slide = SemanticSegmentation(model, optim={}, eval_mode="slide")
    whole = SemanticSegmentation(model, optim={}, eval_mode="whole")
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(slide.predict_logits(x), whole.predict_logits(x), atol=1e-5)  # one window == whole
    for size in [(64, 150), (100, 70), (40, 50)]:
        logits = slide.predict_logits(torch.randn(1, 3, *size))
        assert logits.shape == (1, 4, *size) and torch.isfinite(logits).all()
        assert whole.predict_logits(torch.randn(1, 3, *size)).shape == (1, 4, *size)
    label_maps = slide.predict([torch.randn(3, 64, 96)], [(128, 192)])
    assert label_maps[0].shape == (128, 192) and label_maps[0].max() < 4


# ------------------------------------------------------------------------------------------------- the stage
def test_one_training_step_on_cpu_writes_model_metrics_and_picture(tmp_path):
    metrics = run_stage(FAST, tmp_path / "run")
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 1 and 0.0 <= saved["val/mIoU"] <= 1.0 and saved["num_classes"] == 10
    assert metrics["val/mIoU"] == saved["val/mIoU"]
    assert (run / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_segmenter(run / "model.safetensors")
    assert model.backbone.img_size == 64 and model.num_classes == 10
    x = torch.randn(1, 3, 64, 64)
    cfg = compose([*TINY, *FAST])
    again, *_ = build_segmentation(cfg, cfg.segment, 10)
    again.model.load_state_dict(model.state_dict())
    assert torch.equal(again.model.eval()(x), model(x))


def test_stage_runs_on_the_ade20k_layout_with_whole_image_evaluation(tmp_path):
    write_ade20k(tmp_path / "data")
    metrics = run_stage([*STEP, "data=ade20k", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                         "segment.eval_mode=whole", "segment.crop_size=32"], tmp_path / "run")
    assert metrics["num_classes"] == 150 and metrics["data"] == "ade20k" and 0 <= metrics["val/mIoU"] <= 1
    assert (metrics["data_root"], metrics["train_images"], metrics["val_images"]) == (str(tmp_path / "data"), 4, 2)


def test_batch_norm_with_one_image_per_device_is_refused_and_group_norm_runs(tmp_path):
    with pytest.raises(FDLightError, match="segment.batch_size=1 .* segment.norm=gn"):
        run_stage([*FAST, "segment.batch_size=1"], tmp_path / "bn")
    assert not (tmp_path / "bn" / "config.yaml").exists()  # refused before the run directory was used
    metrics = run_stage([*FAST, "segment.batch_size=1", "segment.norm=gn"], tmp_path / "gn")
    assert metrics["steps"] == 1


def test_pretrained_file_of_another_architecture_is_refused(tmp_path):
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(resnet.state_dict(), str(tmp_path / "resnet.safetensors"))
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    for i, name in enumerate(("resnet.safetensors", "resnet.pth")):  # no metadata: read as teacher=tiny's ViT
        with pytest.raises(FDLightError, match=r"resnet\.\w+ does not fit vit_tiny_patch16_224: missing keys"):
            run_stage([*FAST, f"segment.pretrained={tmp_path / name}"], tmp_path / str(i))
    run_stage(FAST, tmp_path / "seg")
    with pytest.raises(FDLightError, match="is a whole segment model, not a backbone"):
        run_stage([*FAST, f"segment.pretrained={tmp_path / 'seg' / 'model.safetensors'}"], tmp_path / "c")


def test_demo_entry_returns_the_miou_of_a_small_fine_tune(tmp_path):
    cfg = compose(TINY)  # the distillation config the demo runs under, without a segment block
    student = build_student(cfg.student)
    export_timm(student, tmp_path / "student.safetensors", cfg.student.model, student_kwargs(cfg.student))
    miou = segmentation_miou(cfg, tmp_path / "student.safetensors", tmp_path / "seg", max_steps=2, batch_size=2)
    assert 0.0 <= miou <= 1.0
    assert json.loads((tmp_path / "seg" / "metrics.json").read_text())["val/mIoU"] == miou


def test_gpu_check_exits_cleanly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check would run")
    assert bench() is None
    assert "no CUDA device" in capsys.readouterr().out


def test_bad_label_read_in_a_worker_process_still_gives_one_line(tmp_path):
    root = write_ade20k(tmp_path / "data", n_train=2)
    for name in ("ADE_train_00000000.png", "ADE_train_00000001.png"):
        path = root / "annotations" / "training" / name
        label = np.asarray(Image.open(path)).copy()
        label[0, 0] = 200
        Image.fromarray(label, mode="L").save(path)
    with pytest.raises(FDLightError) as err:
        run_stage([*STEP, "data=ade20k", f"data.root={tmp_path / 'data'}", "data.num_workers=1",
                   "segment.crop_size=32"], tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and message.startswith("label map ") and "holds class 200" in message


def test_matmul_resize_equals_bilinear_interpolation_both_ways():
    torch.manual_seed(0)
    cases = [((2, 3, 8, 8), (32, 32)), ((1, 2, 6, 6), (2, 2)), ((2, 4, 3, 9), (13, 50)), ((1, 1, 1, 1), (4, 4))]
    for shape, size in cases:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        ours, ref = resize_bilinear(x, size), F.interpolate(x, size, mode="bilinear", align_corners=False)
        assert torch.allclose(ours, ref, atol=1e-10)
        g = torch.randn_like(ref)
        assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-10)


SWIN = ["student=swinv2_b", "+student.kwargs.embed_dim=16", "+student.kwargs.depths=[1,1,2,1]",
        "+student.kwargs.num_heads=[1,2,2,4]"]


def test_swin_student_trains_through_the_stage_and_reloads(tmp_path):
    metrics = run_stage([*FAST, *SWIN], tmp_path / "run")
    assert metrics["steps"] == 1 and metrics["backbone"].startswith("swinv2")
    model = load_segmenter(tmp_path / "run" / "model.safetensors")
    assert not model.backbone.is_vit and model.strides == [4, 8, 16, 32]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10, 16, 16)


def test_the_cpu_thread_setting_lasts_only_for_the_run(tmp_path):
    before = torch.get_num_threads()
    run_stage([*FAST, "segment.num_threads=1"], tmp_path / "run")
    assert torch.get_num_threads() == before


def test_a_teachers_own_weights_fine_tune_as_the_baseline(tmp_path):
    """The paper's baseline: the teacher's weights file (no fdlight metadata), its architecture from teacher=tiny;
    a ViT with an absolute position embedding, resized to the crop by timm's filter."""
    from fdlight.models.teachers import build_teacher

    cfg = compose(TINY)
    teacher = build_teacher(cfg.teacher)
    torch.save(teacher.model.state_dict(), tmp_path / "teacher.pth")
    metrics = run_stage([*FAST, f"segment.pretrained={tmp_path / 'teacher.pth'}"], tmp_path / "run")
    assert metrics["backbone"] == "vit_tiny_patch16_224" and metrics["steps"] == 1
    model = load_segmenter(tmp_path / "run" / "model.safetensors")
    assert model.backbone.model.pos_embed.shape[1] == 1 + 8 * 8  # 32 px / 8 -> 64 px / 8


def test_compiled_training_forward_matches_eager_and_adds_no_state(tmp_path):
    cfg = compose([*TINY, *FAST, "trainer.compile=true"])
    module, *_ = build_segmentation(cfg, cfg.segment, 10)
    module.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(module.train_forward(x), module.model(x), atol=1e-4)
    assert module._compiled is not None
    assert not any("_orig_mod" in k for k in module.state_dict())
    metrics = run_stage([*FAST, "trainer.compile=true", "segment.max_steps=2"], tmp_path / "run")
    assert metrics["steps"] == 2 and np.isfinite(metrics["last_loss"])


def test_world_size_reads_devices_as_lightning_does(monkeypatch):
    """It decides SyncBatchNorm before the trainer exists: counts, id lists and nodes all count processes (nodes
    under a launcher that started them)."""
    from omegaconf import OmegaConf

    from fdlight.runs.trainer import world_size

    def size(devices, nodes=1, accelerator="cpu"):
        return world_size(OmegaConf.create({"devices": devices, "num_nodes": nodes, "accelerator": accelerator}))

    assert [size(1), size(4), size([0, 1]), size("0,1,3"), size("auto")] == [1, 4, 2, 3, 1]
    for k, v in {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    assert size(2, nodes=3) == size("auto", nodes=3) == 6
