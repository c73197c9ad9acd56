"""stage=diagnose end to end on real artifacts: a teacher config, a distilled run (its directory and its Lightning
.ckpt), a fine-tuned model.safetensors; the JSON, the plots, W&B images, the losses at the origin computed
independently, every bad input as one line, fused attention restored after a failure."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY, compose, run_main, run_stage
from fdlight.data.synthetic import SyntheticClassification
from fdlight.data.transforms import eval_transform
from fdlight.diagnostics.loading import load_subject
from fdlight.errors import FDLightError
from fdlight.models.exports import export_timm
from fdlight.models.weights import read_state_dict
from fdlight.stages import run
from fdlight.stages.diagnose import diagnose_checkpoint, diagnose_subject, load_subjects, summarize
from fdlight.stages.distill import build_distillation

FAST = ["stage=diagnose", "diagnose.num_images=8", "diagnose.batch_size=4", "diagnose.landscape.steps=3"]
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def listing(*specs) -> str:
    return "diagnose.checkpoints=[" + ",".join(f"'{s}'" for s in specs) + "]"


def eval_images(n=8, size=32):
    ds = SyntheticClassification("val", n, 64, 10, 0, eval_transform(size))
    xs, ys = zip(*[ds[i] for i in range(n)])
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    distill = root / "distill"
    run_stage(["data.num_train=64", "distill.batch_size=16", "distill.max_steps=3", "distill.epochs=1"], distill)
    finetune = root / "finetune"
    finetune.mkdir()
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT)
    export_timm(vit, finetune / "model.safetensors", "vit_tiny_patch16_224", dict(num_classes=10, **VIT),
                stage="finetune")
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    export_timm(resnet, root / "resnet.safetensors", "resnet10t", {"num_classes": 0}, stage="finetune")
    (root / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    (root / "junk.pt").write_bytes(b"nor is this a torch pickle")
    lone = root / "lone"
    lone.mkdir()
    shutil.copy(distill / "checkpoints" / "last.ckpt", lone / "last.ckpt")
    return {"root": root, "distill": distill, "finetune": finetune / "model.safetensors",
            "ckpt": distill / "checkpoints" / "last.ckpt", "resnet": root / "resnet.safetensors",
            "junk_st": root / "junk.safetensors", "junk_pt": root / "junk.pt", "lone_ckpt": lone / "last.ckpt"}


@pytest.fixture(scope="module")
def diagnosed(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "run"
    specs = ["teacher:tiny", artifacts["distill"], artifacts["finetune"], artifacts["ckpt"]]
    metrics = run_stage([*FAST, listing(*specs), "diagnose.names=[teacher,fd,ft,fd_ckpt]", "diagnose.hessian=true",
                         "diagnose.hessian_iters=5"], out)
    return out, metrics, json.loads((out / "diagnostics.json").read_text())


def test_json_holds_every_number_per_checkpoint(diagnosed):
    out, metrics, doc = diagnosed
    ck = doc["checkpoints"]
    assert list(ck) == ["teacher", "fd", "ft", "fd_ckpt"]
    assert [ck[n]["summary"]["landscape_loss"] for n in ck] == ["probe", "fd", "ce", "fd"]
    assert [ck[n]["kind"] for n in ck] == ["teacher", "distilled student", "fine-tuned", "distilled student"]
    for name, r in ck.items():
        a = r["attention"]
        assert a["layers"] == ["blocks.0.attn", "blocks.1.attn"] and a["heads"] == [2, 2]
        assert len(a["distance_px"]) == 2 and all(len(h) == 2 for h in a["distance_px"])
        assert all(0 < d < 8 * 3 * math.sqrt(2) for h in a["distance_px"] for d in h)  # inside a 4x4 grid of 8 px
        assert len(a["kl_pairs"][0]) == 2 and all(0 <= v <= 1 for v in a["diagonality_mean"])
        ls = r["landscape"]
        assert ls["alphas"] == [-1.0, 0.0, 1.0] and len(ls["surface"]) == 3 and ls["surface"][1][1] == ls["origin"]
        assert math.isfinite(r["hessian"]["max_eigenvalue"]) and r["hessian"]["iterations"] >= 1
        s = r["summary"]
        assert s["attn_distance_spread"] == pytest.approx(sum(a["distance_std_px"]) / 2)
        assert s["sharpness"] == pytest.approx(0.5 * (ls["curve"][0] + ls["curve"][-1]) - ls["origin"])
        assert r["num_images"] == 8
    assert metrics["checkpoints"]["fd"] == ck["fd"]["summary"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["stage"] == "diagnose" and (saved["data"], saved["train_images"], saved["val_images"]) == \
        ("synthetic", None, 8)


def test_landscapes_of_different_losses_never_share_an_axis(diagnosed):
    from fdlight.diagnostics.plots import landscape_figure

    fig = landscape_figure(diagnosed[2]["checkpoints"])  # probe, fd, ce, fd
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_xlabel() == "alpha (filter-normalised direction 1)"}
    assert sorted(panels) == ["ce loss", "fd loss", "probe loss"]
    for title, ax in panels.items():
        labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert labels and all(label.endswith(f"({title.split()[0]})") for label in labels)
    assert len(panels["fd loss"].get_lines()) - 1 == 2  # fd and fd_ckpt, beside the zero line


def test_plots_are_written_as_png(diagnosed):
    out, metrics, _ = diagnosed
    names = {"attention_distance.png", "head_diversity.png", "landscape.png", "attention_maps_teacher.png",
             "attention_maps_fd.png", "attention_maps_ft.png", "attention_maps_fd_ckpt.png"}
    assert set(metrics["plots"]) == names
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    maps = read_state_dict(out / "attention_maps.safetensors")
    assert maps["fd|blocks.1.attn"].shape == (2, 16, 16)


def test_ckpt_and_export_of_one_run_agree(diagnosed):
    ck = diagnosed[2]["checkpoints"]
    assert ck["fd"]["attention"]["distance_px"] == ck["fd_ckpt"]["attention"]["distance_px"]
    assert ck["fd"]["landscape"]["origin"] == pytest.approx(ck["fd_ckpt"]["landscape"]["origin"], rel=1e-6)


def test_fd_loss_at_origin_is_the_runs_own_loss(artifacts, diagnosed):
    run_cfg = OmegaConf.load(artifacts["distill"] / "config.yaml")
    module = build_distillation(run_cfg)  # the training code path, independent of the diagnostics loader
    state = read_state_dict(artifacts["ckpt"])["state_dict"]
    module.load_state_dict(state, strict=True)
    module.eval()
    x, _ = eval_images()
    with torch.no_grad():
        want = float(module._distill_loss(x))
    assert diagnosed[2]["checkpoints"]["fd"]["landscape"]["origin"] == pytest.approx(want, rel=1e-5)


def test_ce_at_origin_is_the_models_cross_entropy(artifacts, diagnosed):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, checkpoint_path=str(artifacts["finetune"]),
                              **VIT).eval()  # timm's strict loader
    x, y = eval_images()
    with torch.no_grad():
        want = float(F.cross_entropy(model(x), y))
    assert diagnosed[2]["checkpoints"]["ft"]["landscape"]["origin"] == pytest.approx(want, rel=1e-5)


def test_wandb_gets_the_plots_as_images(tmp_path):
    out = tmp_path / "run"
    run_stage([*FAST, "logger=wandb", listing("teacher:tiny"), "diagnose.landscape.two_d=false"], out)
    images = sorted(p.name for p in out.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    for stem in ("attention_distance", "head_diversity", "landscape", "attention_maps_teacher_tiny"):
        assert any(name.startswith(stem + "_") for name in images), images


def test_summarize_for_the_demo(artifacts):
    cfg = compose([*TINY, *FAST])
    out = summarize(["teacher:tiny", str(artifacts["distill"])], cfg, names=["teacher", "student"], loss="probe")
    assert list(out) == ["teacher", "student"]
    for s in out.values():
        assert s["landscape_loss"] == "probe"
        assert math.isfinite(s["attn_distance_spread"]) and math.isfinite(s["sharpness"])
    other = summarize([str(artifacts["finetune"])], compose([*TINY, "stage=distill"]))  # defaults fill diagnose.*
    assert other["fine-tuned"]["landscape_loss"] == "ce"


def test_checkpoints_are_named_by_what_they_are(artifacts):
    """Without diagnose.names, plots and files name each checkpoint by its kind, not by its run folder's time stamp;
    two of one kind get the folder they come from beside it."""
    d = compose([*TINY, *FAST, listing("teacher:tiny", artifacts["distill"], artifacts["finetune"],
                                       artifacts["ckpt"])]).diagnose
    names = [s.name for s in load_subjects(d, compose([*TINY, *FAST]))]
    assert names == ["teacher (tiny)", "distilled student (distill)", "fine-tuned",
                     "distilled student (distill/last.ckpt)"]


def test_diagonality_panel_explains_its_dashed_line(diagnosed):
    from fdlight.diagnostics.plots import diversity_figure

    panel = diversity_figure(diagnosed[2]["checkpoints"]).axes[2]
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["0.5: uniform attention"]
    assert panel.get_lines()[-1].get_linestyle() == "--" and panel.get_lines()[-1].get_ydata()[0] == 0.5


def test_hessian_under_the_probe_loss_of_a_model_with_a_head(artifacts):
    """The probe reads pre-logits features, so the model's own head is outside the loss: its Hessian rows are zero."""
    cfg = compose([*TINY, *FAST, "diagnose.landscape.loss=probe", "diagnose.landscape.two_d=false",
                   "diagnose.hessian=true", "diagnose.hessian_iters=3"])
    d = diagnose_checkpoint(str(artifacts["finetune"]), cfg)
    assert d.summary["landscape_loss"] == "probe" and math.isfinite(d.data["hessian"]["max_eigenvalue"])


