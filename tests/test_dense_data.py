"""Dense data: ADE20K and COCO read from real on-disk layouts written here, the synthetic sets, the transforms, and
every bad input named in one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, run_main
from fdlight.data.ade20k import ADE20K
from fdlight.data.coco import CocoDetection, decode_mask
from fdlight.data.dense import (IGNORE, DetectionData, LargeScaleJitter, SegmentationData, SegmentationEvalTransform,
                                SegmentationTrainTransform, SyntheticDetection, SyntheticSegmentation)
from fdlight.errors import FDLightError

ADE_SIZE = (40, 56)  # (h, w) of every fixture image


# ------------------------------------------------------------------------------------------------ fixtures
def write_ade20k(parent: Path, n_train: int = 4, n_val: int = 2, size=ADE_SIZE) -> Path:
    """ADEChallengeData2016 as released: JPEG images and 8-bit PNG label maps (0 = other, 1..150 = classes)."""
    rng = np.random.default_rng(0)
    root = parent / "ADEChallengeData2016"
    h, w = size
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{name}.jpg")
            label = np.zeros((h, w), np.uint8)
            label[: h // 2, : w // 2] = 1 + i % 3      # a class in the top-left quarter
            label[h // 2:, w // 2:] = 150              # the last class
            label[: h // 2, w // 2:] = 0               # "other": ignored
            label[h // 2:, : w // 2] = 7
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def square(x0, y0, x1, y1, h, w) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def coco_rle(mask: np.ndarray, compressed: bool) -> dict:
    """A COCO RLE: column-major run lengths starting with zeros; compressed = faster-coco-eval's string form."""
    from faster_coco_eval.core import mask as mask_util

    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def write_coco(root: Path, size=(48, 40)) -> dict:
    """COCO 2017 layout with 3 train images (one without annotations) and 2 val images; categories 5 and 9; masks as
    a polygon, an uncompressed RLE and a compressed RLE. Returns the expected masks per (split, image id)."""
    h, w = size
    rng = np.random.default_rng(1)
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": 9, "name": "kite"}, {"id": 5, "name": "bus"}]
    expected = {}
    for split, n in (("train", 3), ("val", 2)):
        (root / f"{split}2017").mkdir()
        images, anns = [], []
        for i in range(n):
            iid = 100 * (split == "val") + i + 1
            name = f"{iid:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{split}2017" / name)
            images.append({"id": iid, "file_name": name, "height": h, "width": w})
            if split == "train" and i == 2:
                continue  # an image with no annotations
            poly = square(4, 6, 20, 26, h, w)
            rle_a, rle_b = square(22, 2, 36, 12, h, w), square(24, 30, 38, 46, h, w)
            anns += [
                {"id": 10 * iid + 1, "image_id": iid, "category_id": 5, "iscrowd": 0, "bbox": [4, 6, 16, 20],
                 "area": 320.0, "segmentation": [[4, 6, 20, 6, 20, 26, 4, 26]]},
                {"id": 10 * iid + 2, "image_id": iid, "category_id": 9, "iscrowd": 0, "bbox": [22, 2, 14, 10],
                 "area": 140.0, "segmentation": coco_rle(rle_a, compressed=False)},
                {"id": 10 * iid + 3, "image_id": iid, "category_id": 5, "iscrowd": 0, "bbox": [24, 30, 14, 16],
                 "area": 224.0, "segmentation": coco_rle(rle_b, compressed=True)},
            ]
            expected[(split, iid)] = {"masks": [poly, rle_a, rle_b], "labels": [1, 2, 1],
                                      "boxes": [[4, 6, 20, 26], [22, 2, 36, 12], [24, 30, 38, 46]]}
        js = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(js))
    return expected


def identity(image, target):
    return image, target


# ---------------------------------------------------------------------------------------------------- ADE20K
@pytest.mark.parametrize("level", ["release", "parent"])
def test_ade20k_reads_the_release_layout_from_it_or_its_parent(tmp_path, level):
    root = write_ade20k(tmp_path)
    ds = ADE20K(root if level == "release" else tmp_path, "training", identity)
    assert len(ds) == 4 and ds.root == root
    image, label = ds[1]
    raw = np.asarray(Image.open(root / "annotations" / "training" / "ADE_train_00000001.png"))
    assert image.size == (56, 40) and label.shape == raw.shape
    assert (label[raw == 0] == IGNORE).all()                       # 0 = other -> ignored
    assert (label[raw > 0] == raw[raw > 0] - 1).all()              # k -> k - 1
    assert set(np.unique(label)) == {1, 6, 149, IGNORE}


def test_segmentation_transforms_crop_pad_and_keep_the_label_resolution():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    label = rng.integers(0, 5, (40, 56)).astype(np.uint8)
    label[:4] = IGNORE
    x, y = SegmentationTrainTransform(32, ratio_range=(0.5, 2.0))(image, label)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE}
    x, y = SegmentationEvalTransform(32)(image, label)
    assert x.shape == (3, 32, 45) and torch.equal(y, torch.from_numpy(label).long())  # short side = crop; label as is


