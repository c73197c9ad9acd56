"""Open anything the diagnostics can look at: a teacher config, an exported model, a distillation checkpoint or a run
directory; the fixed evaluation subset; the training curves a run logged.

Checkpoint specs (`diagnose.checkpoints=[...]`):
  teacher            the composed config's teacher (teacher=<name> teacher.weights=<file> on the command line)
  teacher:<name>     conf/teacher/<name>.yaml as it ships (e.g. teacher:tiny, teacher:clip_vitb)
  <run directory>    its model.safetensors (fine-tuned), else student.safetensors (distilled), else
                     checkpoints/last.ckpt
  <file>.safetensors written by fdlight (timm name + kwargs in its metadata; a segmentation model gives its backbone)
  <file>.ckpt        a Lightning checkpoint of stage=distill (rebuilt from the run's config.yaml)
  an official FD checkpoint (any name; recognised by its keys, models/official.py): a distilled student with its
                     projector, or a fine-tuned classifier; its architecture is the first student config, the
                     config's `student` then the shipped ones, whose shapes it has
  any other .pt/.pth/.bin/.safetensors: a teacher's own weights, read with the architecture of the config's teacher
A distilled student next to its run's config.yaml and checkpoints/last.ckpt also gets its teacher(s) and
projector(s) back, so its FD loss (per teacher, with several) can be evaluated. An official distillation checkpoint has
its projector but not its teacher: its FD loss is evaluated against the config's teacher (`teacher=<the config it was
distilled from>`, e.g. teacher=clip_vitb), which must give the projector's width (and be the teacher the file's own
config names, when it names one).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.config import group_choices, group_config, section, teacher_label
from fdlight.data.classification import ClassificationData
from fdlight.data.synthetic import SyntheticClassification
from fdlight.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from fdlight.errors import FDLightError, check
from fdlight.models import official
from fdlight.models.exports import load_segmenter
from fdlight.models.factory import create_model
from fdlight.models.layout import timm_layout
from fdlight.models.pretrained import input_size_of
from fdlight.models.students import build_student
from fdlight.models.teachers import build_teacher
from fdlight.models.weights import (
    read_export_metadata,
    read_state_dict,
    summarize_load_error,
)
from fdlight.modules.distill import FeatureDistillation

RUN_FILES = ("model.safetensors", "student.safetensors", "checkpoints/last.ckpt")
FOREIGN_WEIGHTS = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class DistillRun:
    """What rebuilds a student's FD objective: the run's config and the checkpoint's other tensors (projector(s),
    PHI-S statistics), under their module keys."""
    config: DictConfig
    heads: dict[str, torch.Tensor]
    student_from_ckpt: dict[str, torch.Tensor] | None = None
    teacher_named: str | None = None  # the teacher config an official checkpoint's own config names


@dataclass
class Subject:
    """One model to diagnose, in eval mode, with what its inputs and its losses need."""
    name: str
    source: str
    kind: str                      # teacher | distilled student | fine-tuned | model
    model: nn.Module               # the timm model whose attention is read
    img_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 0           # outputs of its classification head (0: headless)
    run: DistillRun | None = None
    info: dict = field(default_factory=dict)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> this model's own normalisation."""
        if tuple(self.mean) == tuple(IMAGENET_MEAN) and tuple(self.std) == tuple(IMAGENET_STD):
            return x
        m_in = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        s_in = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        m = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * s_in + m_in - m) / s


# ------------------------------------------------------------------------------------------------------- configs
def teacher_config(name: str, setting: str = "diagnose.checkpoints") -> DictConfig:
    """conf/teacher/<name>.yaml as Hydra composes it."""
    choices = group_choices("teacher")
    check(name in choices, f"{setting}: unknown teacher config {name!r} in 'teacher:{name}'; choose one "
                           f"of: {', '.join(choices)}")
    return group_config("teacher", name)


def default_name(spec: str) -> str:
    """Where a checkpoint comes from, in short: the spec of a teacher config, the run folder, folder/file."""
    if spec == "teacher" or spec.startswith("teacher:"):
        return spec
    path = Path(spec)
    if path.is_dir():
        return path.name
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def display_name(subject: Subject) -> str:
    """What a checkpoint is, for plot titles and file names: `teacher (<config>)`, `distilled student`,
    `fine-tuned`, `trained from scratch`, `segmentation backbone` (a run folder's name is a time stamp)."""
    if subject.kind == "teacher":
        return f"teacher ({subject.info.get('teacher', 'weights file')})"
    if subject.kind == "fine-tuned" and str(subject.info.get("pretrained") or "").startswith("scratch"):
        return "trained from scratch"
    return subject.kind


