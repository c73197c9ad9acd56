"""Exact resume: a run killed with SIGKILL (mid-epoch, with data workers, or at an epoch boundary) and continued with
resume=true ends with the same weights, bit for bit, as the same run left alone; and the mechanism behind it (seeded
samples, a seeded epoch order that continues where the loop stopped, a loader that starts when asked for a batch)."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose, run_cli, run_main, run_stage
from fdlight.data.classification import ClassificationData
from fdlight.data.seeded import EpochSampler, SeededSamples, training_loader
from fdlight.data.transforms import fd_train_transform


# ------------------------------------------------------------------------------------------------- helpers
def checkpoint_step(path: Path) -> int | None:
    """The global step of a checkpoint file, or None while there is none (or it is still being written)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None


def train(args, run_dir: Path, env=None) -> str:
    """`python -m fdlight ARGS`, in this process unless `env` sets an environment of its own (DDP ranks)."""
    res = (run_cli if env else run_main)([*TINY, *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def signal_session(pid: int, sig: int) -> None:
    """Send `sig` to the session `pid` leads: the run and what it started (data workers, DDP ranks)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def kill_session(pid: int) -> None:
    """SIGKILL what is left of the session `pid` leads (data workers, DDP ranks)."""
    signal_session(pid, signal.SIGKILL)


def kill_when(args, run_dir: Path, ready, env=None) -> int:
    """Start `python -m fdlight ARGS`, SIGKILL it as soon as its last checkpoint's step satisfies `ready`, and return
    the step of the checkpoint it leaves behind. The processes it started (data workers, DDP ranks) are killed with
    it, as a scheduler kills a job."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "fdlight", *TINY, *args, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline, seen = time.time() + 300, None
    while proc.poll() is None and time.time() < deadline:
        # a look is a stat; the file is read only when a new one was renamed into place (a read takes milliseconds,
        # and a checkpoint that comes and goes between two looks is missed)
        with contextlib.suppress(FileNotFoundError):
            stat = last.stat()
            key = stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size
            if key != seen:
                step = checkpoint_step(last)
                seen = key if step is not None else None
                if step is not None and ready(step):
                    # stopped, the run cannot write the next checkpoint between this look and the kill (on a busy
                    # machine it did): kill it if the kept checkpoint is still a ready one, else let it go on. The
                    # run (its main process saves) is waited for until it has stopped: a signal is not a stop.
                    signal_session(proc.pid, signal.SIGSTOP)
                    os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
                    step = checkpoint_step(last)
                    if step is not None and ready(step):
                        os.kill(proc.pid, signal.SIGKILL)
                        kill_session(proc.pid)  # before the main process is reaped, so its group id is not reused
                        assert proc.wait() == -signal.SIGKILL
                        assert not (run_dir / "metrics.json").exists()
                        return step
                    signal_session(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    kill_session(proc.pid)
    raise AssertionError(f"the run ended (exit code {proc.wait()}) or ran out of time before it could be killed")


def logged_steps(run_dir: Path) -> list[int]:
    """The training steps of a run's CSV log, in file order (a resumed run continues the one file)."""
    logs = list((run_dir / "logs").glob("*/metrics.csv"))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    differ = {k: float((x[k].double() - y[k].double()).abs().max()) for k in x if not torch.equal(x[k], y[k])}
    assert not differ, f"{b.name}: {len(differ)} of {len(x)} tensors differ, by up to {max(differ.values()):.3g}"


def check_exact_resume(tmp_path, args, total: int, ready, outputs=("model.safetensors",),
                       reference: Path | None = None, env=None) -> int:
    """Kill a run where `ready` says, resume it, and compare its outputs with those of the run left alone; returns
    the step the resume started from."""
    if reference is None:
        reference = tmp_path / "reference"
        if env is None:  # the run left alone, in this process (a new process costs seconds of imports)
            run_stage(args, reference)
        else:
            train(args, reference, env)
    run_dir = tmp_path / "killed"
    killed_at = kill_when(args, run_dir, ready, env)
    assert 0 < killed_at < total
    out = train([*args, "resume=true"], run_dir, env)
    assert f"resuming at step {killed_at} of {total}" in out  # it continued, it did not start again
    assert logged_steps(run_dir) == list(range(total))  # one log: the replayed steps replaced the lost ones
    for name in outputs:
        assert_same_weights(reference / name, run_dir / name)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == total
    return killed_at


# ------------------------------------------------------------------------------------------------ end to end
# 128 images, 16 a batch: 8 steps an epoch, 4 epochs; a checkpoint every 4 steps, so at mid-epoch and at epoch ends.
DISTILL = ["data.num_train=128", "distill.batch_size=16", "distill.epochs=4", "distill.checkpoint_every_n_steps=4",
           "data.num_workers=2", "distill.num_threads=1"]


@pytest.fixture(scope="module")
def distill_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("distill") / "reference"
    run_stage(DISTILL, run_dir)  # left alone, in this process
    return run_dir


def test_distillation_killed_mid_epoch_with_data_workers_resumes_bit_for_bit(distill_reference, tmp_path):
    killed_at = check_exact_resume(tmp_path, DISTILL, 32, lambda step: step >= 12 and step % 8 == 4,
                                   ("student.safetensors",), distill_reference)
    assert killed_at % 8 == 4  # mid-epoch, after an epoch boundary


def test_distillation_killed_at_an_epoch_boundary_resumes_bit_for_bit(distill_reference, tmp_path):
    killed_at = check_exact_resume(tmp_path, DISTILL, 32, lambda step: 8 <= step < 32 and step % 8 == 0,
                                   ("student.safetensors",), distill_reference)
    assert killed_at % 8 == 0


@pytest.mark.xdist_group("processes")  # two processes at once: not beside another pair
def test_distillation_over_two_ddp_processes_resumes_bit_for_bit(tmp_path):
    # DDP over gloo on CPU processes, the code path of trainer=ddp on GPUs; 128 images, 16 a batch on each of 2
    # ranks: 4 steps an epoch, 4 epochs; checkpoints every 3 steps.
    args = ["trainer.strategy=ddp", "trainer.devices=2", "data.num_train=128", "distill.batch_size=16",
            "distill.epochs=4", "distill.checkpoint_every_n_steps=3", "data.num_workers=1"]
    killed_at = check_exact_resume(tmp_path, args, 16, lambda step: step >= 6 and step % 4 != 0,
                                   ("student.safetensors",), env={"OMP_NUM_THREADS": "1"})
    assert killed_at % 4 != 0


def test_fine_tuning_with_mixup_cutmix_drop_path_and_ema_resumes_bit_for_bit(tmp_path):
    cfg = compose(["stage=finetune"])
    assert cfg.finetune.mixup > 0 and cfg.finetune.cutmix > 0 and cfg.finetune.drop_path > 0  # the defaults mix
    # 64 images, 16 a batch: 4 steps an epoch, 5 epochs, validation after each; checkpoints every 3 steps.
    args = ["stage=finetune", "finetune.scratch=student", "data.num_train=64", "data.num_val=16",
            "finetune.batch_size=16", "finetune.epochs=5", "finetune.checkpoint_every_n_steps=3",
            "finetune.log_every_n_steps=1", "finetune.ema=0.9"]
    killed_at = check_exact_resume(tmp_path, args, 20, lambda step: step >= 6 and step % 4 != 0,
                                   ("model.safetensors", "model_ema.safetensors"))
    assert killed_at % 4 != 0


@pytest.mark.parametrize("stage, args", [
    ("segment", ["data.num_train=32", "data.num_val=4", "segment.batch_size=4", "segment.crop_size=32",
                 "segment.epochs=3"]),
    ("detect", ["data.num_train=16", "data.num_val=4", "detect.batch_size=2", "detect.epochs=3"]),
])
def test_dense_stages_killed_mid_epoch_resume_bit_for_bit(stage, args, tmp_path):
    # 8 steps an epoch, 3 epochs; checkpoints every 3 steps
    args = [f"stage={stage}", *args, f"{stage}.checkpoint_every_n_steps=3", f"{stage}.log_every_n_steps=1"]
    killed_at = check_exact_resume(tmp_path, args, 24, lambda step: step >= 9 and step % 8 != 0)
    assert killed_at % 8 != 0


# ------------------------------------------------------------------------------------------------ mechanism
@pytest.fixture(scope="module")
def dataset():
    """The embedded training set under the distillation augmentation (random crop and flip)."""
    data = ClassificationData(compose(["data.num_train=32"]).data, 4, fd_train_transform(32), seed=7)
    data.setup()
    return data.train_set


def epoch_batches(loader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_a_sample_depends_on_seed_epoch_and_index_not_on_the_worker_count(dataset):
    samples = SeededSamples(dataset, seed=7)
    sampler = EpochSampler(dataset, 4, seed=7)
    expected = torch.stack([samples[(0, i)][0] for i in sampler.order(0)]).split(4)
    for workers in (0, 2):
        got = epoch_batches(training_loader(dataset, 4, 7, workers))
        assert len(got) == len(expected) == 8
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"num_workers={workers}"


def test_another_epoch_or_seed_gives_another_sample_and_order(dataset):
    a, b = SeededSamples(dataset, seed=7), SeededSamples(dataset, seed=8)
    assert torch.equal(a[(0, 3)][0], a[(0, 3)][0])
    assert not torch.equal(a[(0, 3)][0], a[(1, 3)][0])
    assert not torch.equal(a[(0, 3)][0], b[(0, 3)][0])
    sampler = EpochSampler(dataset, 4, seed=7)
    assert sorted(sampler.order(0)) == sorted(sampler.order(1)) == list(range(32))
    assert sampler.order(0) != sampler.order(1)
    assert sampler.order(0) != EpochSampler(dataset, 4, seed=8).order(0)


def test_loading_a_sample_leaves_the_callers_generators_as_they_were(dataset):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state(), random.getstate()
    SeededSamples(dataset, seed=7)[(2, 5)]
    after = torch.get_rng_state(), np.random.get_state(), random.getstate()
    assert torch.equal(before[0], after[0])
    assert all(np.array_equal(x, y) for x, y in zip(before[1], after[1]))
    assert before[2] == after[2]


def test_a_resumed_epoch_continues_the_same_order_after_the_batches_already_drawn(dataset):
    drawn = {"batches": 8 + 3}  # epoch 1, three batches in
    sampler = EpochSampler(dataset, 4, seed=7, drawn=lambda: drawn["batches"])
    assert list(sampler) == [(1, i) for i in sampler.order(1)[12:]]
    drawn["batches"] = 16  # the end of epoch 1 is the start of epoch 2
    assert list(sampler) == [(2, i) for i in sampler.order(2)]


def test_processes_share_an_epoch_without_overlap(dataset):
    shards = [EpochSampler(dataset, 4, seed=7, num_replicas=3, rank=r) for r in range(3)]
    orders = [s.order(0) for s in shards]
    assert all(len(o) == 11 for o in orders)  # 32 images padded to 33 for 3 processes
    assert len(shards[0]) == 8  # of which an epoch takes whole batches: 2 of 4
    assert set(sum(orders, [])) == set(range(32))  # every image, and (33 slots) one of them twice


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_reads_its_position_when_the_first_batch_is_asked_for(dataset, workers):
    drawn = {"batches": 0}
    loader = training_loader(dataset, 4, 7, workers)
    loader.sampler.drawn = lambda: drawn["batches"]
    iterator = iter(loader)  # Lightning does this before it restores a checkpoint's loop state
    drawn["batches"] = 8 + 5
    x, _ = next(iterator)
    order = loader.sampler.order(1)
    assert torch.equal(x, torch.stack([SeededSamples(dataset, 7)[(1, i)][0] for i in order[20:24]]))