def test_ade20k_datamodule_through_the_config(tmp_path):
    write_ade20k(tmp_path)
    cfg = compose(["stage=segment", "data=ade20k", f"data.root={tmp_path}", "data.num_workers=0"])
    data = SegmentationData(cfg.data, 2, 32, eval_batch_size=2)
    data.setup()
    assert data.num_classes == 150
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32)
    images, labels = next(iter(data.val_dataloader()))
    assert len(images) == 2 and labels[0].shape == ADE_SIZE


@pytest.mark.parametrize("missing", ["images", "annotations"])
def test_ade20k_root_without_a_folder_says_which(tmp_path, missing):
    root = write_ade20k(tmp_path)
    (root / missing).rename(root / f"{missing}_moved")
    with pytest.raises(FDLightError, match=f"has no {missing}/ folder"):
        ADE20K(root, "training", identity)


def test_ade20k_label_map_of_another_size_is_named(tmp_path):
    root = write_ade20k(tmp_path)
    bad = root / "annotations" / "validation" / "ADE_valid_00000001.png"
    Image.fromarray(np.zeros((20, 20), np.uint8), mode="L").save(bad)
    with pytest.raises(FDLightError) as err:
        ADE20K(root, "validation", identity)
    assert str(bad) in str(err.value) and "20x20" in str(err.value) and "56x40" in str(err.value)


def test_ade20k_label_above_the_class_count_is_named(tmp_path):
    root = write_ade20k(tmp_path)
    bad = root / "annotations" / "training" / "ADE_train_00000002.png"
    label = np.asarray(Image.open(bad)).copy()
    label[0, 0] = 151
    Image.fromarray(label, mode="L").save(bad)
    ds = ADE20K(root, "training", identity)
    ds[0]  # a good file reads
    with pytest.raises(FDLightError) as err:
        ds[2]
    assert str(bad) in str(err.value) and "class 151" in str(err.value) and "150 classes" in str(err.value)


def test_ade20k_image_without_label_map_is_named(tmp_path):
    root = write_ade20k(tmp_path)
    (root / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(FDLightError, match="ADE_train_00000003.jpg"):
        ADE20K(root, "training", identity)


def test_segmentation_needs_a_dataset_with_masks(tmp_path):
    cfg = compose(["stage=segment", "data=imagenet", f"data.root={tmp_path}"])
    with pytest.raises(FDLightError, match="data=imagenet has no segmentation masks"):
        SegmentationData(cfg.data, 2, 32).setup()


# ------------------------------------------------------------------------------------------------------ COCO
def test_coco_decodes_polygons_and_both_rle_forms(tmp_path):
    expected = write_coco(tmp_path)
    ds = CocoDetection(tmp_path, "val", identity, train=False)
    assert ds.classes == ["bus", "kite"] and ds.cat_to_label == {5: 1, 9: 2}
    for index, iid in enumerate(ds.ids):
        image, target = ds[index]
        want = expected[("val", iid)]
        assert image.size == (40, 48)
        assert target["labels"].tolist() == want["labels"]
        assert target["boxes"].tolist() == want["boxes"]
        for got, mask in zip(target["masks"].bool().numpy(), want["masks"]):
            assert (got == mask).all()


def test_coco_polygon_fills_its_outline():
    mask = decode_mask([[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]], 10, 12)
    assert mask.shape == (10, 12) and mask[3:6, 3:8].all() and not mask[7:].any() and not mask[:, 10:].any()


@pytest.mark.parametrize("policy,length,skipped", [("skip", 2, 1), ("keep", 3, 0)])
def test_coco_images_without_annotations_are_counted_and_skipped_or_kept(tmp_path, policy, length, skipped):
    write_coco(tmp_path)
    ds = CocoDetection(tmp_path, "train", identity, empty_images=policy)
    assert len(ds) == length and ds.empty_images == 1 and ds.skipped == skipped
    if policy == "keep":
        _, target = ds[2]
        assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 48, 40)


def test_coco_json_that_does_not_parse_is_named(tmp_path):
    write_coco(tmp_path)
    bad = tmp_path / "annotations" / "instances_train2017.json"
    bad.write_text(bad.read_text()[:-20])
    with pytest.raises(FDLightError) as err:
        CocoDetection(tmp_path, "train", identity)
    assert str(bad) in str(err.value) and "not valid JSON" in str(err.value)


def test_coco_json_referencing_missing_images_names_them(tmp_path):
    write_coco(tmp_path)
    (tmp_path / "val2017" / "000000000101.jpg").unlink()
    with pytest.raises(FDLightError) as err:
        CocoDetection(tmp_path, "val", identity, train=False)
    assert "1 images missing" in str(err.value) and "000000000101.jpg" in str(err.value)