def test_teacher_weight_files_take_the_teacher_config(tmp_path):
    from safetensors.torch import save_file

    from fdlight.models.teachers import build_teacher

    cfg = compose([*TINY, *FAST])
    teacher = build_teacher(cfg.teacher, seed=7)  # other weights than the config's seed gives
    save_file(teacher.model.state_dict(), str(tmp_path / "own.safetensors"))  # no fdlight metadata
    torch.save(teacher.model.state_dict(), tmp_path / "own.pt")
    for name in ("own.safetensors", "own.pt"):
        subject = load_subject(str(tmp_path / name), cfg)
        assert subject.kind == "teacher"
        got, want = subject.model.state_dict(), teacher.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fd_loss_falls_back_to_a_probe_when_the_runs_teacher_is_gone(artifacts, tmp_path):
    run_dir = tmp_path / "moved"
    shutil.copytree(artifacts["distill"], run_dir)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    run_cfg.teacher.weights = str(tmp_path / "gone.pt")
    OmegaConf.save(run_cfg, run_dir / "config.yaml")
    d = diagnose_checkpoint(str(run_dir), compose([*TINY, *FAST, "diagnose.landscape.two_d=false"]))
    assert d.summary["landscape_loss"] == "probe" and "FD loss unavailable" in d.data["landscape"]["note"]
    with pytest.raises(FDLightError, match="gone.pt"):
        diagnose_checkpoint(str(run_dir), compose([*TINY, *FAST, "diagnose.landscape.loss=fd"]))


