"""hydra/launcher=shared_teacher: a `-m` distillation sweep trained as one process (one data stream, one teacher
forward per batch) whose jobs equal separate runs of the same settings, each job's directory holding what its
separate run writes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_main
from test_distill_errors import write_imagefolder
from fdlight.models.weights import read_export_metadata
from fdlight.modules.base import FIRST_LOSS_KEY
from fdlight.modules.distill import FIRST_LOSSES_KEY
from fdlight.modules.shared import split_checkpoint
from fdlight.sweeps.shared_teacher import COMMIT, JobCheckpoints, pending, settle

# 64 images, 16 a batch: 4 steps an epoch, 4 epochs; a checkpoint every 2 steps.
SHORT = ["trainer=cpu", "logger=csv", "data.num_train=64", "distill.batch_size=16", "distill.epochs=4",
         "distill.checkpoint_every_n_steps=2", "distill.num_threads=1", "data.num_workers=0"]
SHARED = "hydra/launcher=shared_teacher"
STEPS = 16


def sweep(values: list[str], sweep_dir: Path, *extra: str, flags=(), run=run_main) -> subprocess.CompletedProcess:
    """The sweep's command, in this process (run=run_cli: in a process of its own, as DDP ranks need)."""
    return run(["-m", *flags, SHARED, *SHORT, *values, f"hydra.sweep.dir={sweep_dir}", *extra], sweep_dir.parent)


