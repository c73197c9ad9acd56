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


def test_data_bench_times_each_decoder_and_draft_equals_pil_where_no_reduction_fits():
    from fdlight.bench.data import main as data_bench

    result = data_bench(["--images", "12", "--sizes", "500x375,375x500", "--rounds", "1", "--batch", "4",
                         "--compare", "6"])
    rows = result["decoders"]
    assert set(rows) == {"pil", "pil_draft"} and all(r["img_per_s"] > 0 for r in rows.values())
    assert result["folder"]["images"] == 12 and 3 < result["folder"]["bits_per_pixel"] < 8
    crops = result["fixed_crops"]
    assert crops["share_1/1"] == 1.0 and crops["max_diff"] == 0  # at 224 px a 500x375 photo is decoded whole


def test_data_bench_reduces_large_photos_and_runs_the_finetune_path():
    from fdlight.bench.data import main as data_bench

    result = data_bench(["--images", "6", "--sizes", "1600x1200", "--rounds", "1", "--batch", "2", "--compare",
                         "12"])
    crops = result["fixed_crops"]
    assert crops["share_1/1"] < 1 and 0 < crops["mean_diff_reduced"] < 3
    tuned = data_bench(["--stage", "finetune", "--images", "8", "--sizes", "500x375", "--rounds", "1", "--batch",
                        "4", "--decode", "pil_draft"])
    assert tuned["decoders"]["pil_draft"]["img_per_s"] > 0


def test_data_bench_times_listing_a_nested_tree_keeping_it_and_reading_it_back():
    from fdlight.bench.data import main as data_bench

    result = data_bench(["--listing", "1234", "--rounds", "1"])
    assert result["files"] == 1234 and all(result[k] > 0 for k in ("list_s", "keep_s", "read_back_s"))


def test_fit_bench_reports_the_run_rate_beside_the_step():
    from fdlight.bench.fit import main as fit_bench

    result = fit_bench(["--steps", "4", "--warmup", "1", "--batch", "4"])
    assert result["steps"] == 4 and result["meter_img_per_s"] > 0 and result["wall_img_per_s"] > 0
    assert result["step_img_per_s"] > 0


def test_students_bench_times_the_shared_step_beside_separate_steps_and_counts_the_bound(capsys):
    from fdlight.models.teachers import build_teacher

    out = main(["--students", "3", "--steps", "2", "--warmup", "1", "--batch", "4"])
    with FlopCounterMode(display=False) as counter:  # the teacher's forward on one image, counted here on its own
        build_teacher(compose([]).teacher)(torch.randn(1, 3, 32, 32))
    t, s = out["teacher_gflop_per_img"], out["student_gflop_per_img"]
    assert abs(t - counter.get_total_flops() / 1e9) < 5e-4 and s > 2 * t  # a student step outweighs a forward
    assert abs(out["flop_bound"] - 3 * (t + s) / (t + 3 * s)) < 0.02 and 1 < out["flop_bound"] < 3
    assert out["shared_ms"] > 0 and out["separate_ms"] > 0 and out["students"] == 3
    assert "speedup=" in capsys.readouterr().out


def test_monitor_bench_times_the_monitor_beside_an_unmonitored_run(one_thread):
    from fdlight.bench.monitor import main as monitor_bench

    out = monitor_bench(["trainer=cpu", "data.num_train=64", "data.num_val=32", "distill.batch_size=16",
                         "distill.epochs=2", "monitor.every_n_epochs=1", "monitor.max_images=32", "monitor.k=5"])
    assert out["evaluations"] == 3 and out["images"] == 32 and out["epochs"] == 2  # the start, then each epoch
    assert 0 < out["seconds_per_evaluation"] and 0 < out["monitor_share_of_epoch"] < 1


def test_embed_bench_prints_images_per_second(one_thread, capsys):
    from fdlight.bench.embed import main as embed_bench

    out = embed_bench(["trainer=cpu", "data.num_train=32"])
    assert out["rows"] == 32 and out["img_per_s"] > 0 and '"img_per_s"' in capsys.readouterr().out
