"""`python -m fdlight experiment=demo` end to end at a smaller size: teacher from scratch, FD into a fresh student,
both fine-tuned with the same recipe, results.md and metrics.json; a finished demo resumes without retraining."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import compose, run_stage
from fdlight.errors import FDLightError
from fdlight.models.weights import read_export_metadata

SMALL = ["experiment=demo", "data.num_train=64", "data.num_val=32", "data.num_workers=0", "distill.batch_size=16",
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
    diagnosed = json.loads((run_dir / "4_diagnose" / "diagnostics.json").read_text())["checkpoints"]
    assert set(diagnosed) == {"teacher", "fd_student"}
    assert (run_dir / "4_diagnose" / "landscape.png").is_file()


def test_a_finished_demo_resumes_without_retraining_and_refuses_to_be_overwritten(demo):
    run_dir, metrics = demo
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/*.safetensors")}
    again = run_stage([*SMALL, "resume=true"], run_dir)
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("*/*.safetensors")} == before
    assert again["finetune_student/val/top1"] == metrics["finetune_student/val/top1"]
    with pytest.raises(FDLightError, match="already holds a run"):
        run_stage(SMALL, run_dir)
