"""The schema of every stage section: each setting's type and range, checked once before anything is built or written,
so a bad value fails in one line that names it (not deep inside a DataLoader or an optimizer). Cross-field rules live
in each stage's own `validate`."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig

from fdlight.errors import FDLightError


@dataclass(frozen=True)
class Rule:
    """A number setting: whole (`whole=True`) or real, with bounds; `also` lists other accepted values."""
    low: float | None = None
    high: float | None = None
    whole: bool = False
    strict_low: bool = False          # low itself is excluded
    optional: bool = False            # null is accepted
    also: tuple = ()
    hint: str = ""

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if value in self.also and type(value) is not bool:
            return True
        if type(value) is bool or not isinstance(value, (int, float)) or (self.whole and type(value) is not int):
            return False
        if self.low is not None and (value < self.low or (self.strict_low and value == self.low)):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.strict_low else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        text = f"{kind} {' and '.join(bounds)}".strip()
        if self.also:
            text += " (or " + ", ".join(repr(a) for a in self.also) + ")"
        if self.optional:
            text += " or null"
        return text + (f" ({self.hint})" if self.hint else "")


def count(low: int = 1, **kw) -> Rule:
    return Rule(low=low, whole=True, **kw)


def positive(**kw) -> Rule:
    return Rule(low=0, strict_low=True, **kw)


def at_least_zero(**kw) -> Rule:
    return Rule(low=0, **kw)


def fraction(**kw) -> Rule:
    return Rule(low=0, high=1, **kw)


LR = positive(hint="a learning rate")
COMMON = {
    "epochs": count(1), "max_steps": Rule(low=1, whole=True, also=(-1,), hint="-1: no limit"),
    "batch_size": count(1), "total_batch_size": count(1, optional=True, hint="null: batch_size x processes"),
    "eval_batch_size": count(1), "log_every_n_steps": count(1),
    "val_every_n_epochs": count(0), "checkpoint_every_n_steps": count(0), "num_vis": count(0),
    "num_threads": count(1, optional=True), "warmup_epochs": at_least_zero(), "warmup_steps": count(0),
    "weight_decay": at_least_zero(), "clip_grad": at_least_zero(optional=True, hint="0 or null: no clipping"), "drop_path": Rule(low=0, high=1 - 1e-9),
    "warmup_lr": at_least_zero(), "min_lr": at_least_zero(), "layer_decay": Rule(low=0, high=1, strict_low=True),
}
SCHEMAS: dict[str, dict[str, Rule]] = {
    "distill": {"base_lr": LR, "student_seed": Rule(low=0, whole=True, optional=True, hint="null: seed"),
                "loss_beta": at_least_zero(hint="the paper's smooth-L1 uses 2.0; 0 is L1")},
    "finetune": {"base_lr": LR, "min_scale": Rule(low=0, high=1, strict_low=True), "re_prob": fraction(),
                 "mixup": at_least_zero(), "cutmix": at_least_zero(), "mixup_prob": fraction(),
                 "mixup_switch_prob": fraction(), "label_smoothing": Rule(low=0, high=1, strict_low=False),
                 "ema": Rule(low=0, high=1, strict_low=True, optional=True), "crop_pct": Rule(low=0, high=1,
                                                                                              strict_low=True),
                 "img_size": count(1, optional=True)},
    "linear": {"base_lr": LR, "min_scale": Rule(low=0, high=1, strict_low=True), "momentum": fraction(),
               "trust_coefficient": positive(), "crop_pct": Rule(low=0, high=1, strict_low=True),
               "img_size": count(1, optional=True)},
    "segment": {"lr": LR, "crop_size": count(1), "cat_max_ratio": Rule(low=0, high=1, strict_low=True),
                "aux_weight": at_least_zero(), "channels": count(1), "aux_channels": count(0),
                "dropout": Rule(low=0, high=1 - 1e-9), "power": positive(), "eval_stride": count(1, optional=True),
                "eval_chunk": count(1)},
    "knn": {"k": count(1), "temperature": positive(), "max_bank": count(1, optional=True),
            "max_queries": count(1, optional=True)},
    "monitor": {"every_n_epochs": count(1), "max_images": count(2), "k": count(1), "temperature": positive()},
    "embed": {"chunk_batches": count(1)},
    "detect": {"lr": LR, "img_size": count(1), "fpn_channels": count(1), "box_head_dim": count(1),
               "mask_head_dim": count(1), "mask_threshold": fraction(), "power": positive()},
}


# The data settings several sources share (each source's config lists the keys it reads: fdlight.config).
DATA = {"num_workers": count(0, optional=True, hint="null: the cores this process may use, at most 8")}


def check_rules(name: str, section: DictConfig | None, rules: dict[str, Rule]) -> None:
    """Check every setting of `<name>.*` that `rules` knows."""
    if not isinstance(section, DictConfig):
        return
    for key, rule in rules.items():
        if key not in section:
            continue
        value = section.get(key)
        if isinstance(value, (ListConfig, DictConfig)) or not rule.accepts(value):
            raise FDLightError(f"{name}.{key}={value!r} must be {rule.describe()}")


def check_section(stage: str, section: DictConfig | None) -> None:
    """Check every setting of `<stage>.*` that the schema knows (the common ones and the stage's own)."""
    check_rules(stage, section, {**COMMON, **SCHEMAS.get(stage, {})})


def check_sections(cfg: DictConfig) -> None:
    """check_section for every stage section the config holds (a pipeline holds several), and the data settings."""
    for stage in (*SCHEMAS, "diagnose", "pipeline"):
        check_section(stage, cfg.get(stage))
    check_rules("data", cfg.get("data"), DATA)
