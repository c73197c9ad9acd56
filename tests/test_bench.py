"""The benchmark entry point runs on a CPU and counts the FLOPs of the whole step (backward included)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import compose
from fdlight.bench.distill import main
from fdlight.bench.timing import kernel_kind
from fdlight.models.students import build_student


def test_bench_counts_teacher_forward_and_student_forward_and_backward():
    result = main(["--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "0"])
    student = build_student(compose([]).student)
    with FlopCounterMode(display=False) as counter:
        student.forward_features(torch.randn(1, 3, 32, 32))
    forward = counter.get_total_flops() / 1e9
    assert result["img_per_s"] > 0 and result["teacher"] == "tiny" and result["batch"] == 4
    assert result["gflop_per_img"] > 3 * forward  # student forward + backward (about 2x) + the teacher's forward


def test_finetune_bench_runs_the_classification_step():
    result = main(["--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "0", "--finetune"])
    assert result["stage"] == "finetune" and result["img_per_s"] > 0


def test_profile_names_where_the_step_time_goes(capsys):
    result = main(["--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "0", "--profile", "5"])
    rows = result["profile"]
    assert rows and all(ms >= 0 and calls >= 1 for _, ms, calls in rows)
    assert [ms for _, ms, _ in rows] == sorted((ms for _, ms, _ in rows), reverse=True)
    names = {name for name, _, _ in rows}
    assert {"aten::mm", "aten::addmm"} & names  # the student's and teacher's linear layers are in it
    out = capsys.readouterr().out
    assert "fdlight.bench profile:" in out and "matmul" in out
    assert kernel_kind("fmha_cutlassB_bf16_aligned_64x64") == "attention"
    assert kernel_kind("nvjet_sm90_tst_192x192_64x4") == "matmul"
    assert kernel_kind("triton_poi_fused_gelu_7") == "fused (compiled)"
