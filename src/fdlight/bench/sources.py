"""`python -m fdlight.bench.sources`: the cost of reading images as they lie (`data=images`) against the ImageFolder
layout, whole process.

It writes `--images` small JPEGs (photo-like, `--size` pixels) in ImageNet's layout (root/train/<class>/), then runs
`python -m fdlight stage=distill` on them `--rounds` times each way, the two commands alternated (so a busy machine
slows both alike): `data=imagenet data.root=ROOT` and `data=images data.root=ROOT/train`. Each run is timed from
process start to exit (Python, torch and the listing included). It prints every run's seconds, each way's min and
median and the ratio of medians and of mins (goal: data=images at most 1.15x the ImageFolder run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fdlight.bench.data import photo

WAYS = {"imagefolder": ["data=imagenet", "data.root={root}"], "images": ["data=images", "data.root={root}/train"]}


def write_folder(root: Path, images: int, size: tuple[int, int], classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, *size).save(folder / f"img_{i:05d}.jpg", "JPEG", quality=90)


def run_once(way: str, root: Path, run_dir: Path, extra: list[str]) -> float:
    args = [a.format(root=root) for a in WAYS[way]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fdlight", "trainer=cpu", "logger=csv", *args, *extra,
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"fdlight.bench.sources: the {way} run failed:\n{res.stderr[-2000:]}")
    return seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", default="96x72", help="WxH of every image")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="config overrides for both runs (default: distill.epochs=2 "
                                                 "data.num_workers=2)")
    args = ap.parse_args(argv)
    extra = args.overrides or ["distill.epochs=2", "data.num_workers=2"]
    w, _, h = args.size.partition("x")
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="fdlight-bench-sources-") as tmp:
        root = Path(tmp) / "folder"
        write_folder(root, args.images, (int(w), int(h)))
        for r in range(args.rounds):
            for way in (WAYS if r % 2 == 0 else reversed(WAYS)):  # alternate which goes first
                seconds[way].append(run_once(way, root, Path(tmp) / f"{way}_{r}", extra))
                print(f"fdlight.bench.sources round {r} {way}: {seconds[way][-1]:.1f} s", flush=True)
    result = {way: dict(min_s=min(s), median_s=statistics.median(s), runs=s) for way, s in seconds.items()}
    result["ratio_median"] = result["images"]["median_s"] / result["imagefolder"]["median_s"]
    result["ratio_min"] = result["images"]["min_s"] / result["imagefolder"]["min_s"]
    for way in WAYS:
        print(f"fdlight.bench.sources {way}: min {result[way]['min_s']:.1f} s, median {result[way]['median_s']:.1f} s "
              f"over {args.rounds} runs")
    print(f"fdlight.bench.sources data=images / ImageFolder: {result['ratio_median']:.3f}x (medians), "
          f"{result['ratio_min']:.3f}x (mins); goal <= 1.15x")
    return result


if __name__ == "__main__":
    main()
