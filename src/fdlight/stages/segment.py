"""stage=segment: UPerNet semantic segmentation on a pretrained backbone; writes `model.safetensors`, `metrics.json`
(`val/mIoU`) and `predictions.png`. `python -m fdlight.stages.segment --bench` times ViT-B/16 + UPerNet at 512 on a GPU.

With `segment.pretrained=PATH` the backbone comes from an earlier run's `student.safetensors` (its shared relative
position bias copied into each block and resized to the crop) or a teacher's weights (`teacher=<config>`); without it,
from a randomly initialised `cfg.student` (the tiny student by default: the embedded run measures the pipeline, not
pretraining).
"""
from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from fdlight.data.dense import IGNORE, SegmentationData
from fdlight.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fdlight.errors import FDLightError, check
from fdlight.models.attention import set_attention
from fdlight.models.patch_embed import gemm_patch_embed
from fdlight.models.pretrained import Architecture, build_from_pretrained, downstream_kwargs
from fdlight.models.pyramid import Backbone
from fdlight.models.students import check_drop_path, student_kwargs
from fdlight.models.upernet import UPerNet
from fdlight.models.upernet_gpu_check import bench, main as gpu_check_main  # noqa: F401 - bench re-exported
from fdlight.models.weights import atomic_save_safetensors, read_export_metadata, read_state_dict
from fdlight.modules.segment import SemanticSegmentation
from fdlight.stages.common import cpu_threads, on_gpu, timed_fit, trained_state_dict, write_metrics

log = logging.getLogger(__name__)
OPTIM_KEYS = ("lr", "warmup_lr", "min_lr", "warmup_steps", "schedule", "power", "layer_decay", "weight_decay",
              "betas", "no_decay_keywords", "clip_grad")


# ------------------------------------------------------------------------------------------- shared by dense stages
def backbone_model(cfg: DictConfig, s: DictConfig, img_size: int, key: str) -> tuple[nn.Module, Architecture, dict]:
    """The timm backbone at img_size: from `<key>.pretrained`, else a random `cfg.student`. Returns the model, its
    architecture and the timm kwargs that rebuild it."""
    drop_path = check_drop_path(s.drop_path, f"{key}.drop_path")
    path = s.get("pretrained")
    if path:
        path = Path(str(path)).expanduser()
        if path.suffix == ".safetensors" and path.is_file():
            task = read_export_metadata(path).get("task")
            check(task is None, f"{key}.pretrained={path} is a whole {task} model, not a backbone; pass the "
                                f"student.safetensors of a distill run or a teacher's weights file")
        model, arch = build_from_pretrained(path, num_classes=0, drop_path=drop_path, teacher_cfg=cfg.get("teacher"),
                                            img_size=img_size)
    else:
        arch = Architecture(cfg.student.model, student_kwargs(cfg.student))
        model, arch = build_from_pretrained(None, num_classes=0, drop_path=drop_path, arch=arch, img_size=img_size)
    return model, arch, downstream_kwargs(arch, 0, drop_path, "avg", img_size=img_size)


def optim_config(s: DictConfig) -> dict:
    return {k: (list(s[k]) if OmegaConf.is_list(s[k]) else s[k]) for k in OPTIM_KEYS}


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the trainer config asks for, as Lightning reads `devices`: a count (-1, or auto on a GPU: every
    visible GPU), or a list of device ids ([0, 1] or "0,1")."""
    d = trainer_cfg.devices
    if OmegaConf.is_list(d) or isinstance(d, (list, tuple)):
        devices = len(d)
    elif isinstance(d, str) and "," in d:
        devices = len([i for i in d.split(",") if i.strip()])
    elif str(d).lstrip("-").isdigit() and int(d) >= 0:
        devices = int(d)
    else:  # -1 or auto
        devices = max(torch.cuda.device_count(), 1) if on_gpu(trainer_cfg) else 1
    return devices * int(trainer_cfg.num_nodes)


def user_error(e: FDLightError) -> FDLightError:
    """A data error raised in a DataLoader worker comes back wrapped in its traceback: keep its one line."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return FDLightError(last.split("FDLightError: ", 1)[-1])


