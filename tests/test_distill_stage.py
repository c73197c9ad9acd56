"""The distillation stage end to end: artifacts, frozen teacher, plain-timm export, sweeps, resume after a kill."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY, compose, run_main, run_stage
from fdlight.models.weights import read_export_metadata
from fdlight.runs.trainer import build_trainer
from fdlight.stages.distill import build_distillation
from fdlight.data.classification import ClassificationData
from fdlight.data.transforms import fd_train_transform

SMALL = ["data.num_train=128", "distill.batch_size=16", "distill.epochs=3"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill")
    metrics = run_stage(SMALL, run_dir)
    return run_dir, metrics


def test_run_writes_its_artifacts_and_the_loss_falls(distilled):
    run_dir, metrics = distilled
    for name in ("checkpoints/last.ckpt", "student.safetensors", "metrics.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["steps"] == 3 * (128 // 16) == metrics["steps"]
    assert saved["last_loss"] < saved["first_loss"]
    assert saved["img_per_s"] > 0
    assert (saved["data"], saved["data_root"], saved["train_images"], saved["val_images"]) == ("synthetic", None, 128,
                                                                                               None)
    assert list((run_dir / "logs").glob("version_*/metrics.csv"))
    modes = {name: (run_dir / name).stat().st_mode & 0o777 for name in ("student.safetensors", "config.yaml")}
    assert modes["student.safetensors"] == modes["config.yaml"]  # as readable as every other output


def test_the_runs_img_per_s_and_each_epochs_measure_the_same_steps(tmp_path):
    """metrics.json's img/s (the results table's) is the mean over the run's training steps, the progress lines' the
    mean over their epoch's: the run's rate is the epochs' rates weighted by their timed images."""
    from fdlight.stages.distill import STAGE

    class Epochs(Callback):
        rates: list[float] = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.rates.append(float(trainer.progress_bar_metrics["train/img_per_s"]))

    seen = Epochs()
    metrics = STAGE.run(compose([*TINY, "data.num_train=64", "distill.batch_size=16", "distill.epochs=2"]),
                        tmp_path / "run", callbacks=[seen])
    timed = (3 * 16, 4 * 16)  # 4 steps an epoch; the run's first step is warm-up, left out
    seconds = sum(images / rate for images, rate in zip(timed, seen.rates, strict=True))
    assert metrics["img_per_s"] == pytest.approx(sum(timed) / seconds, rel=1e-5)


def test_a_run_too_short_to_time_writes_strict_json(tmp_path):
    """One step leaves img/s unmeasured (the first steps are warm-up): null in metrics.json, not a bare NaN."""
    run_stage(["data.num_train=32", "distill.batch_size=16", "distill.max_steps=1"], tmp_path / "run")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["steps"] == 1 and saved["img_per_s"] is None


def test_checkpoint_holds_student_and_projector_only(distilled):
    run_dir, _ = distilled
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    prefixes = {k.split(".")[0] for k in ckpt["state_dict"]}
    assert prefixes == {"student", "projector"}
    n_state = sum(v.numel() for k, v in ckpt["state_dict"].items() if "relative_position_index" not in k)
    n_opt = sum(s["exp_avg"].numel() for s in ckpt["optimizer_states"][0]["state"].values())
    assert n_opt == n_state  # every trainable tensor is the student's or the projector's


def test_exported_student_loads_in_plain_timm_and_gives_the_same_output(distilled):
    run_dir, _ = distilled
    path = run_dir / "student.safetensors"
    meta = read_export_metadata(path)
    model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **meta["timm_kwargs"]).eval()
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    module = build_distillation(compose(["trainer=cpu"]))
    module.load_state_dict(ckpt["state_dict"], strict=False)
    module.student.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.forward_features(x), module.student.forward_features(x), atol=1e-6)
    assert meta["teacher"] == "tiny" and meta["timm_kwargs"]["use_shared_rel_pos_bias"] is True


class TeacherWatch(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        t = module.teacher
        self.seen.append((t.training, any(p.requires_grad or p.grad is not None for p in t.parameters())))


def test_teacher_stays_frozen_in_eval_and_outside_the_optimizer(tmp_path):
    cfg = compose([*TINY, *SMALL, "distill.max_steps=3"])
    module = build_distillation(cfg)
    data = ClassificationData(cfg.data, 16, fd_train_transform(32))
    watch = TeacherWatch()
    before = [p.clone() for p in module.teacher.parameters()]
    trainer = build_trainer(cfg, cfg.distill, tmp_path, callbacks=[watch])
    trainer.fit(module, datamodule=data)
    assert watch.seen and all(s == (False, False) for s in watch.seen)
    assert all(torch.equal(a, b) for a, b in zip(before, module.teacher.parameters()))
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.teacher.parameters()}
    assert "teacher" not in dict(module.named_children())


def test_shared_bias_table_is_decayed_like_the_official_code():
    module = build_distillation(compose(["trainer=cpu"]))
    from fdlight.optim import param_groups
    groups = param_groups([("student." + n, p) for n, p in module.student.named_parameters()], 0.05,
                          module.no_decay_keywords)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay_of["student.rel_pos_bias.relative_position_bias_table"] == 0.05
    assert decay_of["student.cls_token"] == 0.0 and decay_of["student.blocks.0.attn.q_bias"] == 0.0
    assert decay_of["student.blocks.0.gamma_1"] == 0.0 and decay_of["student.blocks.0.attn.qkv.weight"] == 0.05


def test_drop_path_sweep_runs_one_job_per_value(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_main(["-m", "drop_path.student=0.1,0.2", "distill.max_steps=2", *TINY, "data.num_train=64",
                    "distill.batch_size=16", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rates = []
    for job in ("0", "1"):
        cfg_text = (sweep / job / "config.yaml").read_text()
        rates.append(next(line for line in cfg_text.splitlines() if line.strip().startswith("student: 0.")))
        assert json.loads((sweep / job / "metrics.json").read_text())["steps"] == 2
        assert (sweep / job / "student.safetensors").is_file()
    assert [r.split(":")[1].strip() for r in rates] == ["0.1", "0.2"]


def test_a_killed_run_resumes_at_its_step_count(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "data.num_train=64", "distill.batch_size=8", "distill.epochs=6",
            "distill.checkpoint_every_n_steps=5", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fdlight", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 10 <= killed_at < 48 and not (run_dir / "metrics.json").exists()
    res = run_main([*args, "resume=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6 * 8
    # mid-epoch (as a rule): one fdlight line instead of Lightning's warning
    assert re.search(rf"^resuming at step {killed_at} of 48 \(epoch \d+ of 6\)$", res.stdout, re.M), res.stdout
    assert "ended before the epoch ended" not in res.stdout + res.stderr
    logs = list((run_dir / "logs").glob("*/metrics.csv"))  # one log for the run, each step once
    assert len(logs) == 1
    rows = [ln.split(",") for ln in logs[0].read_text().splitlines()]
    steps = [int(r[rows[0].index("step")]) for r in rows[1:] if r[rows[0].index("train/loss")]]
    assert steps == list(range(48))
