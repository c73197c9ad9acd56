"""k-NN evaluation of frozen features: the vote against a hand computation and scikit-learn, stage=knn on every kind of
input against an independent recomputation, the online monitor of a distillation run, and bad input."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TINY, run_cli, run_stage
from test_distill_errors import write_imagefolder
from test_reliability import cli, one_error

DISTILL = ["data.num_train=64", "data.num_val=32", "distill.batch_size=16", "distill.epochs=2",
           "monitor.every_n_epochs=1", "monitor.max_images=32", "monitor.k=5"]
KNN = ["stage=knn", "knn.k=5"]
SMALL = ["data.num_train=64", "data.num_val=32"]


# ------------------------------------------------------------------------------------------------------ the vote
def test_votes_match_a_hand_computation():
    from fdlight.diagnostics.knn import class_scores, knn_accuracy

    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])  # unit rows already
    labels = torch.tensor([0, 0, 1, 2])
    norm = math.hypot(-0.2, 1.0)
    query = torch.tensor([[-0.2, 1.0]])
    sims = [-0.2 / norm, (-0.16 + 0.6) / norm, 1.0 / norm, 0.2 / norm]  # cosine to each bank row
    t = 0.5
    scores = class_scores(bank, labels, query, k=3, temperature=t, num_classes=3)
    expected = [math.exp(sims[1] / t), math.exp(sims[2] / t), math.exp(sims[3] / t)]  # row 0 is the 4th nearest
    assert torch.allclose(scores[0], torch.tensor(expected), rtol=1e-6)
    r = knn_accuracy(bank, labels, query, torch.tensor([1]), k=3, temperature=t, num_classes=3)
    assert (r.top1, r.top5) == (1.0, 1.0)
    r = knn_accuracy(bank, labels, query, torch.tensor([0]), k=3, temperature=t, num_classes=3)
    assert (r.top1, r.top5) == (0.0, 1.0)
    # leave-one-out: row 1's nearest other row is row 0 (class 0), row 2's is row 1 (class 0)
    own = class_scores(bank, labels, bank, k=1, temperature=t, num_classes=3, exclude_self=True)
    assert own.argmax(dim=1).tolist() == [0, 0, 0, 1]


def test_votes_match_scikit_learn_with_the_same_weights():
    from sklearn.neighbors import KNeighborsClassifier

    from fdlight.diagnostics.knn import class_scores, knn_accuracy

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g)
    bank_labels = torch.randint(0, 6, (300,), generator=g)
    query_labels = torch.randint(0, 6, (80,), generator=g)
    bank = centres[bank_labels] + 1.5 * torch.randn(300, 16, generator=g)
    queries = centres[query_labels] + 1.5 * torch.randn(80, 16, generator=g)
    k, t = 15, 0.07
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                              weights=lambda d: np.exp((1.0 - d) / t))  # cosine distance = 1 - similarity
    sk.fit(bank.double().numpy(), bank_labels.numpy())
    ours = class_scores(bank.double(), bank_labels, queries.double(), k, t, 6)
    assert ours.argmax(dim=1).tolist() == sk.predict(queries.double().numpy()).tolist()
    proba = sk.predict_proba(queries.double().numpy())
    assert np.allclose((ours / ours.sum(dim=1, keepdim=True)).numpy(), proba, atol=1e-9)
    r = knn_accuracy(bank, bank_labels, queries, query_labels, k, t, 6)
    assert r.top1 == pytest.approx(sk.score(queries.double().numpy(), query_labels.numpy()))
    assert 0.3 < r.top1 < 1.0  # the clusters overlap: neither chance nor a trivial 100%


# ----------------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny monitored distillation run (2 epochs of 4 steps) and stage=knn of it in every form it is given."""
    base = tmp_path_factory.mktemp("knn")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = base / "distill"
        out = {"run": run, "distill": run_stage(DISTILL, run)}
        for name, spec in (("dir", run), ("export", run / "student.safetensors"),
                           ("ckpt", run / "checkpoints" / "last.ckpt"), ("teacher", "teacher")):
            out[name] = run_stage([*KNN, *SMALL, f"knn.pretrained={spec}"], base / f"knn_{name}")
            out[f"{name}_dir"] = base / f"knn_{name}"
    finally:
        torch.set_num_threads(before)
    return out


def test_every_form_of_a_checkpoint_gives_the_same_number(distilled):
    d = distilled
    assert d["dir"]["top1"] == d["export"]["top1"] == d["ckpt"]["top1"]
    assert d["dir"]["top5"] == d["export"]["top5"] == d["ckpt"]["top5"]
    assert d["dir"]["num_bank"] == 64 and d["dir"]["num_queries"] == 32 and d["dir"]["k"] == 5
    assert d["teacher"]["kind"] == "teacher" and d["dir"]["kind"] == "distilled student"
    for name in ("dir", "teacher"):
        saved = json.loads((d[f"{name}_dir"] / "metrics.json").read_text())
        assert saved["top1"] == d[name]["top1"] and saved["stage"] == "knn"
        assert f"{100 * d[name]['top1']:.2f}%" in (d[f"{name}_dir"] / "results.md").read_text()


