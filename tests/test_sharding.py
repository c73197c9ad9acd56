"""What FSDP changes, checked with real FSDP over two CPU processes (gloo): weight-decay groups of flattened
parameters, and the gathered weights that the stages export."""
from __future__ import annotations

import csv
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import TINY, compose, run_cli, run_stage
from fdlight.models.students import block_classes, build_student
from fdlight.optim import original_ndims, param_groups
from fdlight.runs.gather import full_state_dict


class Pair(nn.Module):
    """The distillation module's trainable layout: student.* and projector.*."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.student = build_student(compose(["student=tiny"]).student, drop_path=0.1)
        self.projector = nn.Linear(64, 48)


def decay_of(groups):
    return {n: g["weight_decay"] for g in groups for n in g["names"]}


def shard_and_check(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = Pair()
    reference = {k: v.clone() for k, v in model.student.state_dict().items()}
    expected = decay_of(param_groups(model.named_parameters(), 0.05, ("pos_embed", "cls_token")))
    ndims = original_ndims(model)
    wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(block_classes(compose([]).student)),
                   use_orig_params=True, device_id=torch.device("cpu"))
    named = list(wrapped.named_parameters())
    flat = all(p.ndim <= 1 for _, p in named)
    with_shapes = decay_of(param_groups(named, 0.05, ("pos_embed", "cls_token"), ndims=ndims))
    without = decay_of(param_groups(named, 0.05, ("pos_embed", "cls_token")))
    state = full_state_dict(wrapped, "student.", sharded=True)  # collective: both ranks call it
    if rank == 0:
        same = set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
        result = dict(flat=flat, fixed=with_shapes == expected, naive_decays=sum(v > 0 for v in without.values()),
                      expected_decays=sum(v > 0 for v in expected.values()), gathered=same)
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("processes")  # two processes at once: not beside another pair
def test_fsdp_keeps_weight_decay_groups_and_gathers_full_weights(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(shard_and_check, args=(free_port(), str(out)), nprocs=2, join=True)
    r = json.loads(out.read_text())
    assert r["flat"]  # FSDP shards really are 1-D: a shape rule alone would see only biases
    assert r["naive_decays"] == 0 and r["expected_decays"] > 0
    assert r["fixed"]  # with the shapes recorded before wrapping, every parameter keeps its decay
    assert r["gathered"]  # rank 0 exports the full, unsharded student


def test_sweep_with_a_multi_gpu_trainer_is_refused_in_one_line(tmp_path):
    res = run_cli(["-m", "trainer=ddp", "drop_path.student=0.1,0.2", f"hydra.sweep.dir={tmp_path / 's'}"],
                  cwd=tmp_path)  # a process of its own: a regression would start DDP ranks
    lines = [l for l in res.stderr.splitlines() if l.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "trainer.devices=1" in lines[0]


@pytest.mark.xdist_group("processes")  # two processes at once: not beside another pair
def test_ddp_over_two_cpu_processes_trains_one_run_with_the_global_batch(tmp_path):
    """The same DDP code path as trainer=ddp on GPUs, over gloo: the data is split between the ranks, the lr is scaled
    by the global batch, and rank 0 alone writes the run (the second process must not refuse the run directory)."""
    run = tmp_path / "ddp"
    res = run_cli(["trainer.strategy=ddp", "trainer.devices=2", "distill.epochs=2", f"hydra.run.dir={run}"],
                  cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = compose([])
    metrics = json.loads((run / "metrics.json").read_text())
    global_batch = 2 * cfg.distill.batch_size
    assert metrics["steps"] == 2 * (cfg.data.num_train // global_batch)  # each rank saw half the data per epoch
    assert metrics["last_loss"] < metrics["first_loss"]
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        lrs = [float(row["train/lr"]) for row in csv.DictReader(f) if row["train/lr"]]
    assert abs(max(lrs) / (cfg.distill.base_lr * global_batch / 512) - 1) < 0.01
    assert sorted(p.name for p in run.iterdir() if p.suffix in (".safetensors", ".json")) == [
        "metrics.json", "student.safetensors"]
    assert list((run / "checkpoints").iterdir()) == [run / "checkpoints" / "last.ckpt"]
    # monitor=knn: each rank embedded its share of the images; gathered, the seeded student's first point and the
    # teacher's number are those of one process
    one = run_stage(["distill.max_steps=1"], tmp_path / "one")["monitor"]
    assert metrics["monitor"]["knn"][0]["top1"] == pytest.approx(one["knn"][0]["top1"])
    assert metrics["monitor"]["teachers"]["teacher"]["top1"] == pytest.approx(one["teachers"]["teacher"]["top1"])
    assert [e["step"] for e in metrics["monitor"]["knn"]] == [0, metrics["steps"]]  # every 2 epochs, and the end


@pytest.mark.xdist_group("processes")  # two processes at once: not beside another pair
def test_ddp_segmentation_on_cpus_keeps_batchnorm_per_process_and_writes_one_run(tmp_path):
    """SyncBatchNorm is CUDA-only in PyTorch: on CPU processes the recipe's BatchNorm keeps per-process statistics,
    and the stage still trains, validates over both ranks and writes its artifacts once."""
    run = tmp_path / "seg"
    res = run_cli(["stage=segment", "segment.max_steps=2", "segment.batch_size=2", "segment.num_vis=2",
                   "data.num_val=4", "trainer.strategy=ddp", "trainer.devices=2", f"hydra.run.dir={run}"],
                  cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["val/mIoU"] <= 1
    assert (run / "model.safetensors").is_file() and (run / "predictions.png").is_file()
