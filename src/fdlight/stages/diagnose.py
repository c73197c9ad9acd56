"""stage=diagnose: attention statistics and loss landscapes of checkpoints -> diagnostics.json, attention maps, PNGs.

For the demo and notebooks: `summarize(paths, cfg)` returns {name: summary} without writing anything;
`diagnose_checkpoint(path, cfg)` returns one checkpoint's full Diagnosis; `read_summary(run_dir)` reads a finished run.
Summary keys: attn_distance_spread (mean over layers of the std of head distances, px), attn_distance_mean (px),
head_kl_mean, diagonality_mean, landscape_loss (ce | fd | probe | None), loss_at_origin, sharpness (mean loss increase
at alpha = +-span along a filter-normalised direction), sharpness_rel (/ loss_at_origin), hessian_max_eigenvalue; a
student distilled from several teachers adds teacher_sharpness ({teacher: sharpness of its own FD loss}), and its
landscape's `parts` hold each teacher's surface and curve (the total is the weighted sum the run trained on).
"""
from __future__ import annotations

import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from fdlight.diagnostics.attention import attention_layers, attention_statistics, summarize_layers
from fdlight.diagnostics.landscape import (ClassificationLoss, DistillationLoss, ProbeLoss, grid_coordinates,
                                           loss_landscape, top_hessian_eigenvalue)
from fdlight.diagnostics.loading import Subject, build_fd_module, default_name, eval_batches, load_subject
from fdlight.errors import FDLightError, check
from fdlight.artifacts import save_figure, save_safetensors, write_json
from fdlight.config import compose, section
from fdlight.data.source import data_used
from fdlight.console import finish_wandb
from fdlight.diagnostics import plots
from fdlight.runs.directory import Claim, save_config
from fdlight.runs.template import Stage
from fdlight.runs.trainer import build_logger

log = logging.getLogger(__name__)
LOSSES = ("auto", "ce", "fd", "probe", "none")
SMALL_MODEL = 5_000_000  # parameters


@dataclass
class Diagnosis:
    name: str
    data: dict                                              # JSON-ready numbers
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (H, P, P) averaged attention

    @property
    def summary(self) -> dict:
        return self.data["summary"]


# -------------------------------------------------------------------------------------------------------- config
def config(overrides=()) -> DictConfig:
    """The config `python -m fdlight stage=diagnose <overrides>` runs (for notebooks and the demo)."""
    return compose(["stage=diagnose", *overrides])


def check_settings(d: DictConfig) -> None:
    """Every bad setting fails here, before any model is built."""
    check(isinstance(d.checkpoints, (list, ListConfig)) and len(d.checkpoints) > 0,
          f"diagnose.checkpoints={d.checkpoints} must be a non-empty list; pass e.g. "
          f"diagnose.checkpoints=[teacher:tiny,runs/distill/<run>]")
    if d.get("names") is not None:
        check(len(d.names) == len(d.checkpoints), f"diagnose.names has {len(d.names)} entries for "
                                                  f"{len(d.checkpoints)} checkpoints; give one name per checkpoint")
    check(isinstance(d.num_images, int) and d.num_images > 0,
          f"diagnose.num_images={d.num_images} gives an empty evaluation subset; pass a positive count such as "
          f"diagnose.num_images=64")
    check(isinstance(d.batch_size, int) and d.batch_size > 0,
          f"diagnose.batch_size={d.batch_size} must be a positive count; pass e.g. diagnose.batch_size=32")
    ls = d.landscape
    check(ls.loss in LOSSES, f"diagnose.landscape.loss={ls.loss} is unknown; choose one of: {', '.join(LOSSES)}")
    grid_coordinates(ls.steps, ls.span)
    check(ls.num_images is None or (isinstance(ls.num_images, int) and ls.num_images > 0),
          f"diagnose.landscape.num_images={ls.num_images} gives an empty subset; pass a positive count or null")
    check(isinstance(d.hessian_iters, int) and d.hessian_iters > 0,
          f"diagnose.hessian_iters={d.hessian_iters} must be a positive count")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(name != "cuda" or torch.cuda.is_available(), "diagnose.device=cuda but no GPU is visible; pass "
                                                       "diagnose.device=cpu or auto")
    return torch.device(name)


@contextmanager
def model_threads(setting, model: torch.nn.Module, device: torch.device):
    """Tiny models on a CPU run faster on one thread: per-op threading overhead dominates (badly so on a busy CPU)."""
    n = setting
    if setting == "auto":
        small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
        n = 1 if device.type == "cpu" and small else None
    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(int(n))
        yield
    finally:
        torch.set_num_threads(before)


