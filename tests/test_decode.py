"""data.decode: the reduced-size JPEG decode draws the crop and flip the full decode draws (and is bit-identical
where no reduction fits), the GPU path computes the PIL path's view, unreadable files are skipped and counted by
the same rule, and bad choices fail in one line. Real JPEG files through the real DataModule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose, run_main
from fdlight.bench.data import photo
from fdlight.data.decode import DraftDecode, reduction
from fdlight.data.gpu import EncodedView, collate_encoded, decode_batch
from fdlight.data.seeded import seeded_globals
from fdlight.data.transforms import fd_train_transform
from fdlight.errors import FDLightError
from fdlight.stages.distill import distill_data

STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def write_jpegs(root: Path, sizes, per_class: int = 4, classes=("a", "b"), corrupt: int = 0) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            path = root / "train" / c / f"{c}_{i}.JPEG"
            photo(rng, w, h).save(path, "JPEG", quality=90)
            paths.append(path)
    for i in range(corrupt):
        (root / "train" / classes[0] / f"broken_{i}.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    return paths


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised views in 8-bit levels."""
    return (a - b).abs() * STD * 255


def views(path: Path, transform, seed: int, opened: bool) -> torch.Tensor:
    with seeded_globals(seed), open(path, "rb") as f:
        img = Image.open(f)
        return transform(img if opened else img.convert("RGB"))


def test_draft_draws_the_same_crop_and_is_bit_identical_where_no_reduction_fits(tmp_path):
    """At 224 px a 500x375 photo never leaves room for a 1/2 decode (the crop's short side is at most 375 < 448)."""
    paths = write_jpegs(tmp_path, [(500, 375), (375, 500)])
    full, draft = fd_train_transform(224), DraftDecode(fd_train_transform(224))
    for seed, path in enumerate(paths):
        assert torch.equal(views(path, full, seed, False), views(path, draft, seed, True))


def test_draft_decodes_large_photos_at_reduced_size_close_to_the_full_decode(tmp_path):
    paths = write_jpegs(tmp_path, [(1600, 1200)], per_class=3)
    full, draft = fd_train_transform(224), DraftDecode(fd_train_transform(224))
    reduced, diffs = 0, []
    for seed in range(24):
        path = paths[seed % len(paths)]
        with seeded_globals(seed), Image.open(path) as img:
            top, left, h, w = draft.crop.get_params(img, draft.crop.scale, draft.crop.ratio)
        scale = reduction(w, h, 224, 224)
        a, b = views(path, full, seed, False), views(path, draft, seed, True)
        if scale == 1:
            assert torch.equal(a, b)
        else:
            reduced += 1
            diffs.append(levels(a, b))
    assert reduced >= 4  # crops of at least 448 px on both sides: 1/2 (or 1/4) decodes were taken
    d = torch.cat([x.flatten() for x in diffs])
    assert d.mean() < 3.0 and d.max() < 128  # the same view, filtered differently (DCT scaling vs bilinear)
    assert d.mean() > 0  # and not by accident the full decode


def test_reduction_keeps_the_output_resolution():
    assert reduction(447, 900, 224, 224) == 1 and reduction(448, 448, 224, 224) == 2
    assert reduction(900, 1000, 224, 224) == 4 and reduction(1800, 1800, 224, 224) == 8
    assert reduction(100, 100, 224, 224) == 1  # an upsampled crop decodes whole


def batches(cfg_overrides, n: int = 2) -> list:
    data = distill_data(compose([*TINY, "student=vit_b16", "distill.batch_size=4", *cfg_overrides]))
    data.setup()
    loader = data.train_dataloader()
    out = []
    for batch in loader:
        if data.gpu_decoding is not None:
            batch = data.gpu_decoding(batch, torch.device("cpu"))
        out.append(batch)
        if len(out) == n:
            break
    return out, data