# ------------------------------------------------------------------------------------------------------ loaders
def load_subject(spec: str, cfg: DictConfig, name: str | None = None, setting: str = "diagnose.checkpoints") -> Subject:
    """Build the model a checkpoint spec names (see the module docstring); every failure is one FDLightError that
    names `setting`."""
    spec = str(spec).strip()
    given, name = name, name or default_name(spec)
    if spec == "teacher" or spec.startswith("teacher:"):
        tcfg = cfg.teacher if spec == "teacher" else teacher_config(spec.partition(":")[2], setting)
        subject = teacher_subject(tcfg, int(cfg.get("seed", 0)), name, spec)
    else:
        path = Path(spec).expanduser()
        check(path.exists(), f"{setting}: {spec} does not exist; pass a run directory, a .safetensors or "
                             f".ckpt file, or teacher:<config>")
        if path.is_dir():
            path = run_artifact(path)
        if path.suffix == ".safetensors" and _is_fdlight_export(path):
            subject = exported_subject(path, name)
        elif (subject := official_subject(path, cfg, name)) is not None:
            pass
        elif path.suffix == ".ckpt":
            subject = ckpt_subject(path, name)
        elif path.suffix in FOREIGN_WEIGHTS:  # a teacher's own weights: the architecture comes from teacher=
            subject = foreign_subject(path, cfg, name)
        else:
            raise FDLightError(f"{setting}: {path} is not a checkpoint fdlight can read (expected a run "
                               f"directory, .safetensors, .ckpt, .pt, .pth or .bin)")
    subject.model.eval()
    subject.name = given or display_name(subject)
    return subject


def run_artifact(run_dir: Path) -> Path:
    for rel in RUN_FILES:
        if (run_dir / rel).is_file():
            return run_dir / rel
    raise FDLightError(f"run directory {run_dir} holds none of {', '.join(RUN_FILES)}; pass the directory of a "
                       f"distill or finetune run, or a checkpoint file")


def teacher_subject(tcfg: DictConfig, seed: int, name: str, source: str) -> Subject:
    teacher = build_teacher(tcfg, drop_path=0.0, seed=seed)
    return Subject(name, source, "teacher", teacher.model, teacher.layout.img_size,
                   tuple(teacher.mean.flatten().tolist()), tuple(teacher.std.flatten().tolist()),
                   int(getattr(teacher.model, "num_classes", 0) or 0),
                   info={"teacher": str(tcfg.name), "model": str(tcfg.model)})


def _read_metadata(path: Path) -> dict:
    try:
        return read_export_metadata(path)
    except Exception as e:  # noqa: BLE001 - not a safetensors file at all
        raise FDLightError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                           f"(pass a .safetensors written by fdlight, a .ckpt, or a run directory)") from e


def foreign_subject(path: Path, cfg: DictConfig, name: str) -> Subject:
    """A teacher's own weights; a file they do not fit either is named with every layout tried."""
    tcfg = OmegaConf.merge(cfg.teacher, {"weights": str(path)})
    try:
        return teacher_subject(tcfg, int(cfg.get("seed", 0)), name, str(path))
    except FDLightError as e:
        if "does not fit" not in str(e):
            raise
        found = official.tensors_of(read_state_dict(path, mmap=True))
        raise official.unknown_layout(path, found, f"; teacher={tcfg.name}'s own weights: {e}") from e


def official_subject(path: Path, cfg: DictConfig, name: str) -> Subject | None:
    """A checkpoint of the official release, rebuilt as the student config with its shapes (None: not one)."""
    if path.suffix not in (*FOREIGN_WEIGHTS, ".ckpt"):
        return None
    raw = read_state_dict(path, mmap=True)
    converted = official.convert(raw, path)
    if converted is None:
        return None
    candidates = [("student", cfg.student)] if cfg.get("student") is not None else []
    match = official.match_or_fail(converted, path, [*candidates, *official.shipped_students()],
                                   "pass student=<config> with its shapes (e.g. student=vit_b16)")
    model = create_model(match.timm_model, **match.kwargs)
    _load_strict(model, converted.student, path, f"{match.timm_model} ({converted.layout})")
    run = official_run(cfg, match, converted) if converted.projector is not None else None
    kind = "distilled student" if converted.layout.distilled else "fine-tuned" if converted.num_classes else "model"
    stage = "distill" if converted.layout.distilled else "finetune"
    return Subject(name, str(path), kind, model, _img_size(model), num_classes=converted.num_classes, run=run,
                   info={"timm_model": match.timm_model, "stage": stage, "layout": converted.layout.name,
                         "student": match.student, "teacher": converted.teacher})