def test_coco_annotation_of_an_unknown_image_is_named(tmp_path):
    write_coco(tmp_path)
    path = tmp_path / "annotations" / "instances_val2017.json"
    js = json.loads(path.read_text())
    js["annotations"][0]["image_id"] = 999
    path.write_text(json.dumps(js))
    with pytest.raises(FDLightError, match="image id 999"):
        CocoDetection(tmp_path, "val", identity, train=False)


def test_coco_root_without_annotations_says_which(tmp_path):
    write_coco(tmp_path)
    (tmp_path / "annotations").rename(tmp_path / "ann")
    with pytest.raises(FDLightError, match="has no annotations/ folder"):
        CocoDetection(tmp_path, "train", identity)


def test_coco_datamodule_through_the_config(tmp_path):
    write_coco(tmp_path)
    cfg = compose(["stage=detect", "data=coco", f"data.root={tmp_path}", "data.num_workers=0"])
    data = DetectionData(cfg.data, 2, 64, scale_range=(0.5, 1.5), eval_batch_size=2)
    assert data.num_classes == 2 and data.classes == ["bus", "kite"]
    assert data.image_counts == {"empty_images_train": 1, "skipped_images_train": 1, "empty_images_val": 0}
    images, targets = next(iter(data.train_dataloader()))
    assert len(images) == 2 and images[0].shape == (3, 64, 64) and targets[0]["masks"].shape[1:] == (64, 64)
    images, targets = next(iter(data.val_dataloader()))
    assert targets[0]["masks"].shape[1:] == (48, 40)
    assert targets[0]["scale"].tolist() == pytest.approx([53 / 40, 64 / 48])  # per axis, after rounding


def test_coco_num_classes_disagreeing_with_the_json_is_refused(tmp_path):
    write_coco(tmp_path)
    cfg = compose(["stage=detect", "data=coco", f"data.root={tmp_path}", "data.num_classes=80"])
    with pytest.raises(FDLightError, match="data.num_classes=80 but the COCO json has 2 categories"):
        DetectionData(cfg.data, 2, 64).setup()


# ------------------------------------------------------------------------------------------- jitter, synthetic
def test_large_scale_jitter_gives_squares_with_boxes_around_their_masks():
    torch.manual_seed(0)
    ds = SyntheticDetection("train", 12, 64, 10, 0, LargeScaleJitter(48, scale_range=(0.3, 2.0)))
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 48, 48) and t["masks"].shape[1:] == (48, 48)
        for box, mask in zip(t["boxes"], t["masks"].bool()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            # boxes scale exactly, masks by nearest neighbour: they agree within a pixel
            assert 0 <= box[0] <= xs.min() + 1 and xs.max() <= box[2] <= 48
            assert 0 <= box[1] <= ys.min() + 1 and ys.max() <= box[3] <= 48


def test_large_scale_jitter_eval_pads_and_records_the_scale():
    image, t = LargeScaleJitter(64, train=False)(Image.new("RGB", (40, 20), (255, 0, 0)), {"boxes": torch.zeros(0, 4)})
    assert image.shape == (3, 64, 64) and t["size"].tolist() == [20, 40]
    assert t["scale"].tolist() == pytest.approx([1.6, 1.6])
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(image[:, 60, 0], torch.tensor([0.485, 0.456, 0.406]))  # padding = mean colour


def test_synthetic_scenes_feed_both_tasks():
    seg = SyntheticSegmentation("val", 4, 64, 10, 0, identity)
    det = SyntheticDetection("val", 4, 64, 10, 0, identity)
    for i in range(4):
        _, label = seg[i]
        _, target = det[i]
        shapes = label != IGNORE
        assert shapes.sum() == sum(int(m.sum()) for m in target["masks"])       # instances tile the shape pixels
        for mask, lab in zip(target["masks"].bool().numpy(), target["labels"].tolist()):
            assert (label[mask] == lab - 1).all()                              # detector 1..K = semantic 0..K-1


def test_cli_prints_one_line_for_a_bad_data_root(tmp_path):
    root = write_ade20k(tmp_path / "data")
    (root / "annotations").rename(root / "labels")
    res = run_main(["stage=segment", "data=ade20k", f"data.root={root}", "trainer=cpu",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert "has no annotations/ folder" in errors[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


def data_imports() -> dict[str, set[str]]:
    """For each module of fdlight.data, the fdlight.data modules it imports (at the top or inside a function)."""
    import ast

    import fdlight.data

    folder = Path(fdlight.data.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found |= {n.split(".")[2] for n in names if n.startswith("fdlight.data.")}
        graph[path.stem] = found
    return graph


def test_the_data_modules_import_one_another_without_a_cycle():
    graph = data_imports()
    assert {"ade20k", "coco"} <= graph["dense"]  # the edges that used to close a cycle are still there
    done, active = set(), []

    def visit(name):
        assert name not in active, f"import cycle: {' -> '.join(active[active.index(name):] + [name])}"
        if name not in done:
            active.append(name)
            for dep in sorted(graph.get(name, ())):
                visit(dep)
            active.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)