def test_the_data_module_seeds_every_decoder_alike(tmp_path):
    """Through the real loader (seeded samples, sampler, collation): pil_draft gives pil's batches bit for bit on
    500x375 photos, and gpu (run here on the CPU) the same crops and flips to within one level."""
    write_jpegs(tmp_path, [(500, 375), (375, 500), (500, 333)], per_class=4)
    common = ["data=imagenet", f"data.root={tmp_path}", "data.num_workers=0"]
    pil, _ = batches([*common, "data.decode=pil"])
    draft, _ = batches([*common, "data.decode=pil_draft"])
    gpu, _ = batches([*common, "data.decode=gpu"])
    for a, b, c in zip(pil, draft, gpu):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])
        d = levels(a[0], c[0])
        assert d.max() <= 1.0 + 1e-3 and d.mean() < 0.5  # libjpeg-turbo both; torch's antialiased resize vs PIL's


def test_the_gpu_path_decodes_a_batch_on_the_cpu_as_pil_does(tmp_path):
    paths = write_jpegs(tmp_path, [(800, 600), (500, 375)], per_class=3)
    full, view = fd_train_transform(224), EncodedView(fd_train_transform(224))
    expected = torch.stack([views(p, full, i, False) for i, p in enumerate(paths)])
    encoded = [(views(p, view, i, True), 0) for i, p in enumerate(paths)]
    batch, _ = collate_encoded(encoded)
    assert batch.params.shape == (len(paths), 6) and all(t.dtype == torch.uint8 for t in batch.data)
    got = decode_batch(batch, view.size, view.mean, view.std, torch.device("cpu"))
    d = levels(expected, got)
    assert got.shape == expected.shape and d.max() <= 1.0 + 1e-3 and d.mean() < 0.5


@pytest.mark.parametrize("decode", ["pil_draft", "gpu"])
def test_unreadable_images_are_skipped_and_counted_by_every_decoder(tmp_path, decode):
    write_jpegs(tmp_path, [(500, 375)], per_class=5, corrupt=2)
    (tmp_path / "train" / "a" / "empty.JPEG").write_bytes(b"")
    out, data = batches(["data=imagenet", f"data.root={tmp_path}", "data.num_workers=0", f"data.decode={decode}"],
                        n=3)
    assert len(out) == 3 and all(b[0].shape == (4, 3, 224, 224) for b in out)
    assert data.skipped_images == 3


def test_strict_stops_at_the_first_unreadable_image_under_draft(tmp_path):
    write_jpegs(tmp_path, [(500, 375)], per_class=5, corrupt=1)
    with pytest.raises(FDLightError, match=r"unreadable image .*broken_0.JPEG \(.*\); remove it or set"):
        for _ in range(3):
            batches(["data=imagenet", f"data.root={tmp_path}", "data.num_workers=0", "data.decode=pil_draft",
                     "data.strict=true"], n=3)


@pytest.mark.parametrize("args,expected", [
    (["distill.batch_size=4", "data.decode=turbo"],
     "data.decode='turbo' is not a decoder; choose one of: pil, pil_draft, gpu"),
    (["stage=finetune", "finetune.scratch=student", "data.decode=gpu"],
     "data.decode=gpu decodes and augments the distillation view on the GPU; stage=finetune"),
])
def test_a_bad_decoder_is_one_line(tmp_path, args, expected):
    write_jpegs(tmp_path / "data", [(64, 48)], per_class=8)
    (tmp_path / "data" / "val").symlink_to(tmp_path / "data" / "train")
    res = run_main([*TINY, "data=imagenet", f"data.root={tmp_path / 'data'}", "data.num_workers=0", *args,
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_distillation_run_decodes_its_batches_where_it_trains(tmp_path):
    """data.decode=gpu through Lightning's fit: the DataModule's on_before_batch_transfer decodes each batch (here
    on the CPU the trainer runs on)."""
    write_jpegs(tmp_path / "data", [(96, 72), (72, 96)], per_class=4)
    res = run_main([*TINY, "data=imagenet", f"data.root={tmp_path / 'data'}", "data.num_workers=1", "data.decode=gpu",
                    "distill.batch_size=4", "distill.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["skipped_images"] == 0
