"""stage=embed: rows in the split's order with their sources in index.txt, the spatial map, and a run killed with
SIGKILL that resumes to the uninterrupted run's files bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_stage
from test_distill_errors import write_imagefolder

EMBED = [*TINY, "stage=embed", "embed.pretrained=teacher", "embed.batch_size=8", "embed.chunk_batches=1"]


def test_an_image_folder_is_embedded_row_for_row_with_its_paths(tmp_path, one_thread):
    write_imagefolder(tmp_path / "data", per_class=5)
    m = run_stage([*EMBED, "data=imagenet", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                   "embed.spatial=true", "embed.dtype=float32"], tmp_path / "run")
    rows = load_file(str(tmp_path / "run" / "embeddings.safetensors"))
    names = (tmp_path / "run" / "index.txt").read_text().splitlines()
    assert m["rows"] == 10 == len(names) == len(rows["embeddings"]) and not (tmp_path / "run" / "parts").exists()
    assert names[0].endswith("train/cat/cat_0.JPEG") and names[-1].endswith("train/dog/dog_4.JPEG")
    assert rows["labels"].tolist() == [0] * 5 + [1] * 5 and rows["embeddings"].dtype == torch.float32
    assert rows["spatial"].shape == (10, 64, 4, 4)  # the tiny teacher: width 64, 32 px / 8
    # row 7 is the teacher's CLS token of that image, computed here without the stage
    from fdlight.data.transforms import eval_transform
    from fdlight.diagnostics.loading import load_subject
    from fdlight.stages.knn import config
    from PIL import Image

    subject = load_subject("teacher", config(["trainer=cpu"]))
    x = eval_transform(32)(Image.open(names[7]).convert("RGB"))[None]
    with torch.no_grad():
        cls = subject.model.forward_features(subject.prepare(x))[0, 0]
    assert torch.allclose(rows["embeddings"][7], cls, atol=1e-6)
    assert torch.allclose(rows["spatial"][7].flatten(1).T, subject.model.forward_features(subject.prepare(x))[0, 1:],
                          atol=1e-6)



def test_unlabelled_images_in_nested_folders_are_embedded_with_their_paths(tmp_path, one_thread):
    """data=images has no labels: embedding needs none (the rows carry no labels, index.txt the files)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = [tmp_path / "photos" / "a" / "b" / f"{i}.jpg" for i in range(3)] + [tmp_path / "photos" / "z.png"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(f)
    m = run_stage([*EMBED, "data=images", f"data.root={tmp_path / 'photos'}", "data.num_workers=0"], tmp_path / "run")
    rows = load_file(str(tmp_path / "run" / "embeddings.safetensors"))
    assert m["rows"] == 4 == len(rows["embeddings"]) and "labels" not in rows
    assert (tmp_path / "run" / "index.txt").read_text().splitlines() == [str(f) for f in sorted(files)]
    assert m["data"] == "images" and m["train_images"] == 4

def test_a_killed_embed_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    data = ["data.num_train=512"]
    whole = tmp_path / "whole"
    run_stage([*EMBED, *data], whole)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fdlight", *EMBED, *data, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    parts = killed / "parts"
    while proc.poll() is None and len(list(parts.glob("part-*.safetensors")) if parts.is_dir() else []) < 3:
        time.sleep(0.01)  # polling the folder: the parts are the event
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert not (killed / "embeddings.safetensors").exists() and not (killed / "metrics.json").exists()

    m = run_stage([*EMBED, *data, "resume=true"], killed)
    assert 0 < m["embedded_now"] < 512 and m["rows"] == 512
    a, b = load_file(str(whole / "embeddings.safetensors")), load_file(str(killed / "embeddings.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "index.txt").read_bytes() == (killed / "index.txt").read_bytes()
    assert json.loads((killed / "metrics.json").read_text())["rows"] == 512
