"""`python -m fdlight.bench.data`: time the real training data path of a stage on ImageNet-like JPEGs.

It writes a folder of photo-like JPEGs (smooth shading, shapes, sensor-like noise; quality 90, about 4.3 bits per
pixel: ImageNet's files average about 110 KB) in ImageNet's layout, builds the DataModule and training transform the
stage builds (`stage=distill`: RandomResizedCrop + flip + normalise at the student's 224 px; `stage=finetune`: the
fine-tuning recipe's RandAugment pipeline) and iterates its training loader: per-sample seeding, the sampler, the workers and
the collation included. Each decoder of `--decode` is timed in turn, round after round, in one process, and the
rate is given per worker (per core: `--workers 0` runs everything in this process). It then compares `pil_draft`
with `pil` on fixed crops: the share of samples decoded at reduced size and the pixel difference.

`--listing N` times instead what a run of `data=images` does first: listing N empty .jpg files in nested folders
(100 a folder, 10 folders a parent), writing that listing into a run directory and reading it back (what
`resume=true` does), best of `--rounds`.

`--sizes imagenet` (default) mixes ImageNet's common sizes, mostly 500x375 and its relatives, with a tail of larger
photos (up to 1600x1200); `--sizes 500x375` (any WxH list) writes only those.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from fdlight.config import compose

# (width, height, weight): ImageNet's most common sizes, a few smaller, a tail of larger photos; mean about 210
# kpixel (ImageNet's training images average about 470x390, 180 kpixel)
IMAGENET_SIZES = ((500, 375, 40), (375, 500, 15), (500, 333, 15), (333, 500, 5), (400, 300, 8), (300, 225, 7),
                  (640, 480, 5), (800, 600, 3), (1024, 768, 1), (1600, 1200, 1))
BASE = ["student=vit_b16", "data=imagenet"]  # the student's 224 px view


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: shaded background with waves, a dozen blurred shapes, and per-pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = rng.uniform(60, 190) + rng.uniform(-60, 60) * xx / width + rng.uniform(-60, 60) * yy / height
        for _ in range(4):
            fx, fy = rng.uniform(0.005, 0.08, 2) * 500 / max(width, height)
            img[..., c] += rng.uniform(5, 25) * np.sin(xx * fx + yy * fy + rng.uniform(0, 6.28))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.02, 0.25) * max(width, height)
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r * rng.uniform(0.5, 1.5)),
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.int16)
    arr = arr + rng.normal(0, 22, arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    if text == "imagenet":
        return list(IMAGENET_SIZES)
    sizes = []
    for item in text.split(","):
        w, _, h = item.lower().partition("x")
        sizes.append((int(w), int(h), 1))
    return sizes


def write_imagefolder(root: Path, images: int, classes: int = 4, sizes=IMAGENET_SIZES, quality: int = 90,
                      seed: int = 0) -> dict:
    """`images` JPEGs in root/train/<class>/ with sizes drawn from `sizes` (w, h, weight); returns their mean size
    and bits per pixel."""
    rng = np.random.default_rng(seed)
    weights = np.array([s[2] for s in sizes], dtype=float)
    picks = rng.choice(len(sizes), size=images, p=weights / weights.sum())
    pixels = nbytes = 0
    for i, k in enumerate(picks):
        w, h = sizes[k][:2]
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.JPEG"
        photo(rng, w, h).save(path, "JPEG", quality=quality)
        pixels, nbytes = pixels + w * h, nbytes + path.stat().st_size
    for c in range(classes):  # one small validation image a class: the fine-tuning DataModule wants val/
        (root / "val" / f"class_{c}").mkdir(parents=True, exist_ok=True)
        photo(rng, 64, 48).save(root / "val" / f"class_{c}" / "val.JPEG", "JPEG", quality=quality)
    return dict(images=images, mean_pixels=pixels / images, bits_per_pixel=8 * nbytes / pixels)


def stage_data(stage: str, cfg):
    """The DataModule the stage builds, set up on the folder."""
    if stage == "distill":
        from fdlight.stages.distill import distill_data

        data = distill_data(cfg)
        data.setup()
        return data
    from fdlight.stages.classify import classification_data
    from fdlight.stages.finetune import finetune_transforms

    data = classification_data(cfg, int(cfg.finetune.batch_size))
    data.set_transforms(*finetune_transforms(cfg, int(cfg.student.img_size)))
    return data


def config(stage: str, root: Path, decode: str, workers: int, batch: int, overrides=()):
    section = "distill" if stage == "distill" else "finetune"
    return compose([*BASE, f"stage={stage}", f"data.root={root}", f"data.decode={decode}",
                    f"data.num_workers={workers}", f"{section}.batch_size={batch}", *overrides])


def timed_pass(data, device: torch.device) -> tuple[int, float]:
    """Images and seconds of one epoch of the training loader; with workers, from its first batch on (their
    start-up is not the data path)."""
    loader = data.train_dataloader()
    images, start, skip = 0, time.perf_counter(), loader.num_workers > 0
    for batch in loader:
        if data.gpu_decoding is not None:
            batch = data.gpu_decoding(batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        if skip:
            skip, start = False, time.perf_counter()
            continue
        images += len(batch[1])
    return images, time.perf_counter() - start


def fixed_crops(stage: str, root: Path, samples: int, overrides=()) -> dict:
    """pil_draft against pil on the same seeded crops (the first `samples` of epoch 0): the share decoded at each
    reduction and the pixel difference in 8-bit levels, over all samples and over the reduced ones."""
    from fdlight.data.decode import reduction
    from fdlight.data.seeded import seeded_globals

    sets = {d: stage_data(stage, config(stage, root, d, 0, 1, overrides)).train_set for d in ("pil", "pil_draft")}
    std = torch.tensor(sets["pil"].transform.transforms[-1].std if stage == "distill" else (0.229, 0.224, 0.225))
    scales, diffs = {1: 0, 2: 0, 4: 0, 8: 0}, []
    draft = sets["pil_draft"].transform
    for i in range(min(samples, len(sets["pil"]))):
        with seeded_globals(1000 + i):
            a = sets["pil"][i][0]
        with seeded_globals(1000 + i):
            b = sets["pil_draft"][i][0]
        with seeded_globals(1000 + i), Image.open(sets["pil"].samples[i][0]) as img:
            top, left, h, w = draft.crop.get_params(img, draft.crop.scale, draft.crop.ratio)
            size = draft.crop.size if not isinstance(draft.crop.size, int) else (draft.crop.size,) * 2
            scale = reduction(w, h, size[1], size[0])
        scales[scale] += 1
        diffs.append(((a - b).abs() * std.view(3, 1, 1) * 255, scale))
    every = torch.cat([d.flatten() for d, _ in diffs])
    reduced = [d.flatten() for d, s in diffs if s > 1]
    red = torch.cat(reduced) if reduced else torch.zeros(1)
    n = len(diffs)
    return dict(samples=n, **{f"share_1/{s}": round(c / n, 3) for s, c in scales.items()},
                max_diff=round(float(every.max()), 2), mean_diff=round(float(every.mean()), 3),
                mean_diff_reduced=round(float(red.mean()), 3), max_diff_reduced=round(float(red.max()), 2))


def write_empty_tree(root: Path, files: int, per_folder: int = 100, fanout: int = 10) -> None:
    """`files` empty .jpg files, `per_folder` a folder, the folders `fanout` a parent, two levels deep."""
    for i in range(0, files, per_folder):
        folder = root / f"part_{i // (per_folder * fanout):04d}" / f"dir_{i // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(i, min(i + per_folder, files)):
            (folder / f"img_{k:07d}.jpg").touch()


def time_listing(files: int, rounds: int) -> dict:
    """Seconds to list `files` images (data=images' start), to keep the listing and to read it back (a resume)."""
    from fdlight.data.images import folder_listing
    from fdlight.data.listing import Listing, kept_in, listed, save_listings

    with tempfile.TemporaryDirectory(prefix="fdlight-bench-listing-") as tmp:
        root = Path(tmp) / "images"
        write_empty_tree(root, files)
        seconds = {"list": [], "keep": [], "read_back": []}
        for r in range(rounds):
            run_dir = Path(tmp) / f"run_{r}"
            run_dir.mkdir()
            with kept_in(run_dir):
                start = time.perf_counter()
                listing = listed("train", lambda: folder_listing(root, "root"), "images")
                seconds["list"].append(time.perf_counter() - start)
                start = time.perf_counter()
                save_listings(run_dir)
                seconds["keep"].append(time.perf_counter() - start)
                start = time.perf_counter()
                again = Listing.parse((run_dir / "listing-train.txt").read_text(), run_dir)
                seconds["read_back"].append(time.perf_counter() - start)
            assert again.entries == listing.entries and len(listing.entries) == files
    result = dict(files=files, **{f"{k}_s": min(v) for k, v in seconds.items()})
    print(f"fdlight.bench.data listing: files={files} " + " ".join(f"{k}_s={min(v):.3f}" for k, v in seconds.items())
          + f" (best of {rounds}; goal: list_s <= 2.0 for 100,000 files)")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("distill", "finetune"), default="distill")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: this process alone, one core)")
    ap.add_argument("--decode", default="pil,pil_draft", help="comma list of data.decode values to time in turn")
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--sizes", default="imagenet", help="imagenet (a mix), or a list such as 500x375,375x500")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", type=int, default=64, help="fixed crops compared between pil_draft and pil")
    ap.add_argument("--root", default=None, help="an existing ImageFolder root (train/<class>/*) instead of one "
                                                 "written here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where gpu decodes")
    ap.add_argument("--listing", type=int, default=0, metavar="N", help="time listing N empty .jpg files in nested "
                                                                         "folders (data=images' start) instead")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.min_scale=0.67")
    args = ap.parse_args(argv)
    if args.listing:
        return time_listing(args.listing, args.rounds)
    decoders = [d for d in args.decode.split(",") if d]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker, as a loader worker runs
    try:
        return measure(args, decoders)
    finally:
        torch.set_num_threads(threads)


