"""data=webdataset: shards written in the test by the webdataset library's own TarWriter (as img2dataset writes them:
<key>.jpg/.png with .cls, .json, .txt beside), distilled; each process and data worker reads its own shards through a
seeded buffer; a stream continued mid-epoch gives the uninterrupted epoch's batches; bad input."""
from __future__ import annotations

import io
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import TINY, compose, run_stage
from fdlight.data.streams import StreamLoader
from fdlight.errors import FDLightError
from fdlight.stages.distill import distill_data
from test_resume import check_exact_resume

SHARDS, PER_SHARD = 4, 6


def encoded(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40 + seed % 7, 48, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 samples in 4 shards: JPEGs and PNGs with class, json and caption; sample 5 is a corrupt JPEG."""
    out = tmp_path_factory.mktemp("wds")
    for s in range(SHARDS):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar")) as sink:
            for j in range(PER_SHARD):
                k = s * PER_SHARD + j
                image = ("png", encoded(k, "PNG")) if k % 4 == 3 else ("jpg", encoded(k, "JPEG"))
                if k == 5:
                    image = ("jpg", b"\xff\xd8 not a jpeg")
                sink.write({"__key__": f"{k:08d}", image[0]: image[1], "cls": k % 3, "json": {"url": f"u{k}"},
                            "txt": f"caption {k}"})
    return out


def loader(shards, *args, batch_size: int = 4, urls: str = "shard-{000000..000003}.tar") -> tuple:
    cfg = compose([*TINY, "data=webdataset", f"data.urls='{shards}/{urls}'", "data.strict=false",
                   f"distill.batch_size={batch_size}", *args])
    data = distill_data(cfg)
    data.setup()
    return data, data.train_dataloader()


def test_distillation_streams_shards_the_webdataset_library_wrote(shards, tmp_path):
    metrics = run_stage(["data=webdataset", f"data.urls={shards}", "data.num_workers=2", "distill.batch_size=4",
                         "distill.epochs=2", "distill.num_threads=1"], tmp_path / "run")
    assert metrics["steps"] == 12 and metrics["skipped_images"] == 1  # 24 samples, 4 a batch, 2 epochs; sample 5
    kept = (tmp_path / "run" / "listing-train.txt").read_text().splitlines()
    assert kept == [f"# fdlight listing 1 root={shards}", *(f"shard-{s:06d}.tar\t{PER_SHARD}" for s in range(4))]


def test_each_worker_reads_its_own_shards_and_the_epoch_is_seeded(shards):
    data, dl = loader(shards, "data.num_workers=2", "data.shuffle_buffer=3")
    first = list(dl)
    assert len(first) == len(dl) == 6
    labels = torch.cat([b[1] for b in first])
    assert sorted(labels.tolist()) != labels.tolist()  # shuffled
    assert data.skipped_images == 1  # the corrupt sample, its place taken by a second pass of its worker's shards
    again = list(loader(shards, "data.num_workers=2", "data.shuffle_buffer=3")[1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # seeded: the same run draws the same
    second = list(dl)  # the next epoch: another shard order, other augmentations
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    stream = data.train_set
    stream.place(2, 1, 2)  # rank 1 of 2, two workers: slots 2 and 3 of 4, one shard each
    assert stream.workers == 2 and len(stream) == 12


def test_ranks_split_the_shards_and_take_as_many_batches(shards):
    seen = []
    for rank in (0, 1):
        data, _ = loader(shards, "data.num_workers=0")
        stream = data.train_set
        stream.place(2, rank, 0)
        batches = list(StreamLoader(stream))
        assert len(batches) == 3  # 24 samples over 2 processes, 4 a batch
        seen.append({int(x) for b in batches for x in b[1]})
    assert all(seen)
    read = [{name.split(":")[0] for _, _, name, _, _ in islice(stream.records(0, slot, 4), PER_SHARD)}
            for slot in range(4)]  # 2 processes x 2 workers: each reader's first pass is one shard of its own
    assert all(len(r) == 1 for r in read) and len(set.union(*read)) == SHARDS


def test_a_stream_continued_mid_epoch_gives_the_rest_of_the_uninterrupted_epoch(shards):
    """What resume=true does: the loop has drawn k batches; the stream (two workers) continues from batch k."""
    data, _ = loader(shards, "data.num_workers=2")
    whole = list(StreamLoader(data.train_set, drawn=lambda: 0))
    for k in (1, 4):
        rest = list(StreamLoader(data.train_set, drawn=lambda: k))
        assert len(rest) == len(whole) - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[k:], rest))
    later = list(StreamLoader(data.train_set, drawn=lambda: 6 + 2))  # epoch 1, batch 2
    assert not torch.equal(later[0][0], whole[2][0])


def test_labels_come_from_cls_and_every_decoder_reads_the_stream(shards):
    for decode in ("pil", "pil_draft"):
        data, dl = loader(shards, "data.num_workers=0", f"data.decode={decode}")
        x, y = next(iter(dl))
        assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("urls,expected", [
    ("{shards}/part-{{000000..000003}}.tar", "matches no file"),
    ("{shards}/shard-{{000000..000009}}.tar", "6 of its 10 shards do not exist"),
    ("{bad}", "is not a tar archive"),
])
def test_bad_input_is_one_line_and_leaves_no_run(shards, tmp_path, urls, expected):
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"GIF89a, not a tar" * 100)
    with pytest.raises(FDLightError) as e:
        run_stage(["data=webdataset", f"data.urls='{urls.format(shards=shards, bad=bad)}'"], tmp_path / "run")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(FDLightError, match="data=webdataset needs data.urls"):
        run_stage(["data=webdataset"], tmp_path / "run")


def test_shards_with_no_readable_image_stop_the_run_in_one_line(tmp_path):
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:06d}.tar")) as sink:
            for j in range(3):
                sink.write({"__key__": f"{s}_{j}", "jpg": b"\xff\xd8 not a jpeg"})
        with wds.TarWriter(str(tmp_path / f"meta-{s:06d}.tar")) as sink:  # a shard of captions only: left out
            sink.write({"__key__": f"m{s}", "txt": "no image here"})
    data, dl = loader(tmp_path, "data.num_workers=0", batch_size=2, urls="{shard,meta}-{000000..000001}.tar")
    assert len(data.train_set.shards) == 2
    with pytest.raises(FDLightError, match="no image of the shards data.urls names can be read"):
        next(iter(dl))


def test_a_killed_stream_resumes_bit_for_bit_with_the_same_workers(shards, tmp_path):
    """24 samples, 4 a batch, two workers: 6 steps an epoch, 5 epochs, a checkpoint every 4 steps (the kill lands
    mid-epoch, at step 8, 16, 20 or 28: the resumed readers drop what the epoch already trained on)."""
    args = ["data=webdataset", f"data.urls={shards}", "data.num_workers=2", "distill.batch_size=4", "distill.epochs=5",
            "distill.checkpoint_every_n_steps=4", "distill.num_threads=1"]
    killed_at = check_exact_resume(tmp_path, args, 30, lambda step: step >= 8 and step % 6, ("student.safetensors",))
    assert killed_at % 6
