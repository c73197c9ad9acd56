"""Online monitoring (monitor=knn): the trained model's k-NN accuracy on a fixed labelled subset while it trains, so a
long run shows early whether its features are getting any better (the loss falls whatever happens).

At the start, every `monitor.every_n_epochs` epochs and at the end of training, the model's pooled features of `monitor.max_images`
evenly spaced val images of `monitor.data` (default: the run's own data=) are classified leave-one-out (each image by
its k nearest other images, weights exp(sim / T): fdlight.diagnostics.knn). The evaluation draws no random number
and leaves the model's mode as it found it, so a monitored run trains exactly as an unmonitored one. Logged as
monitor/knn_top1 and monitor/knn_top5 at the global step; each teacher's number, once, as monitor/teacher_knn_top1
(the line the student climbs towards); kept in the checkpoint and in metrics.json under `monitor`."""
from __future__ import annotations

import logging
import time
from typing import Callable

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fdlight.config import group_config
from fdlight.diagnostics import knn
from fdlight.diagnostics.loading import eval_dataset
from fdlight.errors import FDLightError, check

log = logging.getLogger("fdlight")
Features = Callable[[torch.Tensor], torch.Tensor]  # images -> (B, D) pooled features


def monitor_data(cfg: DictConfig) -> DictConfig:
    """monitor.data (a data config: its `name` picks conf/data/<name>.yaml, the other keys override it), else data=."""
    given = cfg.monitor.get("data")
    if given is None:
        return cfg.data
    check(OmegaConf.is_dict(given) and given.get("name"), f"monitor.data={given} must be a data config with a name, "
                                                          f"e.g. monitor.data={{name: imagenet, root: /data/imagenet}}")
    return OmegaConf.merge(group_config("data", str(given.name)), given)


def check_monitor(m: DictConfig) -> None:
    check(m.get("name") in ("none", "knn"), f"monitor={m.get('name')} is unknown; use monitor=knn or monitor=none")
    if m.name == "knn":
        check(m.pool in knn.POOLS, f"monitor.pool={m.pool} is not a pooling; choose one of: {', '.join(knn.POOLS)}")
        knn.check_k(int(m.k), int(m.max_images), "monitor.k", exclude_self=True)


def build_monitor(cfg: DictConfig, img_size: int, attr: str, job: int | None = None,
                  loggers: list | None = None) -> "KnnMonitor | None":
    """The callback of monitor=knn, or None: monitor=none, or a data source without a labelled val split (a notice).
    `job` and `loggers`: job k of a shared-teacher sweep (module.students[k]), logging to its own loggers."""
    m = cfg.get("monitor")
    if m is None or m.name == "none":
        return None
    data = monitor_data(cfg)
    limit = int(m.max_images)
    if data.name == "synthetic":  # generated on demand: keep to the split's own size
        limit = min(limit, int(data.num_val))
    try:
        dataset = eval_dataset(data, img_size, limit)
    except FDLightError as e:
        if m.get("data") is not None:  # named by the user: its error is theirs to fix
            raise FDLightError(f"monitor.data: {e}") from None
        log.warning("monitor=knn is off: it needs a labelled val split (%s); name one with monitor.data=", e)
        return None
    if not knn.has_labels(dataset):
        log.warning("monitor=knn is off: the val split of data=%s has no labels; name a labelled set with "
                    "monitor.data=", data.name)
        return None
    if len(dataset) <= int(m.k):  # a small val split must not stop a run that did not ask for monitoring
        log.warning("monitor=knn is off: the val split of data=%s holds %d images, too few for monitor.k=%d "
                    "neighbours; pass monitor.k=%d or fewer", data.name, len(dataset), int(m.k), len(dataset) - 1)
        return None
    return KnnMonitor(m, dataset, attr, job, loggers)


def teacher_features(module, pool: str) -> dict[str, Features]:
    """Each teacher of a distillation module on the student's images as the distillation feeds it ({} for none);
    the key is the teacher's name, "" for a single teacher."""
    out = {}
    for name, teacher in (getattr(module, "teachers", None) or {}).items():
        prefix = teacher.layout.prefix_tokens
        resolved = "cls" if pool == "cls" or (pool == "auto" and prefix) else "mean"

        def features(x, name=name, teacher=teacher, resolved=resolved, prefix=prefix):
            tokens = teacher(module.teacher_input(x, name).to(teacher.mean.dtype))
            return knn.pool_tokens(tokens, resolved, prefix).float()

        out["" if module.single else name] = features
    return out


