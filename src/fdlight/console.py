"""What a person sees on the console: fdlight's own lines, the progress, errors and the warnings that call for an
action. The run's log file (fdlight.log) keeps everything the libraries log.

`setup()` runs once per process, before Hydra composes anything: warning filters and Lightning's litlogger notice.
`job()` wraps each Hydra job (Hydra configures its log handlers per job): Lightning's loggers go through Hydra's
handlers, library chatter and Lightning's device lines go to the log file only, advice about the machine reaches the console
once per process, and a W&B run
is closed before the process exits (at interpreter exit W&B writes raw colour codes into redirected output)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

log = logging.getLogger("fdlight")

# Harmless library warnings that only confuse a reader: nothing in them can be acted on from fdlight's settings.
QUIET = (
    r".*`val_dataloader` but have no `validation_step`.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*is smaller than the logging interval.*",
    r".*Found .* module\(s\) in eval mode.*",
    # PyTorch notices raised inside library code (timm, torchmetrics), not from anything a setting controls
    r".*torch\.searchsorted\(\): input value tensor is non-contiguous.*",
    r".*non-tuple sequence for multidimensional indexing.*",
    # Lightning: fdlight's data order is seeded by the loop position, so a mid-epoch resume is exact; the
    # ResumeNote callback says where training resumes instead
    r".*resuming from a checkpoint that ended before the epoch ended.*",
    # Lightning: data=webdataset's stream gives each worker an exact share of the length it states
    r".*Your `IterableDataset` has `__len__` defined.*",
)
# Loggers whose records go to the log file only (faster-coco-eval logs two full COCOeval tables per evaluation; the
# stage's closing line gives the mAPs).
FILE_ONLY_LOGGERS = ("faster_coco_eval",)
# Lightning's notices that fdlight's own lines already cover (the closing line gives the steps; ResumeNote the resume).
FILE_ONLY_MESSAGES = (
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`Trainer.fit` stopped:",
    "Restoring states from the checkpoint path at",
    "Restored all states from the checkpoint at",
    # the devices as Lightning sees them, at every Trainer: nothing to act on (the log file keeps them)
    "GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:",
    # Ctrl-C: RunCheckpoint's one line says where the run stopped and how to go on
    "\nDetected KeyboardInterrupt",
)
# Advice about the machine, the same for every stage of a process (the pipeline runs several): console once.
ONCE_PER_PROCESS = ("You are using a CUDA device",)
_shown_once: set[str] = set()


def setup() -> None:
    """Once per process: PyTorch's C++ notices off, the QUIET warnings filtered, Lightning's litlogger notice
    dropped."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoLitlogger) for f in rank_zero.filters):
        rank_zero.addFilter(_NoLitlogger())


class _NoLitlogger(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


class ConsoleFilter(logging.Filter):
    """The console handler's filter: FILE_ONLY_* records dropped, ONCE_PER_PROCESS lines shown once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in FILE_ONLY_LOGGERS:
            return False
        message = record.getMessage()
        if message.startswith(FILE_ONLY_MESSAGES):
            return False
        once = next((p for p in ONCE_PER_PROCESS if message.startswith(p)), None)
        if once is not None:
            if message in _shown_once:
                return False
            _shown_once.add(message)
        return True


def console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to a terminal or stream, not to a file."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def route_library_logs() -> None:
    """Lightning's loggers lose their own console handler and propagate to Hydra's (console and fdlight.log); the
    console handlers get the ConsoleFilter."""
    import lightning.pytorch  # noqa: F401 - attaches its console handler, removed here

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in console_handlers():
        if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())


def wandb_settings():
    """W&B's settings for fdlight's runs: quiet (no per-run history and summary tables on the console: finish_wandb
    says in one line where the run went)."""
    import wandb

    return wandb.Settings(quiet=True)


def finish_wandb(run=None) -> None:
    """Close a W&B run (`run`, or the one still open), while the output streams work (its exit hook writes colour
    codes into files), and say in one line where it is: the folder to `wandb sync` for an offline run, the URL
    otherwise."""
    wandb = sys.modules.get("wandb")
    run = run if run is not None else getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    offline = bool(getattr(run.settings, "_offline", False))
    where = run.settings.sync_dir if offline else run.url
    run.finish()
    if offline:
        log.info("W&B (offline): `wandb sync %s` uploads this run", where)
    elif where:
        log.info("W&B run: %s", where)


@contextlib.contextmanager
def job():
    """One Hydra job: library logs routed (route_library_logs), an open W&B run finished at the end."""
    route_library_logs()
    try:
        yield
    finally:
        finish_wandb()


def interactive(stream=None) -> bool:
    """Whether output goes to a terminal (or a notebook) that redraws a live progress bar; a file or a CI log does
    not."""
    stream = stream if stream is not None else sys.stdout
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
