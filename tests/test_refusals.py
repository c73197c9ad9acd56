"""Commands that would train on something else than the user meant, or stop in a traceback: one line that names the
bad setting, exit status 2, and nothing left behind."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, compose, run_cli
from fdlight.data.classification import check_root
from fdlight.errors import FDLightError

# Each is refused before torch loads (about a second each).
REFUSED = {
    "a data.root the embedded data does not read": (
        ["data.root=/my/photos"], r"data=synthetic does not read data\.root \('data\.root=/my/photos'\), so it would "
                                  r"be ignored; data\.root is read by data=ade20k, data=coco, data=imagenet, data=images, data=shards"),
    "a data key added with +": (["+data.strict=true"], r"data=synthetic does not read data\.strict \('\+data"),
    "a data key an experiment sets on another source": (
        ["experiment=demo", "data=imagenet", "data.root=/x"],
        r"data=imagenet does not read data\.num_train \(set by the chosen experiment=\).*read by data=synthetic"),
    "another architecture as student.model": (
        ["student.model=convnext_atto"], r"student\.model=convnext_atto is not an architecture student=tiny builds "
                                         r"\(.*beit_base_patch16_224.*\); .*student=swinv2_b, .*student=vit_l14 "
                                         r"\(any timm model: student=timm student\.name=convnext_atto\)$"),
    "a CNN as a Swin student": (["student=swinv2_b", "student.model=resnet18"],
                                r"student\.model=resnet18 is not an architecture student=swinv2_b builds"),
    "negative loader workers": (["data.num_workers=-1"], r"data\.num_workers=-1 must be a whole number >= 0 or null"),
    "a SLURM sweep where there is no SLURM": (["-m", "hydra/launcher=fdlight_slurm", "drop_path.student=0.1,0.2"],
                                              r"hydra/launcher=fdlight_slurm submits the jobs to SLURM, and this "
                                              r"machine has no SLURM"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_in_one_line_leaving_nothing(tmp_path, case):
    args, expected = REFUSED[case]
    res = run_cli([*TINY, *args], cwd=tmp_path, env={"PATH": str(Path(sys.executable).parent)})  # no srun here
    lines = [line for line in res.stderr.splitlines() if line.startswith("fdlight: error: ")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert re.search(expected, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []  # no run directory, no multirun.yaml


def test_a_student_config_takes_the_models_of_its_architecture():
    from fdlight.config import check_student_model

    cfg = compose(["student=vit_b16", "student.model=beit_large_patch16_224"])
    check_student_model(cfg.student, "vit_b16")  # the same blocks and kwargs at another size


def folder_errors(root: Path) -> str:
    with pytest.raises(FDLightError) as e:
        check_root(compose(["data=imagenet", f"data.root={root}"]).data)
    return str(e.value)


def test_an_empty_class_folder_is_named(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name / "0.png")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("not an image")
    assert folder_errors(tmp_path).startswith(f"class folder {tmp_path / 'train' / 'empty'} holds no images; ")


def test_a_file_as_data_root_is_called_a_file(tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"PK")
    assert folder_errors(tmp_path / "photos.zip") == \
        f"data.root={tmp_path / 'photos.zip'} is a file, and data.root takes a folder; point data.root at a folder " \
        f"holding train/<class>/<image>"
