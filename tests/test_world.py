"""A run fits the machine it is given: the recipe's total batch is made up by gradient accumulation on whatever
processes the run has (the same optimizer steps, lrs and, with the same data order, weights on 1 or 2 gloo
processes), devices or nodes that are not there are one line before any process starts, and a rank whose peers never
come stops within trainer.init_timeout."""
from __future__ import annotations

import csv
import json
import logging
import socket
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose, run_cli, run_stage
from fdlight.errors import FDLightError
from fdlight.runs.world import accumulation, total_batch, world_size

RECIPE = "experiment=fd_pretrain__clip_vit_base__img224__300ep"
TORCHRUN = {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}


def one_error(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("devices, launcher, steps", [
    (1, {}, 16), (8, {}, 2),  # one process, eight
    (8, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 1),  # the paper's 2 nodes of 8, under torchrun
])
def test_the_recipe_keeps_the_papers_total_batch_on_any_world(devices, launcher, steps, monkeypatch):
    for k, v in ({**TORCHRUN, **launcher} if launcher else {}).items():
        monkeypatch.setenv(k, v)
    nodes = 2 if launcher else 1
    cfg = compose([RECIPE, "trainer=cpu", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
    t, d = cfg.trainer, cfg.distill
    assert (world_size(t), accumulation(t, d), total_batch(t, d)) == (devices * nodes, steps, 2048)


def test_nodes_or_devices_a_launcher_did_not_start_are_one_line(monkeypatch):
    cfg = compose([RECIPE, "trainer=cpu", "trainer.num_nodes=2"])
    with pytest.raises(FDLightError, match="trainer.num_nodes=2 asks for 2 nodes, but no multi-node launcher"):
        world_size(cfg.trainer)
    for k, v in {**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FDLightError, match="trainer.num_nodes=2, but torchrun started 4 processes, 4 a node; pass "
                                           "trainer.num_nodes=1"):
        world_size(cfg.trainer)
    cfg = compose([RECIPE, "trainer=cpu", "trainer.devices=2"])
    with pytest.raises(FDLightError, match="pass trainer.devices=4"):
        world_size(cfg.trainer)


def test_a_total_the_processes_cannot_make_up_is_one_line():
    cfg = compose([RECIPE, "trainer=cpu", "trainer.devices=3"])
    with pytest.raises(FDLightError, match=r"distill.total_batch_size=2048 is not a whole number of steps of "
                                           r"distill.batch_size=128 on 3 processes"):
        accumulation(cfg.trainer, cfg.distill)


def test_the_release_recipe_with_a_second_node_it_does_not_have_is_one_line_and_no_run(tmp_path):
    run = tmp_path / "run"
    res = run_cli([RECIPE, *TINY, "teacher=tiny", "student=tiny", "data=synthetic", "trainer.num_nodes=2",
                   f"hydra.run.dir={run}"], cwd=tmp_path, timeout=60)  # a process of its own: a regression starts ranks
    assert "trainer.num_nodes=2 asks for 2 nodes" in one_error(res)
    assert not run.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_whose_peer_never_comes_stops_within_the_init_timeout(tmp_path):
    # rank 0 of a 2-node torchrun job whose second node never starts
    port = free_port()
    env = {**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    start = time.monotonic()
    res = run_cli([*TINY, "trainer.strategy=ddp", "trainer.num_nodes=2", "trainer.init_timeout=2",
                   f"hydra.run.dir={run}"], cwd=tmp_path, timeout=120, env=env)
    line = one_error(res)
    assert f"world of 2 processes waited 2 s at 127.0.0.1:{port}" in line and "trainer.init_timeout" in line
    assert time.monotonic() - start < 60
    assert not run.exists()  # nothing trained: no run left behind


def log_rows(run) -> list[dict]:
    logs = list((run / "logs").glob("version_*/metrics.csv"))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.xdist_group("processes")
def test_one_and_two_gloo_processes_take_the_same_steps_lrs_and_weights(tmp_path, caplog):
    # a total batch of 16 in micro-batches of 8: 2 accumulated on one process, 1 on each of two; no drop path, so the
    # same images in each step give the same update (up to the order of the sums)
    args = [*TINY, "distill.total_batch_size=16", "distill.batch_size=8", "data.num_train=72", "distill.epochs=2",
            "distill.warmup_epochs=1", "drop_path.student=0.0", "distill.checkpoint_every_n_steps=0"]
    runs = {1: tmp_path / "one", 2: tmp_path / "two"}
    with caplog.at_level(logging.INFO, logger="fdlight"):
        run_stage([*args[len(TINY):], "distill.num_threads=1"], runs[1])  # one process: this one
    assert "total batch 16: 8 a device x 1 process x 2 accumulated" in caplog.messages
    res = run_cli([*args, "trainer.strategy=ddp", "trainer.devices=2", f"hydra.run.dir={runs[2]}"], cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "total batch 16: 8 a device x 2 processes x 1 accumulated" in res.stdout + res.stderr
    metrics = {n: json.loads((run / "metrics.json").read_text()) for n, run in runs.items()}
    assert metrics[1]["steps"] == metrics[2]["steps"] == 2 * (72 // 16)  # whole steps only: 8 images left each epoch
    lrs = {n: [(int(r["step"]), float(r["train/lr"])) for r in log_rows(run)] for n, run in runs.items()}
    assert lrs[1] == lrs[2] and len({lr for _, lr in lrs[1]}) > 2  # warmup, then cosine
    peak = max(lr for _, lr in lrs[1])
    cfg = compose(args)
    assert peak <= cfg.distill.base_lr * 16 / 512 * (1 + 1e-6)
    a, b = load_file(runs[1] / "student.safetensors"), load_file(runs[2] / "student.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert metrics[1]["last_loss"] < metrics[1]["first_loss"]  # it trained: the weights moved
