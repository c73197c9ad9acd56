"""With logger=wandb (offline), what a run logged, read back from the offline run's own file: the monitor's k-NN curve
on the training step axis beside the loss, lr, grad norm and images/s; stage=knn's and stage=diagnose's tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_stage
from fdlight.console import finish_wandb

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) framed chunks


def logged(run_dir: Path) -> list:
    """Every record of the run's offline .wandb file, decoded (wandb.proto's Record)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunk, records = path.read_bytes(), 7, b"", []  # 7: the ':W&B' header, magic and version
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def history(run_dir: Path) -> list[dict]:
    """Each logged row as a dict ({"knn/results": {"_type": "table-file", "path": ...}} for a nested value)."""
    rows = []
    for r in logged(run_dir):
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:
                keys = [item.key] if item.key else list(item.nested_key)
                target = row
                for k in keys[:-1]:
                    target = target.setdefault(k, {})
                target[keys[-1]] = json.loads(item.value_json)
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("wandb")
    small = ["logger=wandb", "data.num_train=64", "data.num_val=32"]
    distill = run_stage([*small, "distill.batch_size=16", "distill.epochs=2", "monitor.every_n_epochs=1",
                         "monitor.max_images=32", "monitor.k=5"], base / "distill")
    finish_wandb()  # as the CLI's process end would: the next stage's logger must not join this open run
    run_stage([*small, "stage=knn", "knn.k=5", f"knn.pretrained={base / 'distill'}"], base / "knn")
    run_stage([*small, "stage=diagnose", "diagnose.num_images=8", "diagnose.landscape.steps=3",
               "diagnose.landscape.two_d=false"], base / "diagnose")
    return base, distill


def test_the_monitor_curve_shares_the_training_step_axis(runs):
    base, metrics = runs
    rows = history(base / "distill")
    curve = [(r["trainer/global_step"], r["monitor/knn_top1"]) for r in rows if "monitor/knn_top1" in r]
    assert curve == [(e["step"], e["top1"]) for e in metrics["monitor"]["knn"]] and [s for s, _ in curve] == [0, 4, 8]
    teacher = [r for r in rows if "monitor/teacher_knn_top1" in r]
    assert len(teacher) == 1 and teacher[0]["monitor/teacher_knn_top1"] == metrics["monitor"]["teachers"]["teacher"][
        "top1"]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["trainer/global_step"] for r in steps] == list(range(8))  # log_every_n_steps=1
    assert all({"train/lr", "train/grad_norm"} <= r.keys() for r in steps)
    assert any("train/img_per_s" in r for r in steps)


def test_knn_and_diagnose_log_their_tables(runs):
    base, _ = runs
    knn = history(base / "knn")
    saved = json.loads((base / "knn" / "metrics.json").read_text())
    assert any(r.get("knn/top1") == saved["top1"] for r in knn)
    table = next(r["knn/results"] for r in knn if "knn/results" in r)
    assert table["_type"] == "table-file" and table["nrows"] == 1
    (files,) = (base / "knn").glob("wandb/offline-run-*/files")
    content = json.loads((files / table["path"]).read_text())
    top1 = content["columns"].index("top1")
    assert content["data"][0][top1] == saved["top1"]
    diagnose = history(base / "diagnose")
    assert any(r.get("diagnose/summary", {}).get("_type") == "table-file" for r in diagnose)
    assert any("diagnose/attention_distance" in r for r in diagnose)  # the pictures
