"""Loggers, the FSDP preset on a machine without GPUs, and `python -m fdlight` from a plain (non-editable) install."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, run_cli, run_stage
from fdlight.errors import FDLightError
from fdlight.runs.trainer import build_strategy

REPO = Path(__file__).resolve().parents[1]


def test_wandb_logger_runs_offline_and_writes_its_run(tmp_path):
    run_stage(["logger=wandb", "data.num_train=32", "distill.batch_size=16", "distill.max_steps=2"], tmp_path / "r")
    # TINY puts logger=csv first; the later logger=wandb wins
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


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
