"""Loggers, the console (plain progress lines in a file, library chatter in the run's log only), the FSDP preset on a
machine without GPUs, and `python -m fdlight` from a plain (non-editable) install."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, run_cli, run_stage
from fdlight import console
from fdlight.errors import FDLightError
from fdlight.runs.callbacks import LineProgress, ProgressBar, progress_display
from fdlight.runs.trainer import build_strategy

REPO = Path(__file__).resolve().parents[1]


def test_wandb_logger_runs_offline_and_writes_its_run(tmp_path):
    run_stage(["logger=wandb", "data.num_train=32", "distill.batch_size=16", "distill.max_steps=2"], tmp_path / "r")
    # TINY puts logger=csv first; the later logger=wandb wins
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_console_of_a_wandb_run_in_a_file_is_plain_and_readable(tmp_path):
    """stdout to a file (as in CI): one plain line per progress update, no colour codes, no W&B notice about an
    unused setting; Lightning's notices that fdlight's lines cover stay in fdlight.log."""
    run_dir = tmp_path / "r"
    res = run_cli([*TINY, "logger=wandb", "data.num_train=64", "distill.batch_size=16", "distill.epochs=2",
                   f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"WANDB_SILENT": "false"})  # W&B speaks
    assert res.returncode == 0, res.stderr[-2000:]
    out, both = res.stdout, res.stdout + res.stderr
    progress = [line for line in out.splitlines() if "train/loss" in line]
    assert [line.split("  ")[0] for line in progress] == ["epoch 1/2", "epoch 2/2"]
    assert " step 4/8 " in progress[0] and " step 8/8 " in progress[1]
    assert not [line for line in out.splitlines() if line.startswith(" ")] and "━" not in out  # no wrapped bar
    assert "\x1b[" not in both and "anonymous" not in both
    assert "GPU available:" not in out and "stepping batches" not in out and "`Trainer.fit` stopped" not in out
    assert "Run history" not in both and "Run summary" not in both  # W&B's tables: quiet
    assert out.splitlines()[-2].endswith(f"artifacts in {run_dir}: student.safetensors, student/, "
                                         f"checkpoints/last.ckpt, metrics.json")
    assert out.splitlines()[-1].startswith(f"W&B (offline): `wandb sync {run_dir / 'wandb'}/offline-run-")
    log = (run_dir / "fdlight.log").read_text()
    assert "stepping batches" in log and "`Trainer.fit` stopped: `max_epochs=2` reached" in log
    assert "GPU available:" in log


def test_progress_is_a_live_bar_on_a_terminal_and_plain_lines_elsewhere():
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert isinstance(progress_display(terminal), ProgressBar)
    finally:
        os.close(leader)
        os.close(follower)
    assert isinstance(progress_display(io.StringIO()), LineProgress)


@pytest.fixture
def hydra_like_logging(tmp_path):
    """The root logger as Hydra's job logging leaves it: INFO, a console stream handler and the run's log file."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream, log_file = io.StringIO(), tmp_path / "fdlight.log"
    handlers = [logging.StreamHandler(stream), logging.FileHandler(log_file)]
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    yield stream, log_file
    for h in handlers:
        h.close()
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def test_coco_tables_go_to_the_log_file_only(hydra_like_logging):
    from fdlight.modules.detect import new_map_metric

    stream, log_file = hydra_like_logging
    console.route_library_logs()
    metric = new_map_metric()
    box = torch.tensor([[2.0, 2.0, 20.0, 20.0]])
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 2:20, 2:20] = True
    metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "masks": mask}],
                  [{"boxes": box, "labels": torch.tensor([1]), "masks": mask}])
    result = metric.compute()
    assert float(result["bbox_map"]) == pytest.approx(1.0) and float(result["segm_map"]) == pytest.approx(1.0)
    logging.getLogger("fdlight").info("detection: box mAP 100.00%")
    assert stream.getvalue() == "detection: box mAP 100.00%\n"
    text = log_file.read_text()
    assert text.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2  # bbox, segm


def test_device_lines_go_to_the_log_file_and_machine_advice_reaches_the_console_once(hydra_like_logging,
                                                                                     monkeypatch):
    import lightning as L

    stream, log_file = hydra_like_logging
    monkeypatch.setattr(console, "_shown_once", set())  # a new process
    console.setup()
    console.route_library_logs()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for _ in range(2):  # two stages of one pipeline
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
        rank_zero.info("You are using a CUDA device ('H100') that has Tensor Cores.")
    assert stream.getvalue() == "You are using a CUDA device ('H100') that has Tensor Cores.\n"
    assert log_file.read_text().count("GPU available: False") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_fsdp_preset_without_gpu_says_what_to_use():
    cfg = compose(["trainer=fsdp"])
    with pytest.raises(FDLightError, match="trainer=fsdp shards over CUDA GPUs and none is visible"):
        build_strategy(cfg.trainer, {torch.nn.Linear})


def test_wheel_carries_the_configs_and_runs_from_a_plain_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                            str(wheel_dir), str(REPO)], check=True, capture_output=True, text=True)
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr  # a conf folder unlisted
    wheel = next(wheel_dir.glob("fdlight-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    configs = {f"fdlight/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert "fdlight/conf/teacher/clip_vitl.yaml" in configs and configs <= set(names)
    src = REPO / "src" / "fdlight"
    code = {f"fdlight/{p.relative_to(src).as_posix()}" for p in src.rglob("*.py")}
    assert "fdlight/runs/template.py" in code and code <= set(names), sorted(code - set(names))  # every subpackage
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import fdlight.conf; print(fdlight.conf.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))
    res = subprocess.run([sys.executable, "-m", "fdlight", "--cfg", "job", "teacher=clip_vitl"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-1500:]
    assert "vit_large_patch14_clip_quickgelu_224.openai" in res.stdout