def measure(args, decoders: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fdlight-bench-data-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        folder = {}
        if not args.root:
            folder = write_imagefolder(root, args.images, args.classes, parse_sizes(args.sizes), args.quality)
            print(f"fdlight.bench.data folder: {folder['images']} JPEGs, quality {args.quality}, mean "
                  f"{folder['mean_pixels'] / 1e3:.0f} kpixel, {folder['bits_per_pixel']:.2f} bits/pixel, "
                  f"sizes={args.sizes}")
        device = torch.device(args.device)
        modules = {d: stage_data(args.stage, config(args.stage, root, d, args.workers, args.batch, args.overrides))
                   for d in decoders}
        rates: dict[str, list[float]] = {d: [] for d in decoders}
        for d in decoders:  # warm-up: page cache, imports, the first worker start
            timed_pass(modules[d], device)
        for _ in range(args.rounds):
            for d in decoders:
                images, seconds = timed_pass(modules[d], device)
                rates[d].append(images / seconds)
        per = max(args.workers, 1)
        result = dict(stage=args.stage, workers=args.workers, sizes=args.sizes, folder=folder, decoders={})
        for d in decoders:
            r = rates[d]
            row = dict(img_per_s=round(statistics.median(r), 1), per_worker=round(statistics.median(r) / per, 1),
                       per_worker_min=round(min(r) / per, 1), per_worker_max=round(max(r) / per, 1))
            result["decoders"][d] = row
            print(f"fdlight.bench.data stage={args.stage} decode={d} workers={args.workers} "
                  + " ".join(f"{k}={v}" for k, v in row.items()))
        if "pil" in rates:
            for d in decoders:
                if d != "pil":
                    ratios = [a / b for a, b in zip(rates[d], rates["pil"])]
                    result[f"{d}_vs_pil"] = round(statistics.median(ratios), 3)
                    print(f"fdlight.bench.data {d}/pil = {statistics.median(ratios):.2f}x (median of "
                          f"{len(ratios)} paired rounds; min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
        if args.compare and "pil_draft" in decoders and args.stage == "distill":
            result["fixed_crops"] = fixed_crops(args.stage, root, args.compare, args.overrides)
            print("fdlight.bench.data pil_draft vs pil on fixed crops: "
                  + " ".join(f"{k}={v}" for k, v in result["fixed_crops"].items()) + " (8-bit levels)")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
