"""`python -m fdlight experiment=demo` end to end at a smaller size: teacher from scratch, FD into a fresh student,
both fine-tuned with the same recipe, results.md and metrics.json; a finished demo resumes without retraining; a
repeat in a new process on a busy CPU gives the same numbers, and its console says what each step is."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import TINY, compose, run_cli, run_stage
from fdlight.errors import FDLightError
from fdlight.models.weights import read_export_metadata

SMALL = ["experiment=demo", "data.num_train=64", "data.num_val=32", "data.num_workers=1", "distill.batch_size=16",
         "finetune.batch_size=16", "distill.epochs=1", "finetune.epochs=1", "pipeline.teacher.epochs=2",
         "pipeline.diagnose_settings.num_images=8", "+pipeline.diagnose_settings.landscape={steps:3}",
         "pipeline.segment_settings.batch_size=16"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    return run_dir, run_stage(SMALL, run_dir)


def test_demo_config_runs_the_pipeline_on_embedded_data_on_a_cpu():
    cfg = compose(["experiment=demo"])
    assert (cfg.stage, cfg.data.name, cfg.trainer.accelerator) == ("pipeline", "synthetic", "cpu")
    assert cfg.teacher.weights is None and cfg.pipeline.train_teacher  # nothing downloaded: the teacher is trained


def test_demo_runs_every_step_and_reports_the_comparison(demo):
    run_dir, metrics = demo
    for step, artifact in [("1_teacher", "model.safetensors"), ("2_distill", "student.safetensors"),
                           ("3a_finetune_teacher", "model.safetensors"), ("3b_finetune_student", "model.safetensors"),
                           ("3c_finetune_scratch", "model.safetensors")]:
        assert (run_dir / step / artifact).is_file() and (run_dir / step / "metrics.json").is_file(), step
    # step 2 distils the model step 1 trained, step 3a fine-tunes that same file, step 3b the FD student
    distill_cfg = OmegaConf.load(run_dir / "2_distill" / "config.yaml")
    assert distill_cfg.teacher.weights == str(run_dir / "1_teacher" / "model.safetensors")
    assert json.loads((run_dir / "3a_finetune_teacher" / "metrics.json").read_text())["pretrained"] == \
        str(run_dir / "1_teacher" / "model.safetensors")
    assert json.loads((run_dir / "3b_finetune_student" / "metrics.json").read_text())["pretrained"] == \
        str(run_dir / "2_distill" / "student.safetensors")
    assert read_export_metadata(run_dir / "1_teacher" / "model.safetensors")["timm_kwargs"]["global_pool"] == "token"
    assert json.loads((run_dir / "1_teacher" / "metrics.json").read_text())["steps"] == 2 * 64 // 16
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("finetune_teacher/val/top1", "finetune_student/val/top1", "finetune_scratch/val/top1",
                "teacher/val/top1", "fd/first_loss", "fd/last_loss", "distill/img_per_s", "total_wall_s"):
        assert key in saved, key
    for step in ("teacher", "distill", "finetune_teacher", "finetune_student"):
        assert saved[f"{step}/wall_s"] > 0
    assert saved["delta_top1"] == pytest.approx(saved["finetune_student/val/top1"] -
                                                saved["finetune_teacher/val/top1"])
    text = (run_dir / "results.md").read_text()
    assert f"{100 * saved['finetune_student/val/top1']:.1f}%" in text
    assert f"{saved['fd/first_loss']:.4f} -> {saved['fd/last_loss']:.4f}" in text
    assert "FD student fine-tuned minus teacher fine-tuned" in text and "sampling noise" in text
    assert text.count("\n| ") == 6 + 4  # header + 5 rows, then header + 3 teacher-vs-student rows
    for name in ("teacher", "fd_student"):
        spread = saved[f"diagnose/{name}/attn_distance_spread"]
        assert f"{spread:.3f}" in text and (run_dir / "5_segment_" f"{name}" / "model.safetensors").is_file()
        assert f"{100 * saved[f'segment/{name}/val/mIoU']:.1f}%" in text
    for row, step in (("teacher", "knn_teacher"), ("distill", "knn_fd_student"), ("finetune_scratch", "knn_scratch")):
        knn = json.loads((run_dir / f"6_{step}" / "metrics.json").read_text())
        assert saved[f"{row}/knn_top1"] == knn["top1"] and f"| {100 * knn['top1']:.1f}% |" in text
    # the FD student's k-NN, monitored while it distils: from its first step to its last, the trained teacher's once
    monitor = json.loads((run_dir / "2_distill" / "metrics.json").read_text())["monitor"]
    assert [e["step"] for e in monitor["knn"]] == [0, saved["distill/steps"]] and set(monitor["teachers"]) == {"teacher"}
    diagnosed = json.loads((run_dir / "4_diagnose" / "diagnostics.json").read_text())["checkpoints"]
    assert set(diagnosed) == {"teacher", "FD student"}
    assert (run_dir / "4_diagnose" / "landscape.png").is_file()
    # both landscapes on one loss (left alone, the teacher would get cross entropy and the student its FD loss)
    assert [diagnosed[n]["summary"]["landscape_loss"] for n in ("teacher", "FD student")] == ["probe", "probe"]
    sharpness = next(line for line in text.splitlines() if line.startswith("| loss-landscape sharpness"))
    assert "linear probe's cross entropy at ±1 along a filter-normalised random direction" in sharpness
    assert "(8 val images; lower is flatter)" in sharpness
    for name in ("teacher", "fd_student"):
        assert saved[f"diagnose/{name}/landscape_loss"] == "probe"
        assert f"{saved[f'diagnose/{name}/sharpness']:.3f}" in sharpness


def test_a_finished_demo_resumes_without_retraining_and_refuses_to_be_overwritten(demo):
    run_dir, metrics = demo
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/*.safetensors")}
    again = run_stage([*SMALL, "resume=true"], run_dir)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("*/*.safetensors")} == before
    assert again["finetune_student/val/top1"] == metrics["finetune_student/val/top1"]
    with pytest.raises(FDLightError, match="already holds a run"):
        run_stage(SMALL, run_dir)


TIMING = ("wall_s", "img_per_s")


def test_a_repeat_in_a_new_process_on_a_busy_cpu_gives_the_same_numbers_and_a_readable_console(demo, tmp_path):
    """The demo's numbers depend on its seed and settings only (one intra-op thread, one data worker, seeded
    augmentation): the same small demo in a new process (another hash seed), while a busy loop competes for the CPU,
    gives every metric bit for bit. Its console: a header per step, the hardware lines once, one closing line per
    stage that says where its artifacts are."""
    run_dir, metrics = demo
    again = tmp_path / "again"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        res = run_cli([*TINY, *SMALL, f"hydra.run.dir={again}"], cwd=tmp_path)
    finally:
        busy.kill()
        busy.wait()
    assert res.returncode == 0, res.stderr[-2000:]
    repeat = json.loads((again / "metrics.json").read_text())
    assert {k: v for k, v in repeat.items() if not k.endswith(TIMING)} == \
        {k: v for k, v in metrics.items() if not k.endswith(TIMING)}

    lines = res.stdout.splitlines()
    headers = [line.split(":")[0] for line in lines if line.startswith("pipeline step ")]
    assert headers == [f"pipeline step {n}" for n in ("1", "2", "3a", "3b", "3c", "4", "5", "5", "6", "6", "6", "7")]
    assert "GPU available:" not in res.stdout and "GPU available:" in (again / "fdlight.log").read_text()
    closing = [line for line in lines if "; artifacts in " in line]
    assert len(closing) == 12  # 5 trainings, diagnose, 2 segmentations, 3 k-NN, the pipeline
    assert all(re.search(r"; data=synthetic: (\d+ train( \+ \d+ val)?|\d+ val) images; ", line)
               for line in closing), closing
    assert closing[-1].startswith("pipeline done in ") and lines[-1] == closing[-1]
    assert closing[-1].endswith(f"; artifacts in {again}: results.md, metrics.json")
    assert not [line for line in lines if line.startswith(" ")]  # no metrics wrapped onto continuation lines
    assert "stepping batches" not in res.stdout and "stepping batches" in (again / "fdlight.log").read_text()


def test_with_wandb_every_step_is_its_own_run(tmp_path):
    """A WandbLogger reuses an open W&B run: each step closes its own, so no step logs into another's."""
    run_dir = tmp_path / "run"
    run_stage([*SMALL, "logger=wandb", "pipeline.diagnose=false", "pipeline.segment=false",
               "pipeline.scratch_baseline=false"], run_dir)
    runs = {p.parents[2].name for p in run_dir.glob("*/wandb/offline-run-*/run-*.wandb")}
    assert runs == {"1_teacher", "2_distill", "3a_finetune_teacher", "3b_finetune_student", "6_knn_teacher",
                    "6_knn_fd_student"}
