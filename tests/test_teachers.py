"""Each teacher family loads a weights file written here through the real loading path and gives the library's own
features; the teacher stays frozen."""
from __future__ import annotations

import re

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import compose
from fdlight.errors import FDLightError
from fdlight.models.teachers import build_teacher

VIT = "teacher.kwargs={img_size:32,patch_size:8,embed_dim:64,depth:2,num_heads:2}"
CLIP_VISION = dict(image_size=32, layers=2, width=64, head_width=64, patch_size=8)
CLIP_TIMM = "teacher.kwargs={img_size:32,patch_size:8,embed_dim:64,depth:2,num_heads:1}"
GEOMETRY = ["teacher.img_size=32", "teacher.patch_size=8", "teacher.dim=64"]


def tiny_open_clip():
    torch.manual_seed(1)
    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
    return open_clip.create_model("ViT-B-16-quickgelu", embed_dim=32, vision_cfg=CLIP_VISION, text_cfg=text).eval()


def clip_reference_tokens(model, x):
    v = model.visual
    return v.ln_post(v.transformer(v._embeds(x)))  # all tokens after ln_post, as FD's target


@pytest.fixture
def image():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("family,name,wrap,suffix", [
    ("dino", "vit_base_patch16_224.dino", None, ".pth"),
    ("mae", "vit_base_patch16_224.mae", "model", ".pth"),
    ("deit", "deit_base_patch16_224.fb_in1k", None, ".safetensors"),
])
def test_timm_vit_teachers_load_a_file_and_match_timm(tmp_path, image, family, name, wrap, suffix):
    ref = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                            num_classes=1000 if family == "deit" else 0).eval()
    sd = ref.state_dict()
    path = tmp_path / f"{family}{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({wrap: sd} if wrap else sd, path)
    teacher = build_teacher(compose([f"teacher={family}_vitb", f"teacher.weights={path}", VIT, *GEOMETRY]).teacher)
    assert torch.allclose(teacher(image), ref.forward_features(image), atol=1e-6)
    assert teacher(image).shape == (2, 17, 64)


def test_clip_teacher_loads_open_clip_and_openai_jit_files(tmp_path, image):
    model = tiny_open_clip()
    expected = clip_reference_tokens(model, image)
    bin_path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), bin_path)
    jit_path = tmp_path / "ViT-tiny.pt"  # the original OpenAI releases are TorchScript archives
    torch.jit.trace_module(model, {"encode_image": image}).save(str(jit_path))
    for path in (bin_path, jit_path):
        teacher = build_teacher(compose(["teacher=clip_vitb", f"teacher.weights={path}", CLIP_TIMM, *GEOMETRY]).teacher)
        assert torch.allclose(teacher(image), expected, atol=1e-5), path.name


def test_open_clip_builder_matches_open_clip_forward(tmp_path, image):
    model = tiny_open_clip()
    path = tmp_path / "tiny_clip.safetensors"
    save_file(model.state_dict(), str(path))
    cfg = compose(["teacher=open_clip", "teacher.name=ViT-B-16-quickgelu", f"teacher.weights={path}",
                   "teacher.kwargs={embed_dim:32,text_cfg:{context_length:16,vocab_size:100,width:32,heads:2,layers:1},"
                   "vision_cfg:{image_size:32,layers:2,width:64,head_width:64,patch_size:8}}"])
    teacher = build_teacher(cfg.teacher)
    model.visual.output_tokens = True
    _, patch_tokens = model.visual(image)  # open_clip's own forward: patch tokens after ln_post
    out = teacher(image)
    assert out.shape == (2, 17, 64)
    assert torch.allclose(out[:, 1:], patch_tokens, atol=1e-5)
    assert teacher.layout.prefix_tokens == 1 and teacher.layout.grid == 4


def to_original_swin_layout(sd):
    """timm Swin keys -> the original Swin/EsViT layout (downsample at the end of a stage)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
    return out


def test_esvit_teacher_reads_the_student_entry_of_an_esvit_checkpoint(tmp_path):
    kwargs = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))
    ref = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0, **kwargs).eval()
    backbone = {f"module.backbone.{k}": v for k, v in to_original_swin_layout(ref.state_dict()).items()}
    heads = {"module.head.mlp.0.weight": torch.randn(8, 128), "module.head_dense.last_layer.weight": torch.randn(4, 8)}
    ema = {k: torch.zeros_like(v) for k, v in backbone.items()}
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"student": {**backbone, **heads}, "teacher": ema, "epoch": 300}, path)
    cfg = compose(["teacher=esvit_swinb", f"teacher.weights={path}", "teacher.img_size=64",
                   "++teacher.kwargs={img_size:64,patch_size:4,window_size:4,embed_dim:16,depths:[2,2,2,2],"
                   "num_heads:[1,1,1,1]}", "teacher.dim=128"])
    teacher = build_teacher(cfg.teacher)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(teacher(x), ref.forward_features(x).flatten(1, 2), atol=1e-5)
    assert teacher.layout.grid == 2 and teacher.layout.prefix_tokens == 0


def test_teacher_is_frozen_and_stays_in_eval():
    teacher = build_teacher(compose(["teacher=tiny"]).teacher)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_random_teacher_is_reproducible_from_its_seed():
    a = build_teacher(compose(["teacher=tiny"]).teacher, seed=0)
    b = build_teacher(compose(["teacher=tiny"]).teacher, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_weights_of_another_architecture_name_the_mismatched_keys(tmp_path):
    other = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0, img_size=32,
                              patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1))
    path = tmp_path / "swin.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(FDLightError) as err:
        build_teacher(compose(["teacher=dino_vitb", f"teacher.weights={path}", VIT, *GEOMETRY]).teacher)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "missing keys" in msg and "blocks.0" in msg


def test_missing_weights_file_names_its_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FDLightError, match="not found: .*nope.pth"):
        build_teacher(compose(["teacher=dino_vitb", f"teacher.weights={path}", VIT, *GEOMETRY]).teacher)


def test_hub_tag_without_network_fails_fast_and_names_the_file_to_pass():
    import time
    start = time.perf_counter()
    with pytest.raises(FDLightError, match=r"teacher.weights=/path/to/file") as err:
        build_teacher(compose(["teacher=dino_vitb", VIT, *GEOMETRY]).teacher)
    assert time.perf_counter() - start < 30
    assert "timm/vit_base_patch16_224.dino" in str(err.value)


def test_declared_geometry_must_match_the_built_model():
    with pytest.raises(FDLightError, match="teacher declares patch_size=16 but the built model has patch_size=8"):
        build_teacher(compose(["teacher=tiny", "teacher.patch_size=16"]).teacher)
