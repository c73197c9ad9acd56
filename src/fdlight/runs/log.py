"""The run's CSV log: one file (logs/version_0/metrics.csv) for the run's whole life. Every checkpoint records how many
rows the log held when it was taken; a resumed run cuts the log back to those rows and the row of the checkpoint's own
step before it trains, so the steps it trains again replace the ones a killed process logged after its last
checkpoint, never appear twice.

Lightning writes a step's row after the step's checkpoint (its checkpoint callback runs in on_train_batch_end, the
row comes after): a process killed in between (while the checkpoint's folder is synced, or during the epoch's
validation) would lose that row for good, since the resumed run starts at the next step. So a checkpoint taken there
also holds the row, and a resumed run whose log lacks it writes it back."""
from __future__ import annotations

import csv
import io
import os

from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from fdlight.artifacts import write_text


class KeptWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the run's metrics.csv where Lightning's would delete it; counts its rows."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        self.rows = 0
        if os.path.isfile(self.metrics_file_path):
            header, rows = self.read()
            self.metrics_keys, self.rows = header, len(rows)

    def _check_log_dir_exists(self) -> None:
        """The run's own log from before a resume: kept (Lightning deletes it)."""

    def read(self) -> tuple[list[str], list[dict]]:
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def save(self) -> None:
        self.rows += len(self.metrics)
        super().save()

    def has_row(self, step: int, metrics: dict) -> bool:
        """Whether the log on disk has a row of `step` holding each of `metrics`' names."""
        if not os.path.isfile(self.metrics_file_path):
            return False
        return any(int(float(r.get("step") or -1)) == step and all(r.get(k) not in (None, "") for k in metrics)
                   for r in self.read()[1])

    def keep(self, rows: int, step: int) -> None:
        """Cut the log back to its first `rows` rows and those after them of steps before `step` (none: the file
        goes)."""
        self.metrics = []
        if not os.path.isfile(self.metrics_file_path):
            return
        if step == 0:
            os.unlink(self.metrics_file_path)
            self.metrics_keys, self.rows = [], 0
            return
        header, logged = self.read()
        kept = logged[:rows] + [r for r in logged[rows:] if int(float(r.get("step") or 0)) < step]
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
        write_text(self.metrics_file_path, out.getvalue())
        self.rows = len(kept)


class RunLog(CSVLogger):
    """CSVLogger writing logs/version_0/metrics.csv of the run directory, continued by a resumed run."""

    def __init__(self, run_dir):
        super().__init__(save_dir=str(run_dir), name="logs", version=0)

    @property
    @rank_zero_experiment
    def experiment(self) -> KeptWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeptWriter(log_dir=self.log_dir)
        return self._experiment

    def rows(self) -> int:
        """Rows in the log once what is pending is written (rank 0 writes it; other ranks say 0)."""
        if rank_zero_only.rank != 0:
            return 0
        self.save()
        return self.experiment.rows


def unlogged_row(trainer) -> dict | None:
    """The row Lightning is about to log for the step that just trained, when called in that step's
    on_train_batch_end (where its checkpoint is taken; the row comes after): {"step": s, "metrics": {...}}, or None
    elsewhere and where this step logs no row. It reads Lightning's loop and logger connector as Lightning does when
    it logs the row; where they changed, None."""
    try:
        connector, loop = trainer._logger_connector, trainer.fit_loop
        progress = loop.epoch_loop.batch_progress.total  # a batch is marked completed after its batch-end hooks
        if progress.processed == progress.completed or loop._should_accumulate() or not connector.should_update_logs:
            return None
        metrics = convert_tensors_to_scalars(connector.metrics["log"])
        step = loop.epoch_loop._batches_that_stepped
    except (AttributeError, KeyError, TypeError):
        return None
    if not metrics:
        return None
    metrics.pop("step", None)
    return {"step": int(step), "metrics": {**metrics, "epoch": trainer.current_epoch}}


class ContinuousLog(Callback):
    """Records in each checkpoint how many rows every run log held (and the row of the step it was taken at, where
    Lightning had not written it yet), and cuts the logs back to the checkpoint's moment when a run resumes (to
    nothing when it starts from step 0 again); a log the checkpoint does not know (an older checkpoint's) is kept."""

    def __init__(self, logs):
        self.logs = list(logs)
        self.saved: dict[str, int] = {}
        self.unlogged: dict | None = None  # the row a resumed run writes back, if its log lacks it
        self.trainer = None

    def state_dict(self) -> dict:
        state = {"rows": {lg.log_dir: lg.rows() for lg in self.logs}}
        own = self.own_log(self.trainer) if self.trainer is not None else None
        row = unlogged_row(self.trainer) if own is not None else None
        if row is not None:
            state["unlogged"] = {"log_dir": own.log_dir, **row}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved = dict(state_dict.get("rows") or {})
        self.unlogged = state_dict.get("unlogged")

    def own_log(self, trainer) -> RunLog | None:
        """The trainer's own logger, when it is one of the run logs (a sweep's jobs log their rows themselves)."""
        return next((lg for lg in self.logs if lg is trainer.logger), None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer  # state_dict, called as a checkpoint is taken, is given none

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for lg in self.logs:
            rows = 0 if trainer.global_step == 0 else self.saved.get(lg.log_dir)
            if rows is not None:
                lg.experiment.keep(rows, trainer.global_step)
        row = self.unlogged
        own = self.own_log(trainer)
        if trainer.global_step and row and own is not None and row.get("log_dir") == own.log_dir \
                and not own.experiment.has_row(row["step"], row["metrics"]):
            own.log_metrics(row["metrics"], step=row["step"])
            own.save()
