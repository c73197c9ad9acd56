"""stage=detect: the ViTDet simple feature pyramid and the Swin FPN, Mask R-CNN on fixed-size squares, box and mask
mAP in the original frame (perfect = 1, empty = 0), and the stage end to end on synthetic and COCO-layout data."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, dense_lrs, run_stage
from fdlight.data.dense import LargeScaleJitter, SyntheticDetection
from fdlight.errors import FDLightError
from fdlight.models.pyramid import Backbone, DetectionBackbone, SimpleFeaturePyramid
from fdlight.modules.detect import FixedSizeTransform, metric_target, new_map_metric, to_original_frame
from fdlight.stages.detect import build_detection, load_detector
from test_dense_data import write_coco
from test_segment import beit, tiny_swin

STEP = ["stage=detect", "detect.max_steps=1", "detect.epochs=1", "detect.batch_size=2", "detect.num_vis=2"]
FAST = [*STEP, "data.num_val=4"]


# ---------------------------------------------------------------------------------------------- the pyramids
@pytest.mark.parametrize("patch", [16, 8])
def test_simple_feature_pyramid_strides_and_channels(patch):
    neck = SimpleFeaturePyramid(32, patch, out_channels=24)
    out = neck(torch.randn(2, 32, 128 // patch, 128 // patch))
    assert list(out) == ["0", "1", "2", "3", "pool"] and neck.strides == [4, 8, 16, 32, 64]
    assert [tuple(v.shape) for v in out.values()] == [(2, 24, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    assert neck.out_channels == 24


def test_vit_and_swin_detection_backbones_give_the_same_levels():
    for body in (Backbone(beit(patch=16), indices=[3] * 4), Backbone(tiny_swin())):
        net = DetectionBackbone(body, out_channels=16)
        out = net(torch.randn(1, 3, 64, 64))
        assert net.strides == [4, 8, 16, 32, 64] and net.out_channels == 16
        assert [v.shape[-1] for v in out.values()] == [16, 8, 4, 2, 1] and all(v.shape[1] == 16 for v in out.values())


def test_pyramid_of_a_patch_14_vit_uses_the_beit_factors():
    neck = SimpleFeaturePyramid(32, 14, out_channels=8)
    assert neck.strides == [3.5, 7, 14, 28, 56]
    assert [v.shape[-1] for v in neck(torch.randn(1, 32, 8, 8)).values()] == [32, 16, 8, 4, 2]
    with pytest.raises(FDLightError, match="cannot bring stride 14 to stride 4"):
        SimpleFeaturePyramid(32, 14, out_strides=(4, 8, 16, 32))
    with pytest.raises(FDLightError, match="power-of-two strides"):  # RoIAlign would misplace 3.5-stride boxes
        DetectionBackbone(Backbone(beit(img_size=56, patch=14), indices=[3] * 4))


def test_detector_input_must_be_the_padded_square():
    t = FixedSizeTransform(64).eval()
    images, _ = t([torch.rand(3, 64, 64)])
    assert images.tensors.shape == (1, 3, 64, 64)
    with pytest.raises(FDLightError, match="takes 64x64 padded squares"):
        t([torch.rand(3, 48, 64)])


# ------------------------------------------------------------------------------------------------------ mAP
def perfect_outputs(target: dict, image_size: int) -> dict:
    """What a perfect detector returns on the padded square: the ground truth scaled into it, scores 1."""
    sx, sy = (float(v) for v in target["scale"])
    h, w = (int(v) for v in target["size"])
    masks = torch.zeros((len(target["labels"]), 1, image_size, image_size))
    if len(target["labels"]):
        inner = F.interpolate(target["masks"][None].float(), (round(h * sy), round(w * sx)), mode="nearest")[0]
        masks[:, 0, :inner.shape[1], :inner.shape[2]] = inner
    return {"boxes": target["boxes"] * torch.tensor([sx, sy, sx, sy]), "labels": target["labels"],
            "scores": torch.ones(len(target["labels"])), "masks": masks}


def score(outputs, targets) -> dict:
    metric = new_map_metric()
    metric.update([to_original_frame(o, t) for o, t in zip(outputs, targets)], [metric_target(t) for t in targets])
    return {k: float(v) for k, v in metric.compute().items() if k in ("bbox_map", "segm_map")}


def test_map_of_perfect_predictions_is_one_and_of_empty_ones_is_zero():
    ds = SyntheticDetection("val", 6, 64, 10, 0, LargeScaleJitter(64, train=False))
    targets = [ds[i][1] for i in range(len(ds))]
    assert score([perfect_outputs(t, 64) for t in targets], targets) == {"bbox_map": 1.0, "segm_map": 1.0}
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 1, 64, 64)} for _ in targets]
    assert score(empty, targets) == {"bbox_map": 0.0, "segm_map": 0.0}
    wrong = [dict(o, labels=o["labels"] % 10 + 1) for o in (perfect_outputs(t, 64) for t in targets)]
    assert score(wrong, targets) == {"bbox_map": 0.0, "segm_map": 0.0}   # right places, wrong classes


def test_predictions_are_scored_in_the_original_frame(tmp_path):
    """COCO images of 40x48 padded into 64 squares: boxes map back exactly, masks within resampling."""
    write_coco(tmp_path)
    from fdlight.data.coco import CocoDetection

    ds = CocoDetection(tmp_path, "val", LargeScaleJitter(64, train=False), train=False)
    targets = [ds[i][1] for i in range(len(ds))]
    result = score([perfect_outputs(t, 64) for t in targets], targets)
    assert result["bbox_map"] == pytest.approx(1.0) and result["segm_map"] > 0.9


# -------------------------------------------------------------------------------------------------- the stage
def test_one_training_step_on_cpu_writes_model_metrics_and_picture(tmp_path):
    metrics = run_stage(FAST, tmp_path / "run")
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 1 and metrics["val/bbox_mAP"] == saved["val/bbox_mAP"]
    assert 0.0 <= saved["val/bbox_mAP"] <= 1.0 and 0.0 <= saved["val/segm_mAP"] <= 1.0
    assert (run / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_detector(run / "model.safetensors")
    cfg = compose(["trainer=cpu", *FAST])
    again, *_ = build_detection(cfg, cfg.detect, 10)
    again.model.load_state_dict(model.state_dict())
    again.model.eval()
    x = [torch.rand(3, 64, 64)]
    a, b = model(x)[0], again.model(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_stage_runs_on_the_coco_layout_and_counts_empty_images(tmp_path):
    write_coco(tmp_path / "coco")
    metrics = run_stage([*STEP, "data=coco", f"data.root={tmp_path / 'coco'}", "data.num_workers=0",
                         "data.empty_images=keep"], tmp_path / "run")
    assert metrics["num_classes"] == 2 and metrics["empty_images_train"] == 1
    assert metrics["skipped_images_train"] == 0 and 0.0 <= metrics["val/segm_mAP"] <= 1.0


def test_a_broken_coco_json_stops_before_the_run_directory_is_used(tmp_path):
    write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text("{\"images\": [")
    with pytest.raises(FDLightError, match="instances_val2017.json is not valid JSON"):
        run_stage([*STEP, "data=coco", f"data.root={tmp_path / 'coco'}"], tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_segmentation_model_is_not_a_detection_backbone(tmp_path):
    run_stage(["stage=segment", "segment.max_steps=1", "segment.epochs=1", "segment.batch_size=2",
               "data.num_val=2", "segment.num_vis=0"], tmp_path / "seg")
    with pytest.raises(FDLightError, match="is a whole segment model, not a backbone"):
        run_stage([*FAST, f"detect.pretrained={tmp_path / 'seg' / 'model.safetensors'}"], tmp_path / "det")


@pytest.mark.parametrize("experiment", ["seg_vitb16_ade20k", "seg_vitl14_ade20k", "seg_swinv2b_ade20k",
                                        "det_vitb16_coco", "det_swinv2b_coco"])
def test_recipes_build_at_their_full_size(experiment):
    """Each recipe composes and its model builds (on the meta device: shapes only) with the expected levels."""
    from fdlight.stages.detect import detector
    from fdlight.stages.dense import backbone_model
    from fdlight.stages.segment import build_segmentation

    cfg = compose([f"experiment={experiment}", "data.root=/nowhere"])
    with torch.device("meta"):
        if experiment.startswith("seg"):
            model = build_segmentation(cfg, cfg.segment, 150)[0].model
            body, size = model.backbone, cfg.segment.crop_size
            assert model.strides == ([3.5, 7, 14, 28] if "vitl14" in experiment else [4, 8, 16, 32])
        else:
            net, _, _ = backbone_model(cfg, cfg.detect, cfg.detect.img_size, "detect")
            model = detector(net, {"indices": None, "num_classes": 80, "img_size": 1024, "fpn_channels": 256,
                                   **{k: cfg.detect[k] for k in ("anchor_sizes", "box_head_dim", "mask_head_dim",
                                                                 "rpn_pre_nms_train", "rpn_post_nms_train",
                                                                 "rpn_pre_nms_test", "rpn_post_nms_test",
                                                                 "box_batch_size_per_image", "detections_per_img")}})
            body, size = model.backbone.body, 1024
            assert model.backbone.strides == [4, 8, 16, 32, 64]
    assert body.img_size == size and size % body.patch_size == 0
    if body.is_vit:
        assert body.take == ([len(body.model.blocks) - 1] if experiment.startswith("det") else [3, 5, 7, 11]
                             if "vitb16" in experiment else [7, 11, 15, 23])


def test_swin_student_trains_through_the_detection_stage(tmp_path):
    from test_segment import SWIN

    metrics = run_stage([*FAST, *SWIN], tmp_path / "run")
    assert metrics["steps"] == 1 and metrics["backbone"].startswith("swinv2")
    model = load_detector(tmp_path / "run" / "model.safetensors")
    assert model.backbone.strides == [4, 8, 16, 32, 64] and not model.backbone.body.is_vit


def test_detector_layer_decay_reaches_the_backbone_only():
    cfg = compose(["stage=detect", "detect.layer_decay=0.5", "detect.warmup_steps=0"])
    module, *_ = build_detection(cfg, cfg.detect, 10)
    lrs = dense_lrs(module)
    peak = cfg.detect.lr  # tiny student: 2 blocks, 4 layers
    assert lrs["backbone.body.model.patch_embed.proj.weight"] == pytest.approx(peak * 0.5 ** 3)
    assert lrs["backbone.body.model.blocks.1.mlp.fc1.weight"] == pytest.approx(peak * 0.5)
    assert lrs["backbone.neck.levels.0.0.weight"] == pytest.approx(peak)
    assert lrs["roi_heads.box_predictor.cls_score.weight"] == pytest.approx(peak)
