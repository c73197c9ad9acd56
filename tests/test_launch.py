"""Cluster launch through hydra-submitit-launcher: the shipped SLURM preset takes its layout from the config, and a
drop-path sweep runs end to end through submitit's local executor, one job and one run directory per value."""
from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY, run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'fdlight[slurm]'")


def test_the_slurm_preset_asks_for_one_task_per_gpu_on_the_trainers_nodes():
    from fdlight.config import compose

    cfg = compose(["hydra/launcher=fdlight_slurm", "trainer=ddp", "trainer.num_nodes=4",
                   "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"], with_hydra=True)
    launcher = instantiate(cfg.hydra.launcher)  # the launcher Hydra builds for -m (submitting needs SLURM)
    params = launcher.params
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (4, 4, 4)
    assert params["partition"] == "gpu" and params["timeout_min"] == 4320


@pytest.mark.xdist_group("processes")  # two processes at once: not beside another pair
def test_a_drop_path_sweep_runs_as_two_local_submitit_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", "hydra/launcher=submitit_local", "drop_path.student=0.1,0.2", *TINY, "data.num_train=64",
                   "distill.batch_size=16", "distill.max_steps=2", f"hydra.sweep.dir={sweep}",
                   "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"], cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for job, rate in (("0", 0.1), ("1", 0.2)):
        run = sweep / job
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["stage"] == "distill"
        assert OmegaConf.load(run / "config.yaml").drop_path.student == rate
        assert (run / "student.safetensors").is_file()
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2 and all("Exiting after successful completion" in p.read_text() for p in logs)