def test_the_stage_equals_an_independent_recomputation(distilled):
    """The export loaded by plain timm, the synthetic splits through the eval transform, the vote by hand."""
    from fdlight.data.synthetic import SyntheticClassification
    from fdlight.data.transforms import eval_transform

    path = distilled["run"] / "student.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **json.loads(meta["timm_kwargs"])).eval()
    tf = eval_transform(32)

    def embed(split, n):
        ds = SyntheticClassification(split, n, 64, 10, 0, tf)
        x = torch.stack([ds[i][0] for i in range(n)])
        with torch.no_grad():
            f = model.forward_features(x)[:, 0]  # the FD student's CLS token after its final norm
        return torch.nn.functional.normalize(f, dim=1), torch.tensor([ds[i][1] for i in range(n)])

    bank, bank_y = embed("train", 64)
    queries, query_y = embed("val", 32)
    top = (queries @ bank.T).topk(5, dim=1)
    votes = torch.zeros(32, 10).scatter_add_(1, bank_y[top.indices], (top.values / 0.07).exp())
    assert distilled["dir"]["top1"] == pytest.approx(float((votes.argmax(1) == query_y).float().mean()))


# ------------------------------------------------------------------------------------------------------ monitor
def test_the_monitor_logs_a_curve_and_the_teacher_once(distilled):
    m = distilled["distill"]["monitor"]
    assert [e["epoch"] for e in m["knn"]] == [0, 1, 2] and [e["step"] for e in m["knn"]] == [0, 4, 8]
    assert all(0.0 <= e["top1"] <= e["top5"] <= 1.0 for e in m["knn"])
    assert set(m["teachers"]) == {"teacher"} and m["num_images"] == 32
    rows = (distilled["run"] / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = [r.split(",")[header.index("monitor/knn_top1")] for r in rows[1:]]
    assert [float(v) for v in column if v] == [e["top1"] for e in m["knn"]]
    teacher = [r.split(",")[header.index("monitor/teacher_knn_top1")] for r in rows[1:]]
    assert [float(v) for v in teacher if v] == [m["teachers"]["teacher"]["top1"]]


def test_monitoring_leaves_training_bit_for_bit_as_it_was(distilled, tmp_path, one_thread):
    plain = tmp_path / "plain"
    run_stage([*(a for a in DISTILL if not a.startswith("monitor.")), "monitor=none"], plain)
    assert "monitor" not in json.loads((plain / "metrics.json").read_text())
    with safe_open(str(plain / "student.safetensors"), framework="pt") as a, \
            safe_open(str(distilled["run"] / "student.safetensors"), framework="pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_without_labelled_val_split_monitoring_is_off_with_a_notice(tmp_path):
    write_imagefolder(tmp_path / "data", per_class=8)  # train/ only
    code, err = cli([*TINY, "data=imagenet", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                     "distill.batch_size=8", "distill.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0, err[-3000:]
    notes = [ln for ln in (tmp_path / "run" / "fdlight.log").read_text().splitlines() if "monitor=knn is off" in ln]
    assert len(notes) == 1 and "no val/ folder" in notes[0] and "monitor.data=" in notes[0]
    assert "monitor" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a labelled set named with monitor.data monitors the same run
    code, err = cli([*TINY, "data=imagenet", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                     "distill.batch_size=8", "distill.max_steps=1", "monitor.data={name: synthetic, num_val: 16}",
                     "monitor.k=5", f"hydra.run.dir={tmp_path / 'named'}"])
    assert code == 0, err[-3000:]
    monitor = json.loads((tmp_path / "named" / "metrics.json").read_text())["monitor"]
    assert monitor["num_images"] == 16 and [e["step"] for e in monitor["knn"]] == [0, 1]


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_leaves_nothing(distilled, tmp_path):
    def refused(args, run_dir):
        line = one_error(*cli([*TINY, *KNN, *args, f"hydra.run.dir={run_dir}"]))
        assert not run_dir.exists(), list(run_dir.iterdir())
        return line

    export = distilled["run"] / "student.safetensors"
    line = refused([*SMALL, f"knn.pretrained={export}", "knn.k=65"], tmp_path / "a")
    assert "knn.k=65" in line and "64 images" in line

    write_imagefolder(tmp_path / "data", per_class=3)
    (tmp_path / "data" / "val").mkdir()
    (tmp_path / "data" / "train" / "cat" / "cat_0.JPEG").rename(tmp_path / "data" / "val" / "loose.JPEG")
    line = refused([f"knn.pretrained={export}", "data=imagenet", f"data.root={tmp_path / 'data'}"], tmp_path / "b")
    assert "val" in line and "class" in line

    with safe_open(str(export), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(tmp_path / "alien.safetensors"), {**meta, "timm_model": "no_such_model_v9"})
    line = refused([*SMALL, f"knn.pretrained={tmp_path / 'alien.safetensors'}"], tmp_path / "c")
    assert "no_such_model_v9" in line

    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        line = refused([*SMALL, f"knn.pretrained={export}"], ro / "run")
        assert "read-only" in line
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.xdist_group("processes")
def test_ddp_ranks_share_the_embedding_and_give_the_single_process_number(distilled, tmp_path):
    run = tmp_path / "ddp"
    res = run_cli([*TINY, *KNN, *SMALL, f"knn.pretrained={distilled['run']}", "trainer.strategy=ddp",
                   "trainer.devices=2", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((run / "metrics.json").read_text())
    assert (run / "train_ddp_process_1.log").is_file()  # a second rank ran
    assert (saved["top1"], saved["top5"], saved["num_bank"]) == (distilled["dir"]["top1"], distilled["dir"]["top5"],
                                                                64)