def given_names(d: DictConfig) -> list[str | None]:
    """diagnose.names, or None per checkpoint: each is then named by what it is (loading.display_name)."""
    return list(d.names) if d.get("names") is not None else [None] * len(d.checkpoints)


def load_subjects(d: DictConfig, cfg: DictConfig) -> list[Subject]:
    """Every checkpoint of diagnose.checkpoints, loaded (bad input fails here), with unique names: two of one kind
    get the run folder or file they come from beside it, then #2, #3."""
    specs = [str(s) for s in d.checkpoints]
    subjects = [load_subject(spec, cfg, n) for spec, n in zip(specs, given_names(d))]
    names = [s.name for s in subjects]
    if d.get("names") is None:
        names = [f"{n} ({default_name(spec)})" if names.count(n) > 1 else n for n, spec in zip(names, specs)]
    seen: dict[str, int] = {}
    for subject, n in zip(subjects, names):
        seen[n] = seen.get(n, 0) + 1
        subject.name = n if seen[n] == 1 else f"{n}#{seen[n]}"
    return subjects


# -------------------------------------------------------------------------------------------------- objectives
def _take(batches: list, limit: int | None) -> list:
    if limit is None:
        return batches
    out, n = [], 0
    for b in batches:
        x = b[0] if isinstance(b, tuple) else b
        if n >= limit:
            break
        keep = min(len(x), limit - n)
        out.append(tuple(t[:keep] for t in b) if isinstance(b, tuple) else b[:keep])
        n += keep
    return out


def build_objective(subject: Subject, mode: str, xs, ys, num_classes: int, device, limit=None, probe_l2=1e-3):
    """(objective or None, loss name or None, note) of the landscape for one subject."""
    if mode == "none":
        return None, None, "landscape off (diagnose.landscape.loss=none)"
    if mode == "auto":
        mode = "ce" if subject.num_classes else "fd" if subject.run is not None else "probe"
        if mode == "fd":
            try:
                return _fd_objective(subject, xs, device, limit), "fd", ""
            except FDLightError as e:
                log.warning("%s: FD loss unavailable (%s); using a linear probe instead", subject.name, e)
                mode, note = "probe", f"FD loss unavailable: {e}"
                return _probe_objective(subject, xs, ys, num_classes, device, limit, probe_l2), "probe", note
    if mode == "ce":
        check(subject.num_classes > 0, f"{subject.source} has no classification head, so diagnose.landscape.loss=ce "
                                       f"cannot apply; use loss=probe (or auto)")
        check(subject.num_classes == num_classes,
              f"{subject.source} has a {subject.num_classes}-way head but the evaluation data has {num_classes} "
              f"classes; pass the data= it was fine-tuned on, or diagnose.landscape.loss=probe")
        batches = [(subject.prepare(x.to(device)), y.to(device)) for x, y in _take(list(zip(xs, ys)), limit)]
        return ClassificationLoss(subject.model, batches), "ce", ""
    if mode == "fd":
        check(subject.run is not None, f"{subject.source} is not a distilled student inside its run directory "
                                       f"(config.yaml and checkpoints/last.ckpt beside it), so its FD loss is "
                                       f"unknown; use diagnose.landscape.loss=probe")
        return _fd_objective(subject, xs, device, limit), "fd", ""
    return _probe_objective(subject, xs, ys, num_classes, device, limit, probe_l2), "probe", ""


def _fd_objective(subject: Subject, xs, device, limit):
    module = build_fd_module(subject).to(device)
    module.place_teacher()
    return DistillationLoss(module, [x.to(device) for x in _take(xs, limit)])


def _probe_objective(subject: Subject, xs, ys, num_classes, device, limit, probe_l2=1e-3):
    batches = [(subject.prepare(x.to(device)), y.to(device)) for x, y in _take(list(zip(xs, ys)), limit)]
    return ProbeLoss(subject.model, batches, num_classes, l2=float(probe_l2))


# ------------------------------------------------------------------------------------------------------ diagnose
def diagnose_subject(subject: Subject, cfg: DictConfig, device: torch.device | None = None) -> Diagnosis:
    d = section(cfg, "diagnose")
    device = device or resolve_device(d.device)
    with model_threads(d.get("threads", "auto"), subject.model, device):
        return _diagnose(subject, cfg, d, device)