class KnnMonitor(L.Callback):
    """Evaluates the module's `attr` submodule (the model whose features are trained: a student, a classifier) and,
    once, each teacher of a distillation module."""

    def __init__(self, settings: DictConfig, dataset, attr: str, job: int | None = None, loggers: list | None = None):
        self.attr, self.job, self.loggers = attr, job, loggers
        self.every = int(settings.every_n_epochs)
        self.k, self.temperature = int(settings.k), float(settings.temperature)
        self.pool, self.batch_size = str(settings.pool), int(settings.batch_size)
        self.dataset = dataset
        self.num_classes = len(dataset.classes)
        self.images = self.labels = None
        self.history: list[dict] = []
        self.teachers: dict[str, dict] = {}

    # ------------------------------------------------------------------------------------------------ evaluation
    def load(self) -> None:
        """The fixed subset, decoded and transformed once (a plain loop: no DataLoader seed drawn from the run's RNG)."""
        if self.images is None:
            pairs = [self.dataset[i] for i in range(len(self.dataset))]
            self.images = torch.stack([x for x, _ in pairs])
            self.labels = torch.tensor([int(y) for _, y in pairs])

    @torch.no_grad()
    def evaluate(self, features: Features, device: torch.device) -> dict:
        self.load()
        rank, world = knn.rank_and_world()
        n = len(self.images)
        share = -(-n // world)  # every rank runs as many forwards (FSDP gathers weights in each): shares padded
        mine = torch.arange(rank, rank + world * share, world)
        rows = []
        for start in range(0, share, self.batch_size):
            x = self.images[mine[start:start + self.batch_size].clamp(max=n - 1)].to(device)
            with knn.autocast(device):
                rows.append(features(x).float().cpu())
        f = torch.cat(rows)
        if world > 1:
            f, order = knn.gather_rows(f), knn.gather_rows(mine)
            f = f[order < n][order[order < n].argsort()]
        r = knn.knn_accuracy(f, self.labels, f, self.labels, self.k, self.temperature, self.num_classes,
                             exclude_self=True)
        return {"top1": r.top1, "top5": r.top5}

    @property
    def state_key(self) -> str:
        return "KnnMonitor" if self.job is None else f"KnnMonitor[job {self.job}]"

    def owner(self, module):
        """The module whose model this monitor follows (job k's student of a shared-teacher sweep)."""
        return module if self.job is None else module.students[self.job]

    def student_features(self, module) -> Features:
        model = getattr(self.owner(module), self.attr)
        pool = knn.check_pool(self.pool, model, "the trained model", "monitor.pool")
        return lambda x: knn.pooled(model, x, pool)

    def record(self, trainer: L.Trainer, module, epoch: int) -> None:
        model = getattr(self.owner(module), self.attr)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            result = self.evaluate(self.student_features(module), module.device)
        finally:
            model.train(was_training)
        entry = {"epoch": epoch, "step": trainer.global_step, **result, "seconds": time.perf_counter() - start}
        self.history.append(entry)
        self.emit(trainer, {"monitor/knn_top1": result["top1"], "monitor/knn_top5": result["top5"]})
        log.info("monitor: epoch %d, step %d: k-NN top-1 %.2f%%, top-5 %.2f%% (%d val images)", entry["epoch"],
                 entry["step"], 100 * result["top1"], 100 * result["top5"], len(self.images))

    def emit(self, trainer: L.Trainer, values: dict) -> None:
        for logger in trainer.loggers if self.loggers is None else self.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    # --------------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if not self.history:  # the start of the curve (a resumed run has it)
            self.record(trainer, module, trainer.current_epoch)
        if self.teachers:
            return
        for name, features in teacher_features(self.owner(module), self.pool).items():
            start = time.perf_counter()
            self.teachers[name] = {**self.evaluate(features, module.device), "seconds": time.perf_counter() - start}
            label = "teacher" if name == "" else f"teacher/{name}"
            self.emit(trainer, {f"monitor/{label}_knn_top1": self.teachers[name]["top1"],
                               f"monitor/{label}_knn_top5": self.teachers[name]["top5"]})
            log.info("monitor: %s k-NN top-1 %.2f%% (the line the student climbs towards)", label,
                     100 * self.teachers[name]["top1"])

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        if (trainer.current_epoch + 1) % self.every == 0 and not self.done(trainer):
            self.record(trainer, module, trainer.current_epoch + 1)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if not self.done(trainer):  # the end of training, whatever the period (epochs completed by then)
            self.record(trainer, module, trainer.current_epoch)

    def done(self, trainer: L.Trainer) -> bool:
        return bool(self.history) and self.history[-1]["step"] == trainer.global_step

    def metrics(self) -> dict:
        teachers = {("teacher" if n == "" else n): r for n, r in self.teachers.items()}
        return {"monitor": {"knn": self.history, "teachers": teachers, "k": self.k, "temperature": self.temperature,
                            "num_images": len(self.dataset)}}

    def state_dict(self) -> dict:
        return {"history": self.history, "teachers": self.teachers}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.teachers = list(state["history"]), dict(state["teachers"])
