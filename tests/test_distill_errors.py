"""Bad input gets one clear line, a non-zero exit, and loses nothing."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose, run_main, run_stage
from fdlight.errors import FDLightError
from fdlight.stages.distill import build_distillation

FAST = [*TINY, "data.num_train=64", "distill.batch_size=16", "distill.max_steps=2"]
FOLDER = [*TINY, "distill.batch_size=16", "distill.max_steps=2", "data=imagenet"]


def error_line(res) -> str:
    lines = [l for l in res.stderr.splitlines() if l.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    return lines[0]


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class=10, corrupt=0):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "train" / c / f"{c}_{i}.JPEG", format="JPEG")
    for i in range(corrupt):
        (root / "train" / classes[0] / f"broken_{i}.JPEG").write_bytes(b"not a jpeg at all")


def test_unknown_teacher_lists_the_choices(tmp_path):
    line = error_line(run_main(["teacher=clip_vitz"], cwd=tmp_path))
    assert "unknown teacher 'clip_vitz'" in line and "clip_vitb" in line and "esvit_swinb" in line


def test_unknown_student_lists_the_choices(tmp_path):
    line = error_line(run_main(["student=vit_h"], cwd=tmp_path))
    assert "unknown student 'vit_h'" in line and "swinv2_g" in line


def test_drop_path_outside_range_is_refused(tmp_path):
    line = error_line(run_main([*FAST, "drop_path.student=1.2", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path))
    assert "drop_path.student=1.2 is outside [0, 1)" in line


def test_token_grid_mismatch_names_both_grids_and_the_fix():
    with pytest.raises(FDLightError) as err:
        build_distillation(compose(["student.img_size=64"]))
    msg = str(err.value)
    assert "student 8x8 + 1 prefix tokens (64 px / 8)" in msg and "teacher 4x4 + 1 prefix tokens (32 px / 8)" in msg
    assert "student.img_size=32" in msg


def test_existing_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    first = run_main([*FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0
    console = first.stdout + first.stderr
    assert "train/loss" in console and "litlogger" not in console and "v_num" not in console  # no library noise
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()
              and p.suffix != ".log"}
    line = error_line(run_main([*FAST, "drop_path.student=0.3", f"hydra.run.dir={run_dir}"], cwd=tmp_path))
    assert "already holds a run" in line and "resume=true" in line
    assert digest == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest}


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    line = error_line(run_main([*FAST, "resume=true", f"hydra.run.dir={tmp_path / 'new'}"], cwd=tmp_path))
    assert "no checkpoint at" in line


def diverging_run(tmp_path: Path, checkpoint_every: int) -> tuple[Path, str]:
    """A distillation whose lr makes the loss non-finite within a few steps: its run directory and error line."""
    run_dir = tmp_path / "run"
    res = run_main([*TINY, "data.num_train=64", "distill.batch_size=16", "distill.epochs=20", "distill.base_lr=1e35",
                    "distill.warmup_epochs=0", "distill.clip_grad=0",
                    f"distill.checkpoint_every_n_steps={checkpoint_every}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    return run_dir, error_line(res)


@pytest.mark.parametrize("held", [[], ["mynotes.txt"]])
def test_a_refused_resume_leaves_a_folder_of_ones_own_as_it_was(tmp_path, held):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    for name in held:
        (run_dir / name).write_text("my own\n")
    line = error_line(run_main([*FAST, "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path))
    assert "no checkpoint at" in line
    assert sorted(p.name for p in run_dir.iterdir()) == held  # the folder kept, and no log of the refusal added


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir, line = diverging_run(tmp_path, checkpoint_every=1)
    assert "non-finite FD loss" in line and "last good checkpoint is kept" in line
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    step = int(line.split("at step ")[1].split(";")[0])
    assert ckpt["global_step"] == step  # saved after the last finite step, before the bad one
    assert not (run_dir / "student.safetensors").exists()


BAD_SETTINGS = {
    "misspelled key": (["teachr=tiny"], "unknown config key 'teachr' in 'teachr=tiny'; did you mean teacher?"),
    "misspelled key, appended": (["+teachr=tiny"], "unknown config key 'teachr'"),
    "zero batch": (["distill.batch_size=0"], "distill.batch_size=0 must be a whole number >= 1"),
    "text for a count": (["distill.epochs=ten"], "distill.epochs='ten' must be a whole number"),
    "negative whitening eps": (["whitening.eps=-1"], "whitening.eps=-1 must be > 0"),
    "text for a rate": (["drop_path.student=abc"], "drop_path.student='abc' is not a number"),
    "unknown strategy": (["trainer.strategy=foo"], "trainer settings cannot run here: .*strategy='foo'"),
    "missing weights before the grid check": (["teacher=clip_vitb", "teacher.weights=nope.pt"],
                                              "teacher.weights file not found: nope.pt"),
    **({} if torch.cuda.is_available() else
       {"gpu trainer without a gpu": (["trainer=gpu"], "trainer.accelerator=gpu needs a CUDA GPU")}),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_fail_in_one_line_and_leave_no_run_directory(tmp_path, case):
    overrides, expected = BAD_SETTINGS[case]
    line = error_line(run_main([*FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path))
    assert re.search(expected, line), line
    assert not (tmp_path / "run").exists()  # not even Hydra's empty log


def test_an_open_clip_tag_is_not_taken_for_a_missing_file():
    cfg = compose([*TINY, "teacher=open_clip", "teacher.name=ViT-B-16", "teacher.weights=openai"])
    with pytest.raises(FDLightError, match="cannot fetch weights .* open_clip ViT-B-16:openai"):
        build_distillation(cfg)  # offline here: the tag reaches open_clip, whose download fails


def test_non_finite_loss_before_any_checkpoint_says_so_and_logs_it(tmp_path):
    run_dir, line = diverging_run(tmp_path, checkpoint_every=1000)
    assert "non-finite FD loss" in line and "no checkpoint had been written yet" in line
    assert not (run_dir / "checkpoints").exists()
    assert line.removeprefix("fdlight: ") in (run_dir / "fdlight.log").read_text()  # the run's log says why


def test_missing_data_root_names_it(tmp_path):
    line = error_line(run_main([*FOLDER, f"data.root={tmp_path / 'nowhere'}",
                                f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path))
    assert "nowhere does not exist" in line


def test_empty_data_root_says_how_to_arrange_it(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    line = error_line(run_main([*FOLDER, f"data.root={tmp_path / 'imagenet'}",
                                f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path))
    assert "has no class folders" in line and "train/<class>/<image>" in line


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    write_imagefolder(tmp_path / "imagenet", per_class=24, corrupt=3)
    with caplog.at_level(logging.INFO, logger="fdlight"):
        metrics = run_stage(["data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_workers=0",
                             "distill.batch_size=17", "distill.epochs=1"], tmp_path / "run")
    closing = caplog.records[-1].getMessage()  # the data it read, named
    assert f"; data=imagenet {tmp_path / 'imagenet'}: 51 train images; artifacts in " in closing, closing
    assert (metrics["data"], metrics["data_root"], metrics["train_images"]) == ("imagenet", str(tmp_path / "imagenet"),
                                                                                51)
    assert metrics["steps"] == (48 + 3) // 17
    assert metrics["skipped_images"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_images"] == 3


def test_unreadable_image_is_an_error_when_strict(tmp_path):
    write_imagefolder(tmp_path / "imagenet", per_class=4, corrupt=1)
    with pytest.raises(FDLightError, match=r"unreadable image .*broken_0.JPEG"):
        run_stage(["data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.strict=true", "data.num_workers=0",
                   "distill.batch_size=9", "distill.epochs=1"], tmp_path / "run")


def test_a_failed_start_leaves_no_run_behind(tmp_path):
    run_dir = tmp_path / "run"
    line = error_line(run_main([*FAST, "student.img_size=64", f"hydra.run.dir={run_dir}"], cwd=tmp_path))
    assert "token grids differ" in line
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    assert run_main([*FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0  # the fixed command may reuse it


def test_folder_data_without_a_root_says_which_option_to_set(tmp_path):
    line = error_line(run_main([*FOLDER, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path))
    assert "data=imagenet needs data.root=" in line


def test_other_ranks_join_rank_zeros_run_directory(tmp_path, monkeypatch):
    from fdlight.runs.directory import claim, save_config
    cfg = compose([])
    save_config(cfg, tmp_path)
    with pytest.raises(FDLightError, match="already holds a run"):
        claim(cfg, tmp_path)  # rank 0 of a second launch
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun/submitit ranks carry no LOCAL_RANK before Lightning starts
    before = (tmp_path / "config.yaml").read_text()
    assert claim(cfg, tmp_path).resume_from is None
    save_config(compose(["seed=7"]), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == before


def test_grid_mismatch_is_found_before_any_model_is_built_and_names_fitting_students():
    with pytest.raises(FDLightError, match=r"16x16 \+ 1 prefix tokens \(224 px / 14\).*or pick student=vit_l14$"):
        build_distillation(compose(["teacher=clip_vitl"]))  # teacher.weights=hub: no download is attempted first