def fused(model):
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags
    return flags


def test_fused_attention_restored_after_a_failing_diagnosis():
    cfg = compose([*TINY, *FAST])
    subject = load_subject("teacher:tiny", cfg)
    assert all(fused(subject.model))
    subject.img_size = 48  # images the 32 px model cannot take: the forward fails with attention unfused
    with pytest.raises(Exception):
        diagnose_subject(subject, cfg)
    assert all(fused(subject.model))
    subject.img_size = 32
    with pytest.raises(FDLightError, match="no classification head"):  # fails after the attention pass
        diagnose_subject(subject, compose([*TINY, *FAST, "diagnose.landscape.loss=ce"]))
    assert all(fused(subject.model))


BAD = {
    "unreadable_safetensors": (lambda a: [listing(a["junk_st"])], "cannot read checkpoint"),
    "unreadable_pt": (lambda a: [listing(a["junk_pt"])], "cannot read weights file"),
    "missing": (lambda a: [listing(a["root"] / "nope.safetensors")], "does not exist"),
    "ckpt_without_config": (lambda a: [listing(a["lone_ckpt"])], "needs its run's config.yaml"),
    "unknown_teacher": (lambda a: [listing("teacher:nope")], "unknown teacher config 'nope'"),
    "empty_subset": (lambda a: ["diagnose.num_images=0"], "empty evaluation subset"),
    "zero_steps": (lambda a: ["diagnose.landscape.steps=0"], "not a positive grid size"),
    "negative_steps": (lambda a: ["diagnose.landscape.steps=-5"], "not a positive grid size"),
    "zero_span": (lambda a: ["diagnose.landscape.span=0"], "not a positive size"),
    "empty_list": (lambda a: ["diagnose.checkpoints=[]"], "must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_run(case, artifacts, tmp_path):
    overrides, message = BAD[case]
    with pytest.raises(FDLightError) as e:
        run(compose([*TINY, *FAST, listing("teacher:tiny"), *overrides(artifacts)]), tmp_path / "run")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_empty_image_folder_is_one_line(tmp_path):
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FDLightError) as e:
        run(compose([*TINY, *FAST, listing("teacher:tiny"), "data=imagenet", f"data.root={tmp_path / 'data'}"]),
            tmp_path / "run")
    assert "\n" not in str(e.value)


def test_cli_prints_the_error_in_one_line(artifacts, tmp_path):
    res = run_main([*TINY, *FAST, listing(artifacts["junk_st"]), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert str(artifacts["junk_st"].name) in lines[0] and "cannot read checkpoint" in lines[0]


def test_a_model_without_attention_gets_what_applies_and_one_line_on_what_it_left_out(artifacts, tmp_path, caplog):
    with caplog.at_level("INFO", logger="fdlight"):
        metrics = run(compose([*TINY, *FAST, listing(artifacts["resnet"], "teacher:tiny")]), tmp_path / "run")
    (name, resnet), = [(n, c) for n, c in metrics["checkpoints"].items() if c["kind"] != "teacher"]
    (teacher,) = [c for c in metrics["checkpoints"].values() if c["kind"] == "teacher"]
    assert resnet["attn_distance_spread"] is None and resnet["head_kl_mean"] is None
    assert resnet["landscape_loss"] == "probe" and resnet["sharpness"] is not None  # the landscape is measured
    assert teacher["attn_distance_spread"] is not None
    notes = [r.getMessage() for r in caplog.records if "no attention layers" in r.getMessage()]
    assert notes == [f"{name} (ResNet) has no attention layers: its attention distance, head diversity, diagonality "
                     f"and maps are left out, its loss landscape is measured"]
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"attention_distance.png", "landscape.png"} <= written
    assert [n for n in written if n.startswith("attention_maps_")] == ["attention_maps_teacher_tiny.png"]