def _diagnose(subject: Subject, cfg: DictConfig, d: DictConfig, device: torch.device) -> Diagnosis:
    start = time.perf_counter()
    xs, ys, num_classes = eval_batches(cfg.data, subject.img_size, d.num_images, d.batch_size)
    subject.model.to(device).eval()
    images = [subject.prepare(x.to(device)) for x in xs]
    layers, attention = [], None
    if attention_layers(subject.model):
        layers = attention_statistics(subject.model, images, what=f"checkpoint {subject.source}")
        attention = summarize_layers(layers, int(d.diagonality_k))
    else:  # a CNN student: what applies is the landscape
        log.info("%s (%s) has no attention layers: its attention distance, head diversity, diagonality and maps are "
                 "left out, its loss landscape is measured", subject.name, type(subject.model).__name__)
    attn_s = time.perf_counter() - start

    ls_cfg = d.landscape
    objective, loss_name, note = build_objective(subject, ls_cfg.loss, xs, ys, num_classes, device,
                                                 ls_cfg.num_images, ls_cfg.get("probe_l2", 1e-3))
    landscape = hessian = None
    if objective is not None:
        landscape = loss_landscape(objective, int(ls_cfg.steps), float(ls_cfg.span), int(ls_cfg.seed),
                                   bool(ls_cfg.two_d)).to_json()
        if note:
            landscape["note"] = note
        if d.hessian:
            eig = top_hessian_eigenvalue(objective, int(d.hessian_iters), float(d.hessian_tol), int(ls_cfg.seed))
            hessian = {"max_eigenvalue": eig.value, "iterations": eig.iterations, "residual": eig.residual,
                       "loss": loss_name}
    subject.model.cpu()
    summary = {
        "kind": subject.kind,
        **attention_summary(attention),
        "landscape_loss": loss_name,
        "loss_at_origin": landscape["origin"] if landscape else None,
        "sharpness": landscape["sharpness"] if landscape else None,
        "sharpness_rel": landscape["sharpness_rel"] if landscape else None,
        "hessian_max_eigenvalue": hessian["max_eigenvalue"] if hessian else None,
    }
    if landscape and landscape.get("parts"):
        summary["teacher_sharpness"] = {n: p["sharpness"] for n, p in landscape["parts"].items()}
    data = {"source": subject.source, "kind": subject.kind, "img_size": subject.img_size,
            "num_images": sum(len(x) for x in xs), "info": subject.info, "summary": summary,
            "attention": attention, "landscape": landscape, "hessian": hessian,
            "seconds": {"attention": attn_s, "total": time.perf_counter() - start}}
    return Diagnosis(subject.name, data, {layer.name: layer.map for layer in layers})


def attention_summary(attention: dict | None) -> dict:
    """The summary's attention numbers (None for a model without attention)."""
    if attention is None:
        return dict.fromkeys(("attn_distance_spread", "attn_distance_mean", "head_kl_mean", "diagonality_mean"))
    return {"attn_distance_spread": attention["attn_distance_spread"],
            "attn_distance_mean": sum(attention["distance_mean_px"]) / len(attention["distance_mean_px"]),
            "head_kl_mean": sum(attention["kl_diversity"]) / len(attention["kl_diversity"]),
            "diagonality_mean": sum(attention["diagonality_mean"]) / len(attention["diagonality_mean"])}


def diagnose_checkpoint(spec: str, cfg: DictConfig | None = None, name: str | None = None) -> Diagnosis:
    """Everything about one checkpoint (a path or teacher:<name>), computed with cfg's settings (default config)."""
    cfg = cfg if cfg is not None else config()
    check_settings(section(cfg, "diagnose"))
    return diagnose_subject(load_subject(spec, cfg, name), cfg)


def summarize(paths, cfg: DictConfig | None = None, names=None, loss: str | None = None) -> dict[str, dict]:
    """{name: summary} of each checkpoint (see the module docstring for the keys); writes nothing. `cfg` may be any
    stage's config (its data= is used; diagnose.* defaults fill in); `loss` overrides diagnose.landscape.loss, e.g.
    'probe' to compare a teacher and a student on the same loss."""
    cfg = cfg if cfg is not None else config()
    d = section(cfg, "diagnose")
    d = OmegaConf.merge(d, {"checkpoints": [str(p) for p in paths], "names": list(names) if names else None})
    if loss is not None:
        d.landscape.loss = loss
    check_settings(d)
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, {"diagnose": d})
    return {s.name: diagnose_subject(s, cfg).summary for s in load_subjects(d, cfg)}


def read_summary(run_dir: str | Path) -> dict[str, dict]:
    """{name: summary} from a finished diagnose run's diagnostics.json."""
    path = Path(run_dir) / "diagnostics.json"
    check(path.is_file(), f"{path} not found; run python -m fdlight stage=diagnose hydra.run.dir={run_dir} first")
    return {n: r["summary"] for n, r in json.loads(path.read_text())["checkpoints"].items()}


# ------------------------------------------------------------------------------------------------------- outputs
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "checkpoint"


