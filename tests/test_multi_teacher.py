"""Several teachers into one student: the list selection, the per-teacher loss, token resampling, PHI-S against hand
computations, the adaptors file, the checkpoint and resume, bad input, the landscape per teacher, the benchmark."""
from __future__ import annotations

import csv
import json
import math

import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from conftest import TINY, run_main
from fdlight.config import compose
from fdlight.errors import FDLightError
from fdlight.models.adaptors import load_adaptors, teacher_features
from fdlight.models.layout import resample_grid
from fdlight.models.weights import read_export_metadata
from fdlight.models.whitening import PhiS, check_hadamard_order, hadamard
from fdlight.modules.distill import FeatureDistillation, fd_loss, whiten
from fdlight.stages.distill import STAGE, build_distillation

PAIR = "teacher=[tiny,tiny_b]"
SMALL = [*TINY, "data.num_train=32", "distill.batch_size=8"]


# ---------------------------------------------------------------------------------------------------- config
def test_a_list_composes_each_teacher_under_its_name_and_one_teacher_stays_flat():
    cfg = compose([PAIR, "teacher.loss_weight=2", "teacher.tiny_b.adaptor=mlp"])
    assert list(cfg.teacher) == ["tiny", "tiny_b"]
    assert (cfg.teacher.tiny.img_size, cfg.teacher.tiny_b.img_size, cfg.teacher.tiny_b.patch_size) == (32, 64, 16)
    assert cfg.teacher.tiny.loss_weight == cfg.teacher.tiny_b.loss_weight == 2  # a teacher.<key> is set for each
    assert (cfg.teacher.tiny.adaptor, cfg.teacher.tiny_b.adaptor) == ("linear", "mlp")
    single = compose(["teacher=clip_vitb"]).teacher
    assert single.name == "clip_vitb" and single.patch_size == 16 and single.loss_weight == 1.0


# ------------------------------------------------------------------------------------------- loss and grads
def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_a_zero_weight_teacher_leaves_the_other_teachers_single_run(one_thread):
    single = build_distillation(compose(["teacher=tiny"]))
    multi = build_distillation(compose([PAIR, "teacher.tiny_b.loss_weight=0"]))
    multi.student.load_state_dict(single.student.state_dict())
    multi.projectors["tiny"].load_state_dict(single.projector.state_dict())
    x = torch.randn(4, 3, 32, 32)
    losses = {}
    for name, module in (("single", single), ("multi", multi)):
        module.train()
        torch.manual_seed(3)  # the same drop-path draws in both students
        losses[name] = module.distill_loss(x)
        losses[name].backward()
    assert losses["multi"].item() == pytest.approx(losses["single"].item(), rel=1e-6, abs=0)
    want, got = grads(single.student), grads(multi.student)
    assert want.keys() == got.keys() and all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-8) for k in want)
    assert torch.allclose(multi.projectors["tiny"].weight.grad, single.projector.weight.grad, rtol=1e-5, atol=1e-8)
    assert all(float(p.grad.abs().max()) == 0.0 for p in multi.projectors["tiny_b"].parameters())
    with torch.no_grad():  # and the zero-weight teacher is still measured
        assert multi.distill_losses(x)["tiny_b"].item() > 0