def fit_and_validate(trainer: L.Trainer, module: L.LightningModule, data, resume) -> None:
    """Train, then validate once more unless the last step was just validated."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
        if module.val_step != trainer.global_step or not module.val_results:
            trainer.validate(module, datamodule=data, verbose=False)
    except FDLightError as e:
        raise user_error(e) from None


def save_model(state: dict, path: Path, task: str, arch: Architecture, timm_kwargs: dict, head: dict,
               **extra) -> None:
    """The whole model's weights (backbone + neck + head), with what rebuilds it in the metadata."""
    meta = {"format": "fdlight", "task": task, "backbone_model": arch.timm_model,
            "backbone_kwargs": json.dumps(timm_kwargs), "head": json.dumps(head)}
    meta.update({k: str(v) for k, v in extra.items()})
    atomic_save_safetensors(state, path, meta)


def rebuild_backbone(meta: dict) -> nn.Module:
    import timm

    model = timm.create_model(meta["backbone_model"], pretrained=False, **json.loads(meta["backbone_kwargs"]))
    gemm_patch_embed(model)
    return model


# ---------------------------------------------------------------------------------------------------- the model
def build_segmentation(cfg: DictConfig, s: DictConfig, num_classes: int):
    """The LightningModule, the backbone architecture, its timm kwargs and the head config (for model.safetensors)."""
    model, arch, kwargs = backbone_model(cfg, s, int(s.crop_size), "segment")
    set_attention(model, cfg.trainer.attention)
    indices = list(s.indices) if s.get("indices") is not None else None
    backbone = Backbone(model, indices)
    head = dict(indices=indices, num_classes=int(num_classes), channels=int(s.channels),
                aux_channels=int(s.aux_channels), norm=str(s.norm), dropout=float(s.dropout))
    seg = UPerNet(backbone, num_classes=head["num_classes"], channels=head["channels"],
                  aux_channels=head["aux_channels"], norm=head["norm"], dropout=head["dropout"])
    module = SemanticSegmentation(seg, optim_config(s), s.eval_mode, s.get("eval_stride"), s.aux_weight,
                                  s.get("eval_chunk", 8), compile_model=bool(cfg.trainer.compile))
    return module, arch, kwargs, head


def load_segmenter(path: str | Path) -> UPerNet:
    """Rebuild a segmentation model from the `model.safetensors` this stage writes (eval mode)."""
    meta = read_export_metadata(path)
    check(meta.get("task") == "segment", f"{path} is not a segmentation model written by stage=segment")
    head = json.loads(meta["head"])
    model = UPerNet(Backbone(rebuild_backbone(meta), head.pop("indices")), **head)
    model.load_state_dict(read_state_dict(path))
    return model.eval()


