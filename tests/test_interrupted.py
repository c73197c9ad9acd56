"""Runs stopped from outside, with real processes and real signals: one process per run directory (a second command
on it, here run in the test's own process, is refused naming the first; a killed one's lock goes with it), Ctrl-C says
which step the kept checkpoint holds, a run killed before its first checkpoint starts again from step 0 with
resume=true and ends as if never stopped, and a run killed between a checkpoint and its step's row gets the row back:
its CSV log one file with every step once."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_main, run_stage
from fdlight.runs.directory import LOCK, exclusive
from test_resume import assert_same_weights, checkpoint_step, kill_session, logged_steps, signal_session

# a run long enough to be caught training: a checkpoint every 2 steps, thousands of steps in all
LONG = [*TINY, "data.num_train=64", "distill.batch_size=8", "distill.epochs=1000", "distill.checkpoint_every_n_steps=2",
        "distill.num_threads=1"]


def start(args, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fdlight", *args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=as_from_a_terminal)


def as_from_a_terminal() -> None:
    """Ctrl-C delivered with its default action, as a shell starts a command: a child inherits an ignored or blocked
    SIGINT (Lightning ignores SIGINT in a process once it has handled one), and Python then leaves it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 300
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            kill_session(proc.pid)
            raise AssertionError(f"the run ended or ran out of time before {what}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.02)


def one_error(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.mark.xdist_group("processes")
def test_a_second_process_on_a_training_run_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    first = start(LONG, run)
    try:
        wait_for(first, lambda: checkpoint_step(run / "checkpoints" / "last.ckpt") is not None, "its first checkpoint")
        line = one_error(run_main([*LONG, "resume=true", f"hydra.run.dir={run}"], cwd=tmp_path))
        assert f"run directory {run} is being trained by another process (pid {first.pid})" in line
        assert first.poll() is None  # the first one trains on
    finally:
        os.kill(first.pid, signal.SIGKILL)
        kill_session(first.pid)
        first.wait()
    # the kernel released the killed process's lock with it: its file is still there, and this process takes it
    assert (run / LOCK).read_text().strip() == str(first.pid)
    with exclusive(run):
        assert (run / LOCK).read_text().strip() == str(os.getpid())
    assert not (run / LOCK).exists()


def test_ctrl_c_says_which_step_the_kept_checkpoint_holds_and_resume_continues_one_log(tmp_path):
    run, args = tmp_path / "run", [*LONG, "distill.max_steps=150"]
    proc = start(args, run)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(proc, lambda: (checkpoint_step(last) or 0) >= 4, "its checkpoint of step 4")
    # the run is stopped while its Ctrl-C is sent: on a busy machine it could otherwise finish its 150 steps first
    signal_session(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGINT)
    signal_session(proc.pid, signal.SIGCONT)
    out = proc.communicate(timeout=120)[0]
    kill_session(proc.pid)
    kept = checkpoint_step(last)
    said = [ln for ln in out.splitlines() if ln.startswith("stopped at step")]
    assert len(said) == 1, out[-3000:]
    assert said[0].endswith(f"{last} holds step {kept}, and resume=true continues from it")
    assert "KeyboardInterrupt" not in out  # Lightning's own shutdown notice goes to the log file only
    assert not (run / "metrics.json").exists()
    res = run_main([*args, "resume=true", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0 and f"resuming at step {kept} of 150" in res.stdout, res.stderr[-3000:]
    assert logged_steps(run) == list(range(150))  # the steps logged after the checkpoint were replaced, not repeated


def test_ctrl_c_during_a_save_names_the_step_the_file_holds(tmp_path, caplog):
    """Ctrl-C that lands inside a checkpoint's save, after the file was renamed into place but before the save
    returned, must name the step the file holds, not the save before."""
    import lightning as L

    from fdlight.runs.callbacks import RunCheckpoint

    callback = RunCheckpoint(tmp_path / "checkpoints", every_n_train_steps=4)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 8, "state_dict": {"w": torch.zeros(3)}}, tmp_path / "checkpoints" / "last.ckpt")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="fdlight"):
        callback.on_exception(trainer, None, KeyboardInterrupt())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped at step")]
    assert said == [f"stopped at step 0; {tmp_path / 'checkpoints' / 'last.ckpt'} holds step 8, and resume=true "
                    f"continues from it"]


def test_a_run_killed_before_its_first_checkpoint_starts_again_and_ends_as_if_never_stopped(tmp_path):
    args = [*TINY, "data.num_train=64", "distill.batch_size=8", "distill.epochs=2",
            "distill.checkpoint_every_n_steps=0", "distill.num_threads=1"]
    reference = tmp_path / "reference"
    run_stage(args[len(TINY):], reference)  # the same run left alone (in this process)
    run = tmp_path / "run"
    proc = start(args, run)
    wait_for(proc, lambda: (run / "config.yaml").is_file(), "its config.yaml")
    os.kill(proc.pid, signal.SIGKILL)
    kill_session(proc.pid)
    proc.wait()
    assert not (run / "checkpoints" / "last.ckpt").exists() and not (run / "metrics.json").exists()
    res = run_main([*args, "resume=true", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [ln for ln in (res.stdout + res.stderr).splitlines() if "before its first checkpoint" in ln]
    assert len(said) == 1 and said[0].endswith("training it again from step 0 with its own settings"), said
    assert_same_weights(reference / "student.safetensors", run / "student.safetensors")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == json.loads((reference / "metrics.json").read_text())["steps"] == 16
    assert logged_steps(run) == list(range(16))



def test_a_run_killed_between_a_checkpoint_and_its_steps_row_writes_the_row_back(tmp_path):
    """Lightning writes a step's CSV row after the step's checkpoint, so a process killed in between (while the
    checkpoint's folder is synced, or in the epoch's validation) leaves a checkpoint of step 3 and a log without the
    row of step 2. The state such a kill leaves is made exactly: a 3-step run, checkpointed at step 3 in its last
    step, without its row of step 2 and without what a finished run writes; resumed for 6 steps."""
    run = tmp_path / "run"
    args = ["data.num_train=64", "distill.batch_size=16", "distill.checkpoint_every_n_steps=3",
            "distill.num_threads=1"]
    run_stage([*args, "distill.max_steps=3"], run)
    log = next((run / "logs").glob("*/metrics.csv"))
    lines = log.read_text().splitlines()
    header, rows = lines[0].split(","), lines[1:]
    step_col, loss_col = header.index("step"), header.index("train/loss")
    row_2 = next(r for r in rows if r.split(",")[step_col] == "2" and r.split(",")[loss_col])
    log.write_text("\n".join([lines[0], *(r for r in rows if r != row_2)]) + "\n")
    for name in ("metrics.json", "student.safetensors"):
        (run / name).unlink()
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 3 and logged_steps(run) == [0, 1]

    res = run_main([*TINY, *args, "distill.max_steps=6", "resume=true", "resume_allow_changes=true",
                    f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0 and "resuming at step 3 of 6" in res.stdout, res.stderr[-3000:]
    assert logged_steps(run) == list(range(6))  # each step once: step 2's row written back, in its place
    assert row_2 in log.read_text().splitlines()  # the very row the kill lost


def test_a_run_killed_after_its_last_checkpoint_writes_what_it_would_have(tmp_path):
    """Killed after the checkpoint of its final step and before its exports: the resume trains nothing and writes
    the exports with the losses of the run, not "n/a" (the state such a kill leaves is made exactly, as above)."""
    run = tmp_path / "run"
    args = ["data.num_train=48", "distill.batch_size=16", "distill.epochs=1", "distill.checkpoint_every_n_steps=3",
            "distill.num_threads=1"]
    whole = run_stage(args, run)
    for name in ("metrics.json", "student.safetensors"):
        (run / name).unlink()
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 3

    res = run_main([*TINY, *args, "resume=true", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step 3 of 3: every step is trained" in res.stdout and "epoch 2 of 1" not in res.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["steps"], metrics["first_loss"], metrics["last_loss"]) == (3, whole["first_loss"],
                                                                              whole["last_loss"])
    assert logged_steps(run) == [0, 1, 2] and (run / "student.safetensors").is_file()