def official_run(cfg: DictConfig, match: official.Match, converted: official.Converted) -> DistillRun:
    """The FD objective of an official distillation checkpoint: its projector, this config's teacher and whitening,
    the shipped distillation loss settings."""
    rcfg = OmegaConf.create({"stage": "distill", "seed": int(cfg.get("seed", 0)),
                             "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
                             "student": OmegaConf.to_container(match.config, resolve=True),
                             "whitening": OmegaConf.to_container(cfg.whitening, resolve=True),
                             "distill": OmegaConf.to_container(section(cfg, "distill"), resolve=True)})
    heads = {f"projector.{k}": v for k, v in converted.projector.items()}
    return DistillRun(rcfg, heads, teacher_named=converted.teacher)


def _img_size(model: nn.Module) -> int:
    return timm_layout(model).img_size


def _load_strict(model: nn.Module, sd: dict, path: Path, what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise summarize_load_error(e, path, what) from e


def _is_fdlight_export(path: Path) -> bool:
    meta = _read_metadata(path)
    return "timm_model" in meta or meta.get("task") == "segment"


def exported_subject(path: Path, name: str) -> Subject:
    meta = _read_metadata(path)
    if meta.get("task") == "segment":  # UPerNet of stage=segment: diagnose its (pruned) timm backbone
        try:
            model = load_segmenter(path).backbone.model
        except FDLightError:
            raise
        except Exception as e:  # noqa: BLE001 - a file from another fdlight version
            raise FDLightError(f"cannot rebuild the segmentation model {path} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}); diagnose the checkpoint it was trained from") from e
        return Subject(name, str(path), "segmentation backbone", model, _img_size(model),
                       info={"timm_model": meta.get("backbone_model"), "stage": "segment"})
    kwargs = dict(meta["timm_kwargs"])
    try:
        model = create_model(meta["timm_model"], **kwargs)
    except Exception as e:  # noqa: BLE001 - an unknown name or kwargs from another timm version
        raise FDLightError(f"timm cannot build {meta['timm_model']!r} from the metadata of {path} "
                           f"({type(e).__name__}: {e}); check the timm version") from e
    _load_strict(model, read_state_dict(path), path, meta["timm_model"])
    input_size_of(model, int(meta["img_size"]) if meta.get("img_size") else None)  # a CNN: the size it was trained at
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    stage = meta.get("stage")
    run = distill_run(path.parent) if stage == "distill" else None
    kind = "distilled student" if stage == "distill" else "fine-tuned" if num_classes else "model"
    return Subject(name, str(path), kind, model, _img_size(model), num_classes=num_classes, run=run,
                   info={"timm_model": meta["timm_model"], "stage": stage, "teacher": meta.get("teacher"),
                         "pretrained": meta.get("pretrained")})


def _ckpt_state(path: Path) -> dict:
    state = read_state_dict(path)
    check(isinstance(state.get("state_dict"), dict), f"{path} is not a Lightning checkpoint (no state_dict); pass a "
                                                     f".ckpt written by stage=distill, or an exported .safetensors")
    return state["state_dict"]


def distill_run(run_dir: Path, ckpt: Path | None = None) -> DistillRun | None:
    """The run's config and heads, when the student sits in an intact distillation run directory."""
    ckpt = ckpt or run_dir / "checkpoints" / "last.ckpt"
    cfg_path = run_dir / "config.yaml"
    if not (cfg_path.is_file() and ckpt.is_file()):
        return None
    rcfg = OmegaConf.load(cfg_path)
    if rcfg.get("stage") != "distill" or "teacher" not in rcfg:
        return None
    sd = _ckpt_state(ckpt)
    heads = {k: v for k, v in sd.items() if not k.startswith("student.")}
    student = {k.removeprefix("student."): v for k, v in sd.items() if k.startswith("student.")}
    if not heads:
        return None
    return DistillRun(rcfg, heads, student or None)


def ckpt_subject(path: Path, name: str) -> Subject:
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    sd = _ckpt_state(path)
    if not any(k.startswith("student.") for k in sd):
        raise FDLightError(f"{path} holds no student.* weights, so it is not a stage=distill checkpoint; pass the "
                           f"run's model.safetensors (fine-tuned) or student.safetensors instead")
    check((run_dir / "config.yaml").is_file(), f"{path} needs its run's config.yaml (expected at "
                                              f"{run_dir}/config.yaml) to rebuild the student; pass the run's "
                                              f"student.safetensors instead")
    run = distill_run(run_dir, path)
    check(run is not None, f"{run_dir}/config.yaml is not the config of a stage=distill run; pass the run's exported "
                           f".safetensors instead")
    student = build_student(run.config.student)
    _load_strict(student, run.student_from_ckpt, path, f"student {run.config.student.name!r}")
    return Subject(name, str(path), "distilled student", student, _img_size(student), run=run,
                   info={"timm_model": str(run.config.student.model), "stage": "distill",
                         "teacher": teacher_label(run.config)})


def build_fd_module(subject: Subject) -> FeatureDistillation:
    """The FeatureDistillation module of a distilled student: its rebuilt teacher(s), projector(s), PHI-S statistics
    and loss settings."""
    check_projector_teacher(subject.run, subject.source)
    module = FeatureDistillation.from_config(subject.run.config, student=subject.model, train=False)
    missing, unexpected = module.load_state_dict(subject.run.heads, strict=False)
    missing = [k for k in missing if not k.startswith("student.")]
    check(not missing and not unexpected, f"{subject.source}: the checkpoint's projectors do not fit its run's "
                                          f"config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module


def check_projector_teacher(run: DistillRun, source: str) -> None:
    """The teacher must be the one the projector was trained against: its width, and its name when the file says
    (a run with one teacher: several teachers' projectors are checked by loading them)."""
    weight = run.heads.get("projector.weight")
    if weight is None:
        return
    named, teacher = run.teacher_named, run.config.teacher
    check(named in (None, teacher.name), f"{source} was distilled from teacher {named}, not teacher={teacher.name}; "
                                         f"pass teacher={named} for its FD loss")
    width, dim = int(weight.shape[0]), teacher.get("dim")
    check(dim is None or int(dim) == width,
          f"the projector of {source} maps to {width} channels but teacher={teacher.name} has {dim}; pass "
          f"teacher=<the config it was distilled from> (e.g. clip_vitb, dino_vitb, deit_vitb: 768; clip_vitl, "
          f"esvit_swinb: 1024)")


# ------------------------------------------------------------------------------------------------ evaluation set
def eval_dataset(data_cfg: DictConfig, img_size: int, num_images: int):
    """A fixed subset of the data's validation split at `img_size` (eval transform): the first `num_images` synthetic
    scenes, or `num_images` evenly spaced images of an ImageFolder's val/ (or of its shards, data=shards)."""
    from torch.utils.data import Subset

    check(isinstance(num_images, int) and num_images > 0,
          f"diagnose.num_images={num_images} gives an empty evaluation subset; pass a positive count such as "
          f"diagnose.num_images=64")
    tf = eval_transform(img_size)
    if data_cfg.name == "synthetic":
        return SyntheticClassification("val", num_images, data_cfg.raw_size, data_cfg.num_classes, data_cfg.seed, tf)
    full = ClassificationData(data_cfg, 1, None, tf, with_val=True).held_out()  # any source that holds images out
    check(len(full) > 0, f"the val split of data={data_cfg.name} holds no images, so the evaluation subset is empty; "
                         f"add images")
    n = min(num_images, len(full))
    idx = torch.linspace(0, len(full) - 1, n).round().long().unique().tolist()
    subset = Subset(full, idx)
    subset.classes = full.classes
    return subset


def eval_batches(data_cfg: DictConfig, img_size: int, num_images: int, batch_size: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(image batches, label batches, number of classes) of the evaluation subset."""
    from torch.utils.data import DataLoader

    check(isinstance(batch_size, int) and batch_size > 0, f"diagnose.batch_size={batch_size} must be a positive "
                                                          f"count; pass e.g. diagnose.batch_size=32")
    ds = eval_dataset(data_cfg, img_size, num_images)
    check(len(ds) > 0, f"the evaluation subset of data={data_cfg.name} is empty; raise diagnose.num_images")
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return xs, ys, len(ds.classes)


# -------------------------------------------------------------------------------------------------- loss curves
def read_loss_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged column of a run's CSV logs (logs/version_*/metrics.csv, resumed versions appended in order), as
    {column: [(step, value), ...]}; {} when the run logged elsewhere."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir.parent
    curves: dict[str, list[tuple[int, float]]] = {}
    files = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                step = int(float(row.get("step") or 0))
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    curves.setdefault(key, []).append((step, float(value)))
    return curves