def write_plots(run_dir: Path, results: dict[str, Diagnosis], d: DictConfig) -> list[Path]:
    data = {n: r.data for n, r in results.items()}
    attended = {n: r for n, r in data.items() if r["attention"] is not None}  # models without attention: landscape only
    figures = {"attention_distance": plots.distance_figure(attended) if attended else None,
               "head_diversity": plots.diversity_figure(attended) if attended else None,
               "landscape": plots.landscape_figure(data)}
    for n, r in results.items():
        if r.data["attention"] is None:
            continue
        figures[f"attention_maps_{slug(n)}"] = plots.maps_figure(n, r.data, r.maps, int(d.maps.max_layers),
                                                                 int(d.maps.max_heads))
    return [save_figure(fig, run_dir / f"{stem}.png") for stem, fig in figures.items() if fig is not None]


def write_outputs(run_dir: Path, results: dict[str, Diagnosis], cfg: DictConfig) -> list[Path]:
    d = section(cfg, "diagnose")
    doc = {"settings": OmegaConf.to_container(d, resolve=True), "data": str(cfg.data.name),
           "maps_file": "attention_maps.safetensors", "checkpoints": {n: r.data for n, r in results.items()}}
    written = [write_json(run_dir / "diagnostics.json", doc, indent=1, sort_keys=False),
               save_safetensors({f"{n}|{layer}": m for n, r in results.items() for layer, m in r.maps.items()},
                                run_dir / "attention_maps.safetensors", {"format": "fdlight attention maps"})]
    return written + write_plots(run_dir, results, d)


def log_to_wandb(cfg: DictConfig, run_dir: Path, pngs: list[Path], summaries: dict[str, dict]) -> None:
    logger = build_logger(cfg, run_dir)
    for png in pngs:
        logger.log_image(key=f"diagnose/{png.stem}", images=[str(png)])
    scalars = {f"diagnose/{n}/{k}": float(v) for n, s in summaries.items() for k, v in s.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    logger.log_metrics(scalars)
    columns = sorted({k for s in summaries.values() for k, v in s.items() if not isinstance(v, dict)})
    logger.log_table(key="diagnose/summary", columns=["checkpoint", *columns],
                     data=[[n, *(s.get(k) for k in columns)] for n, s in summaries.items()])
    finish_wandb()


def number(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


class Diagnose(Stage):
    name = "diagnose"

    def settings(self, cfg: DictConfig) -> DictConfig:
        return section(cfg, "diagnose")

    def validate(self, cfg: DictConfig) -> None:
        d = self.settings(cfg)
        check_settings(d)
        resolve_device(d.device)

    def build(self, cfg: DictConfig) -> list[Subject]:
        return load_subjects(self.settings(cfg), cfg)  # bad input fails first

    def execute(self, cfg: DictConfig, run_dir: Path, subjects: list[Subject], claimed: Claim) -> dict:
        d = self.settings(cfg)
        device = resolve_device(d.device)
        save_config(cfg, run_dir)
        start = time.perf_counter()
        results = {}
        for s in subjects:
            results[s.name] = r = diagnose_subject(s, cfg, device)
            sm = r.summary
            log.info("%s: attention distance spread %s px, head KL %s, diagonality %s, %s sharpness %s",
                     s.name if s.name.startswith(s.kind) else f"{s.name} ({s.kind})",
                     *(number(sm[k], f) for k, f in (("attn_distance_spread", ".3f"), ("head_kl_mean", ".4f"),
                                                     ("diagonality_mean", ".3f"))),
                     sm["landscape_loss"], number(sm["sharpness"], ".4g"))
            for teacher, sharp in sm.get("teacher_sharpness", {}).items():
                log.info("%s: fd sharpness against teacher %s %.4g", s.name, teacher, sharp)
        losses = sorted({r.summary["landscape_loss"] for r in results.values()} - {None})
        if len(losses) > 1:
            log.warning("the landscapes use different losses (%s): landscape.png draws each loss in its own panel; "
                        "pass diagnose.landscape.loss=probe to compare every checkpoint on one loss", ", ".join(losses))
        written = write_outputs(run_dir, results, cfg)
        summaries = {n: r.summary for n, r in results.items()}
        pngs = [p for p in written if p.suffix == ".png"]
        if cfg.logger.name == "wandb":
            log_to_wandb(cfg, run_dir, pngs, summaries)
        images = max(r.data["num_images"] for r in results.values())  # one evaluation subset for every checkpoint
        metrics = {"stage": "diagnose", **data_used(cfg.data, val=images), "checkpoints": summaries,
                   "wall_s": time.perf_counter() - start, "plots": [p.name for p in pngs]}
        self.finish(run_dir, metrics, written)
        return metrics

    def summary(self, metrics: dict) -> str:
        return f"diagnostics of {len(metrics['checkpoints'])} checkpoint(s) in {metrics['wall_s']:.1f} s"


STAGE = Diagnose()
run = STAGE.run
