"""The one owner of fdlight's configuration: the shipped config tree (`conf/`, packaged as `fdlight.conf`), Hydra
composition outside the CLI (notebooks, benchmarks, diagnostics), the choices of each config group and the shipped
defaults of each stage section. Everything else asks this module instead of reading YAML itself."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from omegaconf import DictConfig, OmegaConf

from fdlight.errors import FDLightError, check

CONFIG_MODULE = "fdlight.conf"
GROUPS = ("stage", "teacher", "student", "data", "whitening", "drop_path", "trainer", "logger", "monitor", "experiment")


def compose(overrides=(), with_hydra: bool = False) -> DictConfig:
    """The config `python -m fdlight <overrides>` runs, composed by Hydra (inside a running app too); `with_hydra`
    keeps Hydra's own `hydra:` section (the run directory, the job name)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = expand_teacher_list(list(overrides))
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)


def _files(group: str):
    return sorted((p for p in resources.files(CONFIG_MODULE).joinpath(group).iterdir() if p.name.endswith(".yaml")),
                  key=lambda p: p.name)


@lru_cache(maxsize=None)
def group_choices(group: str) -> tuple[str, ...]:
    """The selectable choices of a config group (files whose name starts with `_` are bases, not choices)."""
    return tuple(p.name[:-5] for p in _files(group) if not p.name.startswith("_"))


def choices_text() -> str:
    """Each group and its choices, a line each (the config's --help shows it)."""
    return "\n".join(f"{group}: {', '.join(group_choices(group))}" for group in sorted(GROUPS))


OmegaConf.register_new_resolver("fdlight_choices", choices_text, replace=True)


@lru_cache(maxsize=None)
def primary_keys() -> frozenset[str]:
    """The top-level keys every composed config has (the groups, the stage sections, the primary config's keys):
    most command lines name only these, so checking them reads one file instead of every stage and experiment."""
    keys = {str(k) for k in OmegaConf.load(str(resources.files(CONFIG_MODULE).joinpath("config.yaml"))).keys()}
    return frozenset((keys | set(GROUPS) | set(group_choices("stage")) | {"hydra"}) - {"defaults"})


@lru_cache(maxsize=None)
def top_level_keys() -> frozenset[str]:
    """Every top-level key a shipped config can hold: the groups, the primary config's keys, and the sections the
    stage and experiment files add."""
    conf = resources.files(CONFIG_MODULE)
    files = [conf.joinpath("config.yaml"), *_files("stage"), *_files("experiment")]
    keys = {str(k) for f in files for k in OmegaConf.load(str(f)).keys()}
    return frozenset((keys | set(GROUPS) | {"hydra"}) - {"defaults"})


def stage_defaults(stage: str) -> DictConfig:
    """The shipped settings of one stage section (`conf/stage/<stage>.yaml`'s `<stage>:` block), for a stage that
    runs inside another (the pipeline's steps, the demo) with a config composed for a different stage."""
    check(stage in group_choices("stage"), f"unknown stage {stage!r}; choose one of: {', '.join(group_choices('stage'))}")
    return compose([f"stage={stage}"])[stage]


def group_config(group: str, choice: str) -> DictConfig:
    """One config group's choice as Hydra composes it (its base file included), e.g. ("teacher", "timm")."""
    choices = group_choices(group)
    check(choice in choices, f"unknown {group} {choice!r}; choose one of: {', '.join(choices)}")
    return compose([f"{group}={choice}"])[group]


@lru_cache(maxsize=None)
def data_keys(choice: str) -> tuple[str, ...]:
    """The settings data=<choice> declares: a data config lists exactly the keys its source reads."""
    return tuple(sorted(str(k) for k in group_config("data", choice)))


def unread_data_key(choice: str, key: str, arg: str | None = None) -> FDLightError:
    """`data.root=...` with a data= that reads no data.root (data=synthetic generates its images) would train on
    other data than the user meant: one line naming the sources that read the key."""
    readers = [c for c in group_choices("data") if key in data_keys(c)]
    hint = f"data.{key} is read by data={', data='.join(readers)}: choose one of those" if readers else \
        f"data={choice} has: {', '.join(data_keys(choice))}"
    given = f" ({arg!r})" if arg else " (set by the chosen experiment=)"
    return FDLightError(f"data={choice} does not read data.{key}{given}, so it would be ignored; {hint}")


def check_data_keys(data: DictConfig | None, choice: str | None, args=()) -> None:
    """Every key of the composed `data` is one the chosen data config declares (a shipped choice: a user's own config
    directory declares its own); `args`, the command line's overrides, name the one that set it."""
    if data is None or choice not in group_choices("data"):
        return
    for key in map(str, data):
        if key not in data_keys(choice):
            arg = next((a for a in args if a.partition("=")[0].lstrip("+~") == f"data.{key}"), None)
            raise unread_data_key(choice, key, arg)


def check_student_model(student: DictConfig | None, choice: str | None) -> None:
    """`student.model=convnext_atto` on a student config written for another architecture: its kwargs, init and block
    class fit the models of the shipped configs that share its block class only (timm's own error is a TypeError
    deep in the build)."""
    if student is None or choice not in group_choices("student") or OmegaConf.is_missing(student, "model") \
            or student.get("model") is None:
        return
    own = group_config("student", choice)
    if OmegaConf.is_missing(own, "model") or own.get("block_class") is None or student.model == own.model:
        return
    family = sorted({str(c.model) for c in map(lambda n: group_config("student", n), group_choices("student"))
                     if c.get("block_class") == own.block_class and not OmegaConf.is_missing(c, "model")})
    check(str(student.model) in family,
          f"student.model={student.model} is not an architecture student={choice} builds (its kwargs, init and "
          f"{own.block_class} blocks fit {', '.join(family)}); choose the student config of the architecture you "
          f"want: student={', student='.join(group_choices('student'))} (any timm model: student=timm "
          f"student.name={student.model})")