def separate(overrides: list[str], run_dir: Path, *extra: str, flags=(), run=run_main) -> subprocess.CompletedProcess:
    res = run([*flags, *SHORT, *overrides, f"hydra.run.dir={run_dir}", *extra], run_dir.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A K=2 drop-path sweep through the shared-teacher launcher, and the two separate runs of its jobs."""
    root = tmp_path_factory.mktemp("shared")
    res = sweep(["drop_path.student=0.1,0.3"], root / "sweep")
    assert res.returncode == 0, res.stderr[-3000:]
    for rate in ("0.1", "0.3"):
        separate([f"drop_path.student={rate}"], root / f"separate_{rate}")
    return root


def test_each_job_equals_its_separate_run(swept):
    for job, rate in (("0", "0.1"), ("1", "0.3")):
        job_dir, run_dir = swept / "sweep" / job, swept / f"separate_{rate}"
        assert max_difference(job_dir / "student.safetensors", run_dir / "student.safetensors") <= 1e-6
        a, b = checkpoint(job_dir / "checkpoints/last.ckpt"), checkpoint(run_dir / "checkpoints/last.ckpt")
        assert a.keys() == b.keys() and a["global_step"] == b["global_step"] == STEPS
        for name, value in b["state_dict"].items():
            assert torch.allclose(a["state_dict"][name], value, atol=1e-6, rtol=0), name
        moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(a["optimizer_states"][0]["state"].values(),
                                                                  b["optimizer_states"][0]["state"].values())]
        assert moments and all(torch.allclose(x, y, atol=1e-6, rtol=0) for x, y in moments)
        assert a["lr_schedulers"] == b["lr_schedulers"]
        assert (job_dir / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
        mine, theirs = (json.loads((d / "metrics.json").read_text()) for d in (job_dir, run_dir))
        assert mine["first_loss"] == pytest.approx(theirs["first_loss"], abs=1e-6)
        assert mine["last_loss"] == pytest.approx(theirs["last_loss"], abs=1e-6)
        assert mine["shared_teacher"] == {"job": int(job), "jobs": 2} and mine["steps"] == STEPS
        # each job its own k-NN curve (monitor=knn), that of its separate run
        assert [e["step"] for e in mine["monitor"]["knn"]] == [e["step"] for e in theirs["monitor"]["knn"]]
        assert [e["top1"] for e in mine["monitor"]["knn"]] == pytest.approx([e["top1"] for e in
                                                                              theirs["monitor"]["knn"]], abs=1e-6)
        assert mine["monitor"]["teachers"]["teacher"]["top1"] == theirs["monitor"]["teachers"]["teacher"]["top1"]
    # the two jobs did train differently (a sweep that ignored the override would pass the checks above only once)
    assert max_difference(swept / "sweep/0/student.safetensors", swept / "sweep/1/student.safetensors") > 0.0


def test_each_job_directory_holds_what_a_run_writes(swept):
    assert (swept / "sweep" / "multirun.yaml").is_file()  # Hydra's own sweep record
    for job in ("0", "1"):
        d = swept / "sweep" / job
        for name in ("checkpoints/last.ckpt", "student.safetensors", "metrics.json", "config.yaml", "fdlight.log"):
            assert (d / name).is_file(), name
        assert not list((d / "checkpoints").glob(".*"))  # no pending checkpoint or commit mark left
        log = (d / "fdlight.log").read_text()  # its own closing line, not the other job's
        assert f"artifacts in {d}:" in log and f"artifacts in {d.parent / ('1' if job == '0' else '0')}:" not in log
        rows = (d / "logs/version_0/metrics.csv").read_text().splitlines()
        theirs = (swept / "separate_0.1/logs/version_0/metrics.csv").read_text().splitlines()
        assert rows[0] == theirs[0] and "train/loss" in rows[0] and len(rows) > 4  # the columns a separate run logs
        meta = read_export_metadata(d / "student.safetensors")
        model = timm.create_model(meta["timm_model"], pretrained=True, **meta["timm_kwargs"],
                                  pretrained_cfg_overlay=dict(file=str(d / "student.safetensors")))
        assert model(torch.randn(1, 3, 32, 32)).isfinite().all()


def test_a_jobs_checkpoint_continues_as_a_separate_run(swept, tmp_path):
    run_dir = tmp_path / "continued"
    shutil.copytree(swept / "sweep" / "1", run_dir)
    separate(["drop_path.student=0.3"], run_dir, "resume=true", "distill.epochs=5", "resume_allow_changes=true")
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == STEPS + 4


def test_a_killed_sweep_resumes_bit_for_bit(swept, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "fdlight", "-m", SHARED, *SHORT, "drop_path.student=0.1,0.3",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = sweep_dir / "1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not last.is_file():
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert not (sweep_dir / "0" / "metrics.json").exists()
    res = sweep(["drop_path.student=0.1,0.3"], sweep_dir, "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step" in res.stdout + res.stderr
    for job in ("0", "1"):
        assert max_difference(sweep_dir / job / "student.safetensors",
                              swept / "sweep" / job / "student.safetensors") == 0.0
    again = sweep(["drop_path.student=0.1,0.3"], sweep_dir, "resume=true")  # complete: nothing to do
    assert again.returncode == 0 and "complete" in again.stdout + again.stderr


@pytest.mark.xdist_group("processes")  # two processes at once: not beside another pair
def test_under_ddp_each_rank_holds_every_student_and_the_jobs_equal_separate_ddp_runs(tmp_path):
    # DDP over gloo on two CPU processes, the code path of trainer=ddp on GPUs
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "distill.epochs=2"]
    res = sweep(["drop_path.student=0.1,0.3", *ddp], tmp_path / "sweep", run=run_cli)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]
    separate(["drop_path.student=0.3", *ddp], tmp_path / "separate", run=run_cli)  # job 1's (job 0's: the default's)
    assert max_difference(tmp_path / "sweep/1/student.safetensors", tmp_path / "separate/student.safetensors") <= 1e-6
    for job in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["steps"] == 4  # 64 / (2 x 16)


STUDENT = """defaults:
  - tiny
  - _self_
name: tiny_deep
kwargs:
  depth: 3
"""


def test_students_of_another_shape_and_one_wandb_run_per_job(tmp_path):
    (tmp_path / "conf" / "student").mkdir(parents=True)
    (tmp_path / "conf" / "student" / "tiny_deep.yaml").write_text(STUDENT)
    own = ["--config-dir", str(tmp_path / "conf")]
    res = sweep(["student=tiny,tiny_deep"], tmp_path / "sweep", "logger=wandb", flags=own)
    assert res.returncode == 0, res.stderr[-3000:]
    separate(["student=tiny_deep"], tmp_path / "deep", flags=own)
    assert max_difference(tmp_path / "sweep/1/student.safetensors", tmp_path / "deep/student.safetensors") <= 1e-6
    depths = [read_export_metadata(tmp_path / f"sweep/{j}/student.safetensors")["timm_kwargs"]["depth"]
              for j in ("0", "1")]
    assert depths == [2, 3]
    runs = [list((tmp_path / f"sweep/{j}/wandb").glob("offline-run-*")) for j in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].name.split("-")[-1] != runs[1][0].name.split("-")[-1]


@pytest.mark.parametrize("values, named", [
    (["distill.batch_size=8,16"], "distill.batch_size"),
    (["seed=0,1"], "distill.student_seed"),
    (["drop_path=symmetric", "drop_path.student=0.1,0.2"], "drop_path.teacher"),
    (["student.img_size=32,64"], "student.img_size"),
    (["teacher=tiny,tiny_b"], "teacher= must be the same"),  # the group the user swept, not a key it sets
    (["student=tiny,nope"], "unknown student 'nope'"),
])
def test_a_sweep_that_cannot_share_the_teacher_is_one_line_and_leaves_nothing(values, named, tmp_path):
    res = sweep(values, tmp_path / "sweep")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("fdlight: error:") and named in lines[-1] and "Traceback" not in res.stderr
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------ the K files change together
def fake_checkpoint(step: int) -> dict:
    """A sweep checkpoint of two students in the layout SharedTeacherDistillation saves."""
    return {"global_step": step, "state_dict": {f"students.{k}.w": torch.full((2,), float(step + k)) for k in (0, 1)},
            "optimizer_states": [{"students": [{"k": 0}, {"k": 1}]}],
            "lr_schedulers": [{"students": [{"k": 0}, {"k": 1}]}],
            FIRST_LOSS_KEY: [1.0, 2.0], FIRST_LOSSES_KEY: [{}, {}]}


def steps(dirs) -> list[int]:
    return [checkpoint(d / "checkpoints/last.ckpt")["global_step"] for d in dirs]


def test_a_kill_between_the_jobs_files_never_leaves_them_at_different_steps(tmp_path):
    dirs = [tmp_path / "0", tmp_path / "1"]
    lead = dirs[0] / "checkpoints"
    io = JobCheckpoints(dirs)
    io.save_checkpoint(fake_checkpoint(4), lead / "last.ckpt")
    assert steps(dirs) == [4, 4] and checkpoint(dirs[1] / "checkpoints/last.ckpt")["state_dict"]["w"][0] == 5

    # killed during the renames, after the commit mark: job 0 holds step 8, job 1 step 4 and its pending step 8
    paths = [d / "checkpoints/last.ckpt" for d in dirs]
    for k, p in enumerate(paths):
        torch.save(split_checkpoint(fake_checkpoint(8), k), pending(p))
    (lead / COMMIT).write_text("\n".join(map(str, paths)))
    os.replace(pending(paths[0]), paths[0])
    assert steps(dirs) == [8, 4]
    settle(dirs)
    assert steps(dirs) == [8, 8] and not (lead / COMMIT).exists()
    assert io.load_checkpoint(lead / "last.ckpt")["state_dict"]["students.1.w"][0] == 9

    # killed while the next files were written, before the mark: every job keeps the checkpoint before
    torch.save(fake_checkpoint(12), pending(dirs[0] / "checkpoints/last.ckpt"))
    settle(dirs)
    assert steps(dirs) == [8, 8] and not list(lead.glob(".*"))


def test_a_stage_other_than_distill_or_a_missing_dash_m_is_refused(tmp_path):
    res = run_main(["-m", "stage=finetune", "finetune.epochs=1", SHARED, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                   tmp_path)
    assert res.returncode == 2 and "stage=finetune" in res.stderr.splitlines()[-1]
    assert not (tmp_path / "sweep").exists()
    res = run_main(["drop_path.student=0.1", SHARED, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert res.returncode == 2 and "add -m" in res.stderr.splitlines()[-1] and not (tmp_path / "run").exists()


def test_a_refused_command_leaves_an_existing_sweep_as_it_was(swept, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(swept / "sweep", sweep_dir)
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    for values, extra, named in ((["drop_path.student=0.1,0.3,0.5"], ["resume=true"], "job 2"),  # one job more
                                 (["drop_path.student=0.1,0.4"], [], "already holds a run")):  # no resume
        res = sweep(values, sweep_dir, *extra)
        assert res.returncode == 2 and named in res.stderr.splitlines()[-1], res.stderr[-2000:]
        assert "hydra.sweep.dir" in res.stderr.splitlines()[-1] and "hydra.run.dir" not in res.stderr
        assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before  # multirun.yaml too


def test_a_sweep_whose_first_batch_fails_leaves_no_directory(tmp_path):
    write_imagefolder(tmp_path / "imagenet", per_class=4, corrupt=1)  # 9 images, one unreadable: the first batch
    res = run_main(["-m", SHARED, "trainer=cpu", "drop_path.student=0.1,0.3", "data=imagenet",
                    f"data.root={tmp_path / 'imagenet'}", "data.strict=true", "data.num_workers=1",
                    "distill.batch_size=9", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert res.returncode == 2 and "broken_0.JPEG" in res.stderr.splitlines()[-1], res.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()


def test_several_teachers_shared_equal_their_separate_run(tmp_path):
    res = sweep(["drop_path.student=0.1,0.2", "teacher=[tiny,tiny_b]"], tmp_path / "sweep", "distill.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    separate(["drop_path.student=0.2", "teacher=[tiny,tiny_b]"], tmp_path / "alone", "distill.max_steps=3")
    job, alone = tmp_path / "sweep" / "1", tmp_path / "alone"
    for name in ("student.safetensors", "adaptors.safetensors"):
        assert max_difference(job / name, alone / name) <= 1e-6
    mine, theirs = (json.loads((d / "metrics.json").read_text())["teachers"] for d in (job, alone))
    assert mine.keys() == {"tiny", "tiny_b"} and all(
        mine[t]["last_loss"] == pytest.approx(theirs[t]["last_loss"], abs=1e-6) for t in mine)
    assert (job / "logs/version_0/metrics.csv").read_text().splitlines()[0] == \
        (alone / "logs/version_0/metrics.csv").read_text().splitlines()[0]  # train/loss/<teacher> logged too
