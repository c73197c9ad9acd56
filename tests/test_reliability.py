"""Runs you can trust for days: the final step is checkpointed, a finished run stays finished, a resume keeps the
run's settings, a full disk leaves every artifact whole or absent, and a read-only run directory or bad input fails
in one line and leaves nothing behind.

The CLI runs through its real entry point, `fdlight.__main__.main`, in this process (conftest.run_main): nothing here
needs a process of its own, and a new one costs seconds of imports. A full disk is a real tmpfs; the sweep over every
artifact makes the real fsync of one chosen file fail, since a real disk cannot fill up at a chosen file."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from conftest import TINY, run_main
from test_distill_errors import write_imagefolder

DISTILL = [*TINY, "data.num_train=64", "distill.batch_size=8", "distill.checkpoint_every_n_steps=5"]
SEGMENT = [*TINY, "stage=segment", "data.num_train=16", "data.num_val=4", "segment.batch_size=4",
           "segment.eval_batch_size=4", "segment.num_vis=1", "segment.max_steps=3",
           "segment.checkpoint_every_n_steps=2"]
DIAGNOSE = [*TINY, "stage=diagnose", "diagnose.num_images=8", "diagnose.batch_size=8", "diagnose.landscape.steps=3",
            "diagnose.landscape.two_d=false"]


# ---------------------------------------------------------------------------------------------------------- helpers
def cli(args: list[str]) -> tuple[int, str]:
    """`python -m fdlight ARGS` through its entry point in this process: (exit status, stderr)."""
    res = run_main(args)
    return res.returncode, res.stderr


def one_error(code: int, stderr: str) -> str:
    """The single `fdlight: error:` line of a failed command, which must exit with status 2 and print nothing
    else that looks like a failure (no traceback, no logging error)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("fdlight: error:")]
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr[-3000:]
    return lines[0]