def section(cfg: DictConfig, stage: str) -> DictConfig:
    """cfg's `<stage>` section, or the shipped one when cfg was composed for another stage."""
    return cfg[stage] if cfg.get(stage) is not None else stage_defaults(stage)


def plain(cfg: DictConfig) -> DictConfig:
    """A resolved, unlocked copy (no interpolations, no Hydra struct flag) that a stage may edit."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def with_stage(cfg: DictConfig, stage: str, updates: dict | None = None) -> DictConfig:
    """A plain copy of cfg set to run `stage`: its section filled from the shipped defaults when cfg lacks it, then
    `updates` (dotted keys) merged in."""
    sub = plain(cfg)
    if sub.get(stage) is None:
        sub[stage] = plain(stage_defaults(stage))
    sub.stage = stage
    for key, value in (updates or {}).items():
        OmegaConf.update(sub, key, value, merge=True)
    return sub


# --------------------------------------------------------------------------------------------- several teachers
def _parse(arg: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(arg)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return None


def _teacher_selection(arg: str):
    """The teachers an override selects: a list for `teacher=[a,b]`, a name for `teacher=a`, None otherwise."""
    if not arg.startswith("teacher="):
        return None
    o = _parse(arg)
    if o is None or o.package is not None:
        return None
    if o.is_sweep_override():
        check(not any(isinstance(v, list) for v in o.value().list), f"{arg!r} sweeps over lists of teachers; run "
                                                                    f"one command per list of teachers")
        return None
    return o.value()


def expand_teacher_list(overrides: list[str]) -> list[str]:
    """`teacher=[a,b]` as Hydra's own package overrides (`~teacher +teacher@teacher.a=a +teacher@teacher.b=b`), so each
    teacher's file composes under `teacher.<name>` instead of all of them merging into one `teacher`; a
    `teacher.<key>=v` that names no listed teacher is set for every teacher. Other command lines pass unchanged."""
    names = None
    for arg in overrides:
        chosen = _teacher_selection(arg)
        if chosen is not None:
            names = [str(n) for n in chosen] if isinstance(chosen, list) else None
    if names is None or len(names) < 2:
        return list(overrides)
    check_teacher_names(names)
    out = []
    for arg in overrides:
        if _teacher_selection(arg) is not None:
            continue
        out.extend(_per_teacher(arg, names))
    return [*out, "~teacher", *(f"+teacher@teacher.{n}={n}" for n in names)]


def check_teacher_names(names: list[str]) -> None:
    choices = group_choices("teacher")
    listed = f"teacher=[{','.join(names)}]"
    for n in names:
        check(n in choices, f"unknown teacher {n!r} in {listed}; choose from: {', '.join(choices)}")
        check(names.count(n) == 1, f"{listed} names {n} twice; list each teacher once")


def _per_teacher(arg: str, names: list[str]) -> list[str]:
    """`teacher.key=v` -> one `teacher.<name>.key=v` per teacher; `teacher.<name>.key=v` and the rest as they are."""
    head, sep, value = arg.partition("=")
    prefix = head[:len(head) - len(head.lstrip("+~"))]
    key = head[len(prefix):]
    parts = key.split(".")
    if parts[0] != "teacher" or len(parts) < 2 or parts[1] in names:
        return [arg]
    return [f"{prefix}teacher.{n}.{'.'.join(parts[1:])}{sep}{value}" for n in names]


def several_teachers(cfg: DictConfig) -> bool:
    """Whether `teacher` holds a list's teachers keyed by name rather than one teacher's settings."""
    return cfg.get("teacher") is not None and "builder" not in cfg.teacher


def teacher_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """{name: teacher config}: the one teacher of `teacher=<name>` (under teacher.name), or each of `teacher=[a,b]`
    (under its config name), in the listed order."""
    if not several_teachers(cfg):
        return {str(cfg.teacher.name): cfg.teacher}
    names = [str(k) for k, v in cfg.teacher.items() if OmegaConf.is_dict(v) and "builder" in v]
    for key, value in cfg.teacher.items():
        if not (OmegaConf.is_dict(value) and "builder" in value):
            raise FDLightError(f"teacher.{key} is not one of the listed teachers ({', '.join(names)}): with several "
                               f"teachers, set a teacher's setting for each, e.g. teacher.{names[0] if names else 'a'}"
                               f".{key}=...")
    return {str(k): v for k, v in cfg.teacher.items()}


def teacher_label(cfg: DictConfig) -> str:
    """The teacher's name, or the listed teachers joined by '+'."""
    return "+".join(teacher_configs(cfg)) if several_teachers(cfg) else str(cfg.teacher.name)


def student_seed(cfg: DictConfig) -> int:
    """The seed of the student's own randomness in a distillation run (its init and every step's drop path):
    `distill.student_seed`, or the run's `seed` when that is null. Data order and augmentation always follow `seed`,
    so jobs that differ only in their student seed see the same batches (a shared-teacher sweep relies on it)."""
    own = OmegaConf.select(cfg, "distill.student_seed") if cfg.get("stage") == "distill" else None
    return int(cfg.get("seed", 0) if own is None else own)
