"""data=shards: tar shards written from an ImageFolder by a real process, read through the real DataModule with the
folder's batches (same order, same per-sample seeding), unreadable images skipped and counted, exact resume."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, run_main, run_stage
from fdlight.stages.distill import distill_data
from test_decode import write_jpegs
from test_resume import check_exact_resume


def shard(src: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdlight.data.shards", str(src), str(out), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_jpegs(root, [(96, 72), (72, 96), (120, 90)], per_class=9, classes=("cat", "dog", "fox"), corrupt=1)
    write_jpegs(root / "valsrc", [(64, 48)], per_class=2, classes=("cat", "dog", "fox"))
    (root / "valsrc" / "train").rename(root / "val")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    res = shard(folder, out, "--shard-size", "7")
    assert res.returncode == 0, res.stderr
    assert "wrote 28 train images, 6 val images as shards" in res.stdout
    return out


def test_the_writer_leaves_webdataset_layout_tars_and_an_index(shards):
    tars = sorted((shards / "train").glob("shard-*.tar"))
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(4)]  # 28 images, 7 a shard
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.jpg", "000000000.cls"] and len(names) == 14
        assert tar.extractfile("000000000.cls").read() == b"0"
    index = json.loads((shards / "train" / "index.json").read_text())
    assert index["classes"] == ["cat", "dog", "fox"] and len(index["samples"]) == 28


def test_refused_inputs_are_one_line(folder, shards, tmp_path):
    for args, expected in (([str(tmp_path / "nowhere"), str(tmp_path / "o")], "does not exist"),
                           ([str(folder), str(shards)], "already holds shards"),
                           ([str(folder), str(tmp_path / "o2"), "--shard-size", "0"], "--shard-size=0 must be")):
        res = shard(*args)
        lines = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error:")]
        assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr


@pytest.mark.parametrize("decode", ["pil", "pil_draft"])
def test_shards_give_the_batches_of_the_folder_they_were_written_from(folder, shards, decode):
    def epoch(name, root):
        cfg = compose([*TINY, f"data={name}", f"data.root={root}", "data.num_workers=0", f"data.decode={decode}",
                       "distill.batch_size=4"])
        data = distill_data(cfg)
        data.setup()
        return list(data.train_dataloader()), data

    a, folder_data = epoch("imagenet", folder)
    b, shard_data = epoch("shards", shards)
    assert len(a) == len(b) == 7  # every sample of the epoch, the unreadable one included
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert folder_data.skipped_images == shard_data.skipped_images == 1


def test_distill_and_finetune_run_on_shards(folder, shards, tmp_path):
    res = run_main([*TINY, "data=shards", f"data.root={shards}", "data.num_workers=1", "distill.batch_size=4",
                    "distill.epochs=1", f"hydra.run.dir={tmp_path / 'distill'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "distill" / "metrics.json").read_text())
    assert metrics["steps"] == 7 and metrics["skipped_images"] == 1  # 28 samples in batches of 4, one unreadable
    out = run_stage(["stage=finetune", "data=shards", f"data.root={shards}", "data.num_workers=0",
                     f"finetune.pretrained={tmp_path / 'distill' / 'student.safetensors'}", "finetune.batch_size=6",
                     "finetune.epochs=1", "finetune.num_threads=1"], tmp_path / "finetune")
    assert out["num_classes"] == 3 and out["steps"] == 4 and 0 <= out["val/top1"] <= 1


def test_a_missing_index_names_the_command_that_writes_it(folder, tmp_path):
    res = run_main([*TINY, "data=shards", f"data.root={folder}", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "has no train/index.json" in lines[0]
    assert "python -m fdlight.data.shards" in lines[0] and not (tmp_path / "r").exists()


def test_distillation_on_shards_killed_mid_epoch_resumes_bit_for_bit(shards, tmp_path):
    """28 samples, 4 a batch: 7 steps an epoch, 3 epochs, a checkpoint every 3 steps."""
    args = ["data=shards", f"data.root={shards}", "data.num_workers=2", "distill.batch_size=4", "distill.epochs=3",
            "distill.checkpoint_every_n_steps=3", "distill.num_threads=1"]
    killed_at = check_exact_resume(tmp_path, args, 21, lambda step: step >= 9 and step % 7,
                                   ("student.safetensors",))
    assert killed_at % 7  # mid-epoch, after an epoch boundary
