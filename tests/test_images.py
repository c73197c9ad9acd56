"""data=images: any folder of images (nested, no class structure, every file kind a camera or a tool writes) or a
list file, distilled on the CPU; unreadable files skipped and counted; EXIF-rotated images seen upright under every
decoder; held-out splits; the listing kept in the run directory and read back by an exact resume; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose, run_main, run_stage
from fdlight.data.decode import DraftDecode
from fdlight.data.gpu import EncodedView, GPUDecoding, collate_encoded, upright
from fdlight.data.listing import kept_in, walk_images
from fdlight.data.pixels import UPRIGHT, as_rgb
from fdlight.data.seeded import seeded_globals
from fdlight.data.transforms import fd_train_transform
from fdlight.errors import FDLightError
from fdlight.stages.distill import distill_data
from test_resume import check_exact_resume

ORIENTATION = 0x0112


def photo(seed: int, w: int, h: int) -> Image.Image:
    """A smooth picture with structure in both directions (so a turn or a flip changes it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def rotated_jpeg(path: Path, upright: Image.Image) -> None:
    """The picture as a camera held on its side stores it: pixels turned, EXIF orientation 6 (turn 90 clockwise)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif.tobytes())


def write_every_kind(root: Path) -> dict[str, Path]:
    """Nine images three folders deep in no class structure, one of each kind, plus a corrupt file and what a folder
    of photos also holds (a note, a hidden file)."""
    paths = {k: root / p for k, p in {
        "jpeg": "2024/site_a/day1/img_0001.jpg", "upper": "2024/site_a/day1/IMG_0002.JPEG",
        "png": "2024/site_a/day2/tile.png", "webp": "2024/site_b/x/y/z/tile.webp", "cmyk": "2023/scan_cmyk.jpg",
        "png16": "2023/deep/er/still/depth16.png", "palette": "2023/palette.png", "rgba": "misc/alpha.png",
        "rotated": "misc/phone/rotated.jpg", "corrupt": "misc/broken.jpg"}.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    photo(0, 80, 60).save(paths["jpeg"], quality=90)
    photo(1, 64, 64).save(paths["upper"], "JPEG", quality=90)
    photo(2, 72, 56).save(paths["png"])
    photo(3, 64, 48).save(paths["webp"], "WEBP", quality=90)
    photo(4, 70, 50).convert("CMYK").save(paths["cmyk"], "JPEG", quality=95)
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491: needs all 16 bits
    Image.fromarray(ramp).save(paths["png16"])
    photo(5, 60, 60).quantize(16).save(paths["palette"])
    photo(6, 50, 70).convert("RGBA").save(paths["rgba"])
    rotated_jpeg(paths["rotated"], photo(7, 96, 64))
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 truncated, not a picture")
    (root / "misc" / "notes.txt").write_text("not an image")
    (root / "misc" / "._rotated.jpg").write_bytes(b"resource fork")  # a hidden file a Mac leaves beside a copy
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("photos")
    return root, write_every_kind(root)


def test_the_listing_is_every_image_at_any_depth_sorted(images):
    root, paths = images
    assert walk_images(root) == sorted(str(p.relative_to(root)) for p in paths.values())


def test_every_kind_of_file_becomes_upright_8_bit_rgb(images):
    _, paths = images
    for kind, path in paths.items():
        if kind == "corrupt":
            continue
        img = as_rgb(Image.open(path))
        assert img.mode == "RGB", kind
    depth = np.asarray(as_rgb(Image.open(paths["png16"])))[..., 0]
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21) >> 8  # scaled, not clipped at 255 as PIL's convert would
    assert np.array_equal(depth, ramp)
    cmyk = np.asarray(as_rgb(Image.open(paths["cmyk"])), dtype=float)
    assert np.abs(cmyk - np.asarray(photo(4, 70, 50), dtype=float)).mean() < 8  # colours survive the round trip
    rotated = as_rgb(Image.open(paths["rotated"]))
    assert rotated.size == (96, 64)  # stored 64 x 96, shown upright
    upright = np.asarray(photo(7, 96, 64), dtype=float)
    assert np.abs(np.asarray(rotated, dtype=float) - upright).mean() < 6  # JPEG's loss only
    assert np.abs(np.asarray(rotated, dtype=float)[::-1, ::-1] - upright).mean() > 40  # a wrong turn is far off


def test_a_rotated_image_is_upright_under_every_decoder(images):
    """pil_draft and gpu (run on the CPU here) draw their crop on the upright image, as pil does."""
    path = images[1]["rotated"]
    pil = fd_train_transform(32, min_scale=0.9)
    with seeded_globals(3):
        expected = pil(as_rgb(Image.open(path)))
    with seeded_globals(3):
        draft = DraftDecode(pil)(Image.open(path))
    assert torch.equal(draft, expected)
    view = EncodedView(pil)
    with seeded_globals(3):
        encoded = view(Image.open(path))
    gpu = GPUDecoding(view)(collate_encoded([(encoded, -1)]), torch.device("cpu"))[0][0]
    levels = (gpu - expected).abs() * 255 * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.5  # as for upright files (tests/test_decode.py)


def test_the_gpu_decoders_turn_is_pils_for_every_exif_orientation():
    """torchvision applies EXIF orientation on the CPU only: data.decode=gpu turns the decoded tensor itself."""
    pixels = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for turn, method in UPRIGHT.items():
        turned = upright(torch.from_numpy(pixels).permute(2, 0, 1), turn).permute(1, 2, 0).numpy()
        assert np.array_equal(turned, np.asarray(Image.fromarray(pixels).transpose(method))), turn


def test_distillation_reads_a_nested_folder_skipping_and_counting_the_corrupt_file(images, tmp_path, caplog):
    root, paths = images
    metrics = run_stage(["data=images", f"data.root={root}", f"data.val_root={root / '2023'}", "data.num_workers=0",
                         "distill.batch_size=3", "distill.epochs=1", "distill.num_threads=1"], tmp_path / "run")
    assert metrics["steps"] == 3 and metrics["skipped_images"] == 1  # 10 files, batches of 3; the corrupt one
    assert 0 < metrics["val/loss"] < 10  # the held-out images' FD loss under the final weights
    kept = (tmp_path / "run" / "listing-train.txt").read_text().splitlines()
    assert kept[0] == f"# fdlight listing 1 root={root}" and kept[1:] == walk_images(root)
    assert f"skipping unreadable image {paths['corrupt']}" in caplog.text


def test_a_list_file_names_the_images_relative_to_its_folder(images, tmp_path):
    root, paths = images
    names = [paths["png"], paths["rotated"], paths["cmyk"], paths["webp"]]
    listing = root / "2024" / "chosen.txt"
    listing.write_text("# picked by hand\n" + "\n".join(
        [str(names[0].relative_to(listing.parent)), f"../{names[1].relative_to(root)}", "", str(names[2]),
         f"../{names[3].relative_to(root)}"]) + "\n")
    cfg = compose([*TINY, "data=images", f"data.list={listing}", "data.num_workers=0", "distill.batch_size=2"])
    data = distill_data(cfg)
    data.setup()
    assert [Path(p).resolve() for p in data.train_set.paths] == names
    assert len(list(data.train_dataloader())) == 2


def test_held_out_images_are_a_fixed_seeded_split_or_a_folder(images):
    root, _ = images

    def split(*args):
        data = distill_data(compose([*TINY, "data=images", f"data.root={root}", "distill.batch_size=2", *args]))
        data.setup()
        return data.train_set.paths, data.val_set.paths

    train, val = split("data.val_fraction=0.3")
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == sorted(
        str(root / p) for p in walk_images(root))
    assert split("data.val_fraction=0.3", "seed=5") == (train, val)  # the run's seed does not move it
    assert split("data.val_fraction=0.3", "data.split_seed=1")[1] != val
    train, val = split(f"data.val_root={root / '2023'}")
    assert len(val) == 3 and len(train) == 10


@pytest.mark.parametrize("args,expected", [
    (["data.root={empty}"], "holds no images"),
    (["data.root={root}/nowhere"], "does not exist"),
    (["data.list={root}/list.txt"], "names 1 file(s) that do not exist (first: missing/x.jpg"),
    (["data.root={root}", "data.val_fraction=1.5"], "data.val_fraction=1.5 must lie between 0 and 1"),
    (["stage=finetune", "data.root={root}"], "data=images holds no class labels"),
])
def test_bad_input_is_one_line_and_leaves_no_run(images, tmp_path, args, expected):
    root, _ = images
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no pictures")
    (root / "list.txt").write_text("2024/site_a/day2/tile.png\nmissing/x.jpg\n")
    args = [a.format(root=root, empty=tmp_path / "empty") for a in args]
    with pytest.raises(FDLightError, match="data") as e:
        run_stage(["data=images", *args], tmp_path / "run")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_folder_with_no_images_in_one_line(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    res = run_main([*TINY, "data=images", f"data.root={tmp_path / 'photos'}", f"hydra.run.dir={tmp_path / 'r'}"],
                   cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "holds no images" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_a_listing_kept_in_the_run_directory_is_read_back(images, tmp_path):
    root, _ = images
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "listing-train.txt").write_text(f"# fdlight listing 1 root={root}\n2024/site_a/day2/tile.png\n"
                                               f"misc/alpha.png\n")
    with kept_in(run_dir):
        data = distill_data(compose([*TINY, "data=images", f"data.root={root}", "distill.batch_size=2"]))
        data.setup()
    assert data.train_set.paths == [str(root / "2024/site_a/day2/tile.png"), str(root / "misc/alpha.png")]


def test_a_killed_run_resumes_bit_for_bit_on_the_images_it_listed(tmp_path):
    """24 images, a quarter held out, 4 a batch: 4 steps an epoch, 4 epochs, a checkpoint every step (a step takes
    milliseconds, so a rarer checkpoint can come and go between two looks of a busy poller). Images added after the
    kill are not read by the resumed run (else its weights would differ from the run left alone)."""
    root = tmp_path / "photos"
    for i in range(24):
        path = root / f"cam{i % 3}" / f"day{i % 2}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(i, 48 + i, 40).save(path, quality=90)
    args = ["data=images", f"data.root={root}", "data.val_fraction=0.25", "data.num_workers=1", "distill.batch_size=4",
            "distill.epochs=4", "distill.checkpoint_every_n_steps=1", "distill.num_threads=1"]

    class AddImages:
        def __call__(self, step: int) -> bool:
            if step >= 6 and step % 4:
                for i in range(4):
                    photo(100 + i, 48, 40).save(root / "cam0" / f"added_{i}.jpg", quality=90)
                return True
            return False

    killed_at = check_exact_resume(tmp_path, args, 16, AddImages(), ("student.safetensors",))
    assert killed_at % 4  # mid-epoch
    assert "files added since are not read" in (tmp_path / "killed" / "fdlight.log").read_text()
    val = [json.loads((tmp_path / run / "metrics.json").read_text())["val/loss"] for run in ("reference", "killed")]
    assert val[0] == val[1]


def test_linked_folders_are_followed_and_a_link_up_the_tree_ends(tmp_path):
    (tmp_path / "a").mkdir()
    photo(0, 8, 8).save(tmp_path / "a" / "x.JPG")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "also_a").symlink_to(tmp_path / "a")
    assert walk_images(tmp_path) == ["a/x.JPG", "b/also_a/x.JPG"]