# ------------------------------------------------------------------------------------------------------ picture
def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (tab20 first, then seeded random colours); 255 (ignored) is black."""
    import matplotlib

    colours = np.zeros((256, 3), dtype=np.uint8)
    tab = (np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    for k in range(num_classes):
        colours[k] = tab[k] if k < len(tab) else rng.integers(40, 256, 3)
    return colours


def denormalize(x: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_predictions(module: SemanticSegmentation, dataset, path: Path, count: int = 4) -> None:
    """Image, ground truth and prediction for the first `count` validation images, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    count = min(int(count), len(dataset))
    if count <= 0:
        return
    colours = palette(module.model.num_classes)
    fig, axes = plt.subplots(count, 3, figsize=(8.6, 2.6 * count), squeeze=False)
    module.eval()
    for row in range(count):
        image, label = dataset[row]
        pred = module.predict([image.to(module.device)], [label.shape])[0].cpu()
        scored = label != IGNORE
        acc = float((pred[scored] == label[scored]).float().mean()) if scored.any() else float("nan")
        shown = pred.clone()
        shown[~scored] = IGNORE  # unscored pixels in black, as in the ground truth
        pictures = [(denormalize(image), "image"), (colours[label.numpy()], "ground truth (black: ignored)"),
                    (colours[shown.numpy()], f"prediction, pixel acc. {acc:.2f}")]
        for ax, (picture, title) in zip(axes[row], pictures):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        shown_classes = torch.cat([label[scored], pred[scored]]).bincount().nonzero().flatten()[:8].tolist()
        axes[row][-1].legend(handles=[Patch(color=colours[k] / 255.0, label=f"class {k}") for k in shown_classes],
                             loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- stage
def run(cfg: DictConfig, run_dir: Path) -> dict:
    with cpu_threads(cfg, cfg.segment):
        return train_segmentation(cfg, run_dir)


def train_segmentation(cfg: DictConfig, run_dir: Path) -> dict:
    s = cfg.segment
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = SegmentationData(cfg.data, s.batch_size, s.crop_size, s.ratio_range, s.cat_max_ratio, s.photometric,
                            s.eval_batch_size, seed=cfg.seed)
    data.setup()
    # The recipe's SyncBN (statistics over the whole batch) on several GPUs; PyTorch has it for CUDA only, so
    # processes on CPUs keep their own statistics.
    sync_bn = s.norm == "bn" and world_size(cfg.trainer) > 1 and on_gpu(cfg.trainer)
    bn_batch = s.batch_size * (world_size(cfg.trainer) if sync_bn else 1)
    check(s.norm != "bn" or bn_batch > 1,
          f"segment.batch_size={s.batch_size} per BatchNorm leaves it one value per channel on the 1x1 pyramid-pooling "
          f"map; use segment.batch_size>=2 or segment.norm=gn")
    module, arch, kwargs, head = build_segmentation(cfg, s, data.num_classes)
    if sync_bn:
        module.model = nn.SyncBatchNorm.convert_sync_batchnorm(module.model)
    trainer, meter, _, wall = timed_fit(cfg, s, run_dir, module, data, fit_and_validate)  # after the checks above
    metrics = {"stage": "segment", "backbone": arch.timm_model, "pretrained": str(s.pretrained or "") or None,
               "data": cfg.data.name, "num_classes": data.num_classes, "eval_mode": s.eval_mode,
               "crop_size": int(s.crop_size), **module.val_results, "first_loss": module.first_loss,
               "last_loss": module.last_loss, "steps": trainer.global_step, "img_per_s": meter.img_per_s,
               "wall_s": wall}
    model_state = trained_state_dict(trainer, module, "model.")  # collective under FSDP: every rank
    if trainer.is_global_zero:
        save_model(model_state, run_dir / "model.safetensors", "segment", arch, kwargs, head,
                   data=cfg.data.name, pretrained=s.pretrained or "")
        write_metrics(run_dir, metrics)
        plot_predictions(module, data.val_set, run_dir / "predictions.png", s.num_vis)
        log.info("segmentation on %s: mIoU %.2f%% after %d steps (%.0f s); model at %s", cfg.data.name,
                 100 * metrics.get("val/mIoU", float("nan")), metrics["steps"], wall, run_dir / "model.safetensors")
    return metrics


def segmentation_miou(cfg: DictConfig, pretrained: str | Path | None, run_dir: str | Path,
                      teacher_cfg: DictConfig | None = None, **overrides) -> float:
    """Fine-tune UPerNet on `pretrained` (None: random `cfg.student`) with this stage's packaged defaults, updated by
    cfg.segment (if any) and `overrides`, on cfg.data; return val/mIoU. `teacher_cfg` names the architecture of a
    teacher's weights file. run_dir must be new (the run's artifacts are written there)."""
    base = OmegaConf.load(str(resources.files("fdlight.conf").joinpath("stage", "segment.yaml")))
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    seg = OmegaConf.merge(base.segment, plain.get("segment") or {}, overrides,
                          {"pretrained": str(pretrained) if pretrained else None})
    sub = OmegaConf.merge(plain, {"stage": "segment", "segment": seg, "resume": False})
    if teacher_cfg is not None:
        sub.teacher = OmegaConf.create(OmegaConf.to_container(teacher_cfg, resolve=True))
    return float(run(sub, Path(run_dir))["val/mIoU"])


def main(argv=None) -> None:
    """`python -m fdlight.stages.segment --bench [...]`: the GPU check (the stage runs as `python -m fdlight
    stage=segment`)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if "--bench" not in argv:
        raise SystemExit("pass --bench (the stage itself runs as: python -m fdlight stage=segment)")
    gpu_check_main(argv)


if __name__ == "__main__":
    main()