def digest(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_whole(run_dir: Path) -> list[str]:
    """Every file under its real name is complete (it loads), and no temporary file is left; the names."""
    names = []
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file():
            continue
        names.append(str(p.relative_to(run_dir)))
        assert not p.name.startswith(".") and not p.name.endswith(".tmp"), f"temporary file left: {p}"
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".ckpt":
            torch.load(p, map_location="cpu", weights_only=False)
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
    return names


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def steps(run_dir: Path) -> int:
    return json.loads((run_dir / "metrics.json").read_text())["steps"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A distill run of 7 steps, checkpointed every 5, made by `python -m fdlight`."""
    base = tmp_path_factory.mktemp("finished")
    res = run_main([*DISTILL, "distill.max_steps=7", f"hydra.run.dir={base / 'run'}"], cwd=base)
    assert res.returncode == 0, res.stderr[-3000:]
    return base / "run"


@pytest.fixture
def tmpfs(tmp_path):
    """A real 1.5 MB tmpfs, unmounted afterwards; the tiny run's checkpoint (~1.4 MB) fits once, not twice."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)  # busy if a run left a file open there


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs (chmod does not stop root; a read-only mount does)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------------------------------------- the final step
def test_the_final_step_is_checkpointed_and_is_the_exported_model(finished):
    assert steps(finished) == 7 == ckpt_step(finished / "checkpoints" / "last.ckpt")  # 7 is not a multiple of 5
    state = torch.load(finished / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    with safe_open(str(finished / "student.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), state[f"student.{k}"]) for k in f.keys())


def test_the_final_step_is_checkpointed_in_a_downstream_stage(tmp_path):
    run_dir = tmp_path / "seg"
    code, err = cli([*SEGMENT, f"hydra.run.dir={run_dir}"])
    assert code == 0, err[-3000:]
    assert steps(run_dir) == 3 == ckpt_step(run_dir / "checkpoints" / "last.ckpt")  # every 2 steps: 2, then 3


# ------------------------------------------------------------------------------------------------------ resume
def test_a_finished_run_stays_finished(finished):
    before = digest(finished)
    res = run_main([*DISTILL, "distill.max_steps=7", "resume=true", f"hydra.run.dir={finished}"], cwd=finished.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [ln for ln in (res.stdout + res.stderr).splitlines() if "is complete" in ln]
    assert len(said) == 1 and "(7 steps); nothing to do" in said[0], res.stdout + res.stderr
    assert "Epoch" not in res.stdout + res.stderr  # nothing was trained
    assert digest(finished) == before  # the log included


def test_a_resume_with_other_settings_is_refused_and_changes_nothing(finished):
    before = digest(finished)
    code, err = cli([*DISTILL, "distill.max_steps=7", "distill.base_lr=0.001", "resume=true",
                     f"hydra.run.dir={finished}"])
    line = one_error(code, err)
    assert "distill.base_lr=0.001 (run: 0.0003)" in line and "resume_allow_changes=true" in line
    assert digest(finished) == before


def test_a_longer_budget_needs_allow_changes_then_trains_on(finished, tmp_path):
    """A complete 7-step run resumed with max_steps=9: refused (the step budget shapes the lr schedule, so it
    changes the result); with resume_allow_changes=true it trains on to step 9 rather than saying it is complete."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    args = [*DISTILL, "distill.max_steps=9", "resume=true", f"hydra.run.dir={run_dir}"]
    line = one_error(*cli(args))
    assert "distill.max_steps=9 (run: 7)" in line
    code, err = cli([*args, "resume_allow_changes=true"])
    assert code == 0, err[-3000:]
    assert steps(run_dir) == 9 == ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert digest(run_dir)["student.safetensors"] != digest(finished)["student.safetensors"]
    assert "changed settings: distill.max_steps=9 (run: 7)" in (run_dir / "fdlight.log").read_text()


# ----------------------------------------------------------------------------------------- atomic artifacts
def fail_fsync_of(monkeypatch, name: str, nth: int = 1) -> None:
    """Make the nth fsync of a temporary file for `name` fail with ENOSPC (where a delayed-allocation filesystem
    reports a full disk): the real write path up to the rename runs, then the disk refuses."""
    real, seen = os.fsync, {"n": 0}

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if Path(target).name.startswith(f".{name}.") and target.endswith(".tmp"):
            seen["n"] += 1
            if seen["n"] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


DISTILL_WRITES = {"config.yaml": 1, "checkpoints/last.ckpt": 1, "checkpoints/last.ckpt, again": 2,
                  "student.safetensors": 1, "metrics.json": 1}


@pytest.mark.parametrize("write", DISTILL_WRITES)
def test_a_full_disk_at_each_distill_artifact(write, tmp_path, monkeypatch):
    artifact, nth = write.split(",")[0], DISTILL_WRITES[write]
    run_dir = tmp_path / "run"
    fail_fsync_of(monkeypatch, Path(artifact).name, nth)
    code, err = cli([*TINY, "data.num_train=16", "distill.batch_size=8", "distill.max_steps=2",
                     "distill.checkpoint_every_n_steps=1", f"hydra.run.dir={run_dir}"])
    line = one_error(code, err)
    assert f"cannot write {run_dir / artifact}: the disk is full" in line
    names = assert_whole(run_dir)
    assert "metrics.json" not in names  # the run is not marked complete
    if nth == 2:  # the step-1 checkpoint stays, whole
        assert ckpt_step(run_dir / artifact) == 1
    else:
        assert artifact not in names


PIPELINE = [*TINY, "stage=pipeline", "data.num_train=16", "data.num_val=8", "distill.max_steps=1",
            "distill.batch_size=8", "finetune.max_steps=1", "finetune.batch_size=8"]
STAGE_WRITES = {"diagnostics.json": DIAGNOSE, "attention_maps.safetensors": DIAGNOSE, "landscape.png": DIAGNOSE,
                "results.md": PIPELINE}


@pytest.mark.parametrize("artifact", STAGE_WRITES)
def test_a_full_disk_at_each_diagnose_and_pipeline_artifact(artifact, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    fail_fsync_of(monkeypatch, artifact)
    line = one_error(*cli([*STAGE_WRITES[artifact], f"hydra.run.dir={run_dir}"]))
    assert f"cannot write {run_dir / artifact}: the disk is full" in line
    names = assert_whole(run_dir)
    assert artifact not in names and "metrics.json" not in names


def test_a_really_full_disk_at_the_export(tmpfs):
    """The checkpoint fits, the exported weights do not: safetensors' own writer meets the full disk."""
    subprocess.run(["mount", "-o", "remount,size=1700k", str(tmpfs)], check=True)
    run_dir = tmpfs / "run"
    line = one_error(*cli([*DISTILL, "distill.max_steps=5", f"hydra.run.dir={run_dir}"]))
    assert f"cannot write {run_dir / 'student.safetensors'}: the disk is full" in line
    names = assert_whole(run_dir)
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 5 and "student.safetensors" not in names


def test_a_really_full_disk_keeps_the_last_good_checkpoint_and_resumes(tmpfs):
    run_dir = tmpfs / "run"
    args = [*DISTILL, "distill.max_steps=7", f"hydra.run.dir={run_dir}"]
    res = run_main(args, cwd=tmpfs.parent)
    line = one_error(res.returncode, res.stderr)
    assert f"cannot write {run_dir / 'checkpoints' / 'last.ckpt'}: the disk is full" in line  # the step-7 save
    names = assert_whole(run_dir)
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 5
    assert "metrics.json" not in names and "student.safetensors" not in names
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)  # space again
    res = run_main([*args, "resume=true"], cwd=tmpfs.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert steps(run_dir) == 7 == ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert_whole(run_dir)


# ------------------------------------------------------------------------------------- read-only run directory
@pytest.mark.parametrize("where", ["inside", "itself"])
def test_a_read_only_run_directory_is_one_line(where, read_only):
    run_dir = read_only / "run" if where == "inside" else read_only
    res = run_main([*DISTILL, "distill.max_steps=1", f"hydra.run.dir={run_dir}"], cwd=read_only.parent)
    line = one_error(res.returncode, res.stderr)
    assert f"cannot write the run directory {run_dir}: the filesystem is read-only" in line
    assert "hydra.run.dir=" in line and res.stdout.strip() == ""
    assert list(read_only.iterdir()) == []


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def files(tmp_path_factory, finished) -> dict[str, Path]:
    """Weights files good and bad, and an ImageFolder tree with an unreadable image."""
    base = tmp_path_factory.mktemp("files")
    good = finished / "student.safetensors"
    (base / "truncated.safetensors").write_bytes(good.read_bytes()[:3000])
    (base / "junk.pt").write_bytes(b"this is not a weights file\n" * 10)
    write_imagefolder(base / "imagenet", per_class=4, corrupt=1)
    return {"good": good, "truncated": base / "truncated.safetensors", "junk": base / "junk.pt",
            "imagenet": base / "imagenet"}


BAD_INPUT = {
    "negative distill lr": (["distill.base_lr=-1"], "distill.base_lr=-1 must be a number > 0"),
    "negative finetune lr": (["stage=finetune", "finetune.base_lr=-1", "finetune.pretrained={good}"],
                             "finetune.base_lr=-1 must be a number > 0"),
    "image size off the patch grid": (["student.img_size=36"],
                                      "student.img_size=36 is not a multiple of its patch size 8"),
    **{f"truncated {s} weights": ([f"stage={s}", f"{s}.pretrained={{truncated}}"],
                                  f"{s}.pretrained=.*truncated.safetensors is not a readable weights file")
       for s in ("finetune", "linear", "segment", "detect")},
    "junk weights": (["stage=finetune", "finetune.pretrained={junk}"],
                     r"finetune.pretrained=.*junk.pt is not a readable weights file \(ValueError: neither a zip "
                     r"archive nor a pickle\)"),
    "unreadable image, strict": (["data=imagenet", "data.root={imagenet}", "data.strict=true", "data.num_workers=1",
                                  "distill.batch_size=9"], r"unreadable image .*broken_0.JPEG"),
    "another stage's key": (["stage=finetune", "distill.max_steps=5"],
                            "'distill.max_steps=5' is a setting of stage=distill, but this command runs stage="
                            "finetune"),
    "misspelled setting": (["stage=finetune", "finetune.batch_sise=8"],
                           "unknown setting 'finetune.batch_sise' .*did you mean finetune.batch_size"),
    "teacher file of another model": (["teacher.weights={good}"],
                                      "weights file .*student.safetensors does not fit teacher 'tiny'"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_leaves_no_directory(case, files, tmp_path):
    import re

    args, expected = BAD_INPUT[case]
    run_dir = tmp_path / "run"
    args = [a.format(**files) for a in args]
    line = one_error(*cli([*TINY, *args, f"hydra.run.dir={run_dir}"]))
    assert re.search(expected, line), line
    assert not run_dir.exists()


def test_a_hub_teacher_offline_fails_within_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    line = one_error(*cli([*TINY, "teacher=clip_vitb", "student.img_size=112", f"hydra.run.dir={run_dir}"]))
    assert time.perf_counter() - start < 60  # building ViT-B takes seconds; a hub client retrying takes minutes
    assert "cannot fetch weights for clip_vitb from the hub" in line and "teacher.weights=" in line
    assert not run_dir.exists()