def test_the_total_is_the_weighted_sum_and_both_teachers_see_their_own_input(one_thread):
    module = build_distillation(compose([PAIR, "teacher.tiny.loss_weight=0.25", "teacher.tiny_b.loss_weight=2"]))
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parts = module.distill_losses(x)
        total = module.distill_loss(x)
    assert total.item() == pytest.approx(0.25 * parts["tiny"].item() + 2 * parts["tiny_b"].item(), rel=1e-6)
    assert module.teacher_input(x, "tiny_b").shape[-1] == 64 and module.teacher_input(x, "tiny").shape[-1] == 32
    pixels = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1)
    clip = (pixels - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    want = torch.nn.functional.interpolate(clip, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(module.teacher_input(x, "tiny_b"), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------- resampling
def test_resampling_a_2x2_map_matches_bilinear_weights_by_hand():
    a, b, c, d = 1.0, 3.0, -2.0, 5.0
    cls = [7.0, -7.0]
    tokens = torch.tensor([[cls, [a, 10 * a], [b, 10 * b], [c, 10 * c], [d, 10 * d]]])  # (1, 1 + 2x2, 2)
    # align_corners=False: output i samples input (i + 0.5) * 2/3 - 0.5 = -1/6 (clamped to 0), 1/2, 7/6 (clamped to 1)
    row = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    grid = [[a, b], [c, d]]
    want = [[sum(row[i][p] * row[j][q] * grid[p][q] for p in range(2) for q in range(2)) for j in range(3)]
            for i in range(3)]
    assert want[1] == [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2]
    out = resample_grid(tokens, prefix=1, grid=3)
    assert out.shape == (1, 10, 2) and out[0, 0].tolist() == cls  # the CLS token passes through
    got = out[0, 1:, 0].reshape(3, 3)
    assert torch.allclose(got, torch.tensor(want)) and torch.allclose(out[0, 1:, 1], 10 * out[0, 1:, 0])
    # 2 -> 4 tells align_corners=False (samples at -1/4, 1/4, 3/4, 5/4) from True (samples at 0, 1/3, 2/3, 1)
    row4 = [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
    want4 = [[sum(row4[i][p] * row4[j][q] * grid[p][q] for p in range(2) for q in range(2)) for j in range(4)]
             for i in range(4)]
    got4 = resample_grid(tokens, prefix=1, grid=4)[0, 1:, 0].reshape(4, 4)
    assert torch.allclose(got4, torch.tensor(want4))


GRID_2X2 = ["teacher.patch_size=16", "teacher.kwargs.patch_size=16", "whitening=none"]  # student: 32 px / 8 = 4x4


def test_a_teacher_on_another_grid_is_refused_unless_resampled(one_thread):
    with pytest.raises(FDLightError, match="teacher.resample_tokens=true"):
        build_distillation(compose(["teacher=tiny", *GRID_2X2]))
    module = build_distillation(compose(["teacher=tiny", *GRID_2X2, "teacher.resample_tokens=true"])).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = module.teacher(module.teacher_input(x))  # (2, 1 + 2x2, 64): the teacher at 32 px / 16
        target = module.target(x)
    assert raw.shape[1] == 5 and target.shape == (2, 17, 64)  # on the student's 4x4 grid, CLS kept
    grid = raw[:, 1:].reshape(2, 2, 2, 64)
    row = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    want = torch.einsum("ip,jq,bpqd->bijd", row, row, grid).reshape(2, 16, 64)
    assert torch.allclose(target[:, 1:], want, atol=1e-6) and torch.allclose(target[:, 0], raw[:, 0])


# ---------------------------------------------------------------------------------------------------- PHI-S
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes():
    for n in (2, 12, 64, 96, 768):
        h = hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))
    with pytest.raises(FDLightError, match="none of order 100"):
        check_hadamard_order(100, "teacher.x")


def test_phi_s_of_a_rank_one_distribution_by_hand():
    v = [1.0, 2.0, 4.0, 7.0, 11.0]
    x = torch.tensor([[[vi, 0.0] for vi in v]])  # all variance on channel 0
    m = sum(v) / len(v)
    var = sum((vi - m) ** 2 for vi in v) / (len(v) - 1)  # eigenvalues var, 0: the mean is var / 2
    phi = PhiS(2, batches=1).train()
    y = phi(x)[0]
    # y = H2 U^T (x - mu) / sqrt(var / 2), U^T (x - mu) = (0, +-(v - m)), H2 = [[1, 1], [1, -1]] / sqrt(2)
    want = torch.tensor([abs(vi - m) / math.sqrt(var) for vi in v])
    assert torch.allclose(y.abs(), want.unsqueeze(1).expand(-1, 2), atol=1e-5)
    assert phi.scale.item() == pytest.approx(math.sqrt(var / 2), rel=1e-6)


def sample_covariance(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    centred = x - x.sum(0) / x.shape[0]
    return sum(torch.outer(r, r) for r in centred) / (x.shape[0] - 1)


def test_phi_s_equalises_the_variances_and_is_a_rotation_times_one_scale():
    gen = torch.Generator().manual_seed(0)
    dim, n = 12, 400
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1, 0.1, 0.05, 0.0])  # one flat direction
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    x = ((torch.randn(n, dim, generator=gen, dtype=torch.float64) * scales.double()) @ mix.T + 3.0).float()
    phi = PhiS(dim, batches=2).train()
    phi(x[: n // 2].unsqueeze(0))
    y = phi(x[n // 2:].unsqueeze(0))  # the second batch completes the estimate
    y = phi.apply_transform(x)  # every token through the frozen transform
    alpha2 = torch.trace(sample_covariance(x)).item() / dim  # the mean eigenvalue is the mean variance
    cov_y = sample_covariance(y)
    assert torch.allclose(cov_y.diagonal(), torch.ones(dim, dtype=torch.float64), atol=1e-3)
    assert cov_y.diagonal().std() < 1e-4 and (cov_y - torch.diag(cov_y.diagonal())).abs().max() > 0.05  # not whitened
    t = phi.transform.double()
    assert torch.allclose(t @ t.T, torch.eye(dim, dtype=torch.float64) / alpha2, rtol=1e-4, atol=1e-6)
    assert phi.scale.item() ** 2 == pytest.approx(alpha2, rel=1e-4)
    dists_x, dists_y = torch.pdist(x.double()[:50]), torch.pdist(y[:50].double())
    assert torch.allclose(dists_y, dists_x / math.sqrt(alpha2), rtol=1e-3)  # distances shrink by one scale only
    assert torch.allclose(phi.inverse(y), x, atol=1e-3)


def test_phi_s_freezes_after_its_batches_and_lives_in_the_state_dict():
    phi = PhiS(8, batches=2).train()
    for _ in range(2):
        phi(torch.randn(3, 5, 8))
    frozen = {k: v.clone() for k, v in phi.state_dict().items()}
    phi(torch.randn(3, 5, 8) * 100)
    assert all(torch.equal(frozen[k], v) for k, v in phi.state_dict().items())
    assert {"mean", "transform", "scale", "seen", "count", "total", "outer"} <= set(frozen) and frozen["seen"] == 2
    again = PhiS(8, batches=2)
    again.load_state_dict(frozen)
    x = torch.randn(2, 4, 8)
    assert torch.equal(again.train()(x), phi(x))  # loaded as frozen: training does not move it


# ------------------------------------------------------------------------------------------- a real run
class FirstBatch(Callback):
    def __init__(self):
        self.x = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.x is None:
            self.x = batch[0].detach().clone()


# warmup_lr=0 and one warmup step: the only update has lr 0, so the exported weights computed the logged loss
LOGGED = [*SMALL, PAIR, "teacher.tiny_b.whitening=phi_s", "teacher.tiny.adaptor=mlp", "whitening.phi_s_batches=1",
          "drop_path.student=0", "distill.max_steps=1", "distill.epochs=1", "distill.warmup_epochs=1",
          "distill.warmup_lr=0"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("multi") / "run"
    seen = FirstBatch()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = STAGE.run(compose(LOGGED), run_dir, callbacks=[seen])
    finally:
        torch.set_num_threads(before)
    return run_dir, metrics, seen.x


def logged_losses(run_dir) -> dict[str, float]:
    rows = list(csv.DictReader(open(next(run_dir.glob("logs/version_*/metrics.csv")))))
    first = next(r for r in rows if r.get("train/loss"))  # the first step's row (the monitor's rows come first)
    return {k.split("/")[-1]: float(v) for k, v in first.items() if k.startswith("train/loss/") and v}


def test_the_adaptors_file_reproduces_the_logged_per_teacher_loss(logged_run, one_thread):
    run_dir, metrics, x = logged_run
    heads = load_adaptors(run_dir / "adaptors.safetensors")
    assert list(heads) == ["tiny", "tiny_b"] and heads["tiny_b"].spec.dim_out == 96
    assert heads["tiny"].spec.adaptor == "mlp" and heads["tiny_b"].phi_s is not None
    meta = read_export_metadata(run_dir / "student.safetensors")
    student = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(run_dir / "student.safetensors")), **meta["timm_kwargs"]).eval()  # plain timm, as before
    rebuilt = build_distillation(OmegaConf.load(run_dir / "config.yaml")).eval()  # the teachers, from the seed
    with torch.no_grad():
        preds = teacher_features(student, heads, x)
        targets = {"tiny": whiten(rebuilt.teachers["tiny"](rebuilt.teacher_input(x, "tiny")), "fd_ln"),
                   "tiny_b": heads["tiny_b"].phi_s.apply_transform(
                       rebuilt.teachers["tiny_b"](rebuilt.teacher_input(x, "tiny_b")))}
    logged = logged_losses(run_dir)
    for name in ("tiny", "tiny_b"):
        got = fd_loss(preds[name], targets[name]).item()
        assert got == pytest.approx(logged[name], rel=1e-5), name
        assert metrics["teachers"][name]["first_loss"] == pytest.approx(logged[name], rel=1e-6)


def test_the_checkpoint_holds_adaptors_and_statistics_never_a_teacher(logged_run):
    run_dir, metrics, _ = logged_run
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"student", "projectors", "whiteners"}
    assert {k.split(".")[1] for k in state if k.startswith("projectors.")} == {"tiny", "tiny_b"}
    assert "whiteners.tiny_b.phi_s.transform" in state and int(state["whiteners.tiny_b.phi_s.seen"]) == 1
    assert not any(k.startswith("whiteners.tiny.") for k in state)  # fd_ln has no state
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["teacher"] == "tiny+tiny_b" and set(saved["teachers"]) == {"tiny", "tiny_b"}
    assert all(saved["teachers"][n]["last_loss"] > 0 for n in ("tiny", "tiny_b"))


def test_the_landscape_of_a_multi_teacher_run_has_one_part_per_teacher(logged_run, one_thread):
    from fdlight.stages.diagnose import diagnose_checkpoint

    run_dir, _, _ = logged_run
    cfg = compose([*TINY, "stage=diagnose", "diagnose.num_images=4", "diagnose.batch_size=4",
                   "diagnose.landscape.steps=3", "diagnose.landscape.two_d=false"])
    d = diagnose_checkpoint(str(run_dir), cfg)
    ls = d.data["landscape"]
    assert ls["loss"] == "fd" and set(ls["parts"]) == {"tiny", "tiny_b"}
    assert ls["origin"] == pytest.approx(ls["parts"]["tiny"]["origin"] + ls["parts"]["tiny_b"]["origin"], rel=1e-5)
    assert all(len(p["curve"]) == 3 and math.isfinite(p["sharpness"]) for p in ls["parts"].values())
    assert set(d.summary["teacher_sharpness"]) == {"tiny", "tiny_b"}


def test_resume_continues_with_the_saved_adaptors_and_statistics(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    args = [*SMALL, PAIR, "whitening=phi_s", "whitening.phi_s_batches=2", f"hydra.run.dir={run_dir}"]
    first = STAGE.run(compose([*args, "distill.max_steps=3"]), run_dir)
    ckpt = run_dir / "checkpoints/last.ckpt"
    before = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    done = STAGE.run(compose([*args, "distill.max_steps=5", "resume=true", "resume_allow_changes=true"]), run_dir)
    after = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert (first["steps"], done["steps"]) == (3, 5)
    for name in ("tiny", "tiny_b"):
        key = f"whiteners.{name}.phi_s"
        assert int(after[f"{key}.seen"]) == 2  # frozen after two batches, before the first run ended
        assert torch.equal(after[f"{key}.transform"], before[f"{key}.transform"])
        assert not torch.equal(after[f"projectors.{name}.weight"], before[f"projectors.{name}.weight"])
        assert done["teachers"][name]["first_loss"] == first["teachers"][name]["first_loss"]


# ---------------------------------------------------------------------------------------------- the CLI
def error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    return lines[0]


BAD = {
    "unknown": (["teacher=[tiny,nope]"], "unknown teacher 'nope' in teacher=[tiny,nope]"),
    "twice": (["teacher=[tiny,tiny]"], "names tiny twice"),
    "grids": ([PAIR, "teacher.tiny_b.patch_size=8", "teacher.tiny_b.kwargs.patch_size=8"],
              "vs teacher.tiny_b 8x8 + 1 prefix tokens (64 px / 8)"),
    "weight": ([PAIR, "teacher.tiny.loss_weight=-1"], "teacher.tiny.loss_weight=-1 must be a number >= 0"),
    "stage": ([PAIR, "stage=finetune"], "stage=finetune takes one teacher="),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_teacher_lists_fail_in_one_line_and_leave_no_run(case, tmp_path):
    args, expected = BAD[case]
    run_dir = tmp_path / "run"
    line = error_line(run_main([*TINY, *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path))
    assert expected in line, line
    assert not run_dir.exists()


def test_two_teachers_end_to_end_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    res = run_main([PAIR, "distill.max_steps=5", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("student.safetensors", "adaptors.safetensors", "metrics.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["steps"] == 5 and saved["teacher"] == "tiny+tiny_b"
    for name in ("tiny", "tiny_b"):
        t = saved["teachers"][name]
        assert t["first_loss"] > 0 and t["last_loss"] > 0 and t["loss_weight"] == 1.0
    header = next(run_dir.glob("logs/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss/tiny", "train/loss/tiny_b", "train/loss_share/tiny", "train/loss_share/tiny_b"} <= set(header)
    assert "adaptors.safetensors" in res.stdout + res.stderr  # named in the closing line


def test_the_benchmark_takes_a_teacher_list(one_thread):
    from fdlight.bench.distill import main

    result = main(["--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0", PAIR])
    assert result["teacher"] == "tiny+tiny_b" and result["img_per_s"] > 0 and result["teacher_ms"] > 0


def test_a_module_with_several_teachers_refuses_single_teacher_shortcuts():
    module = build_distillation(compose([PAIR]))
    assert isinstance(module, FeatureDistillation) and not module.single
    with pytest.raises(FDLightError, match="distils 2 teachers"):
        module.target(torch.randn(1, 3, 32, 32))
