"""`python -m fdlight.bench.monitor [overrides]`: what monitor=knn costs, side by side.

Runs the same distillation twice in temporary folders (default: the embedded default, `python -m fdlight` with no
arguments), with monitor=none and with monitor=knn, and prints each run's wall time per epoch, the monitor's own
seconds per evaluation (timed inside the callback) and its share of the epoch's wall time at its period
(monitor.every_n_epochs; the teacher's number, once, included), and the difference of the two runs' wall times (on a
shared machine that difference is mostly the load of others: the in-callback share is the measure)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from fdlight.config import compose


def timed_run(overrides: list[str], run_dir: Path) -> dict:
    from fdlight.stages import run

    return run(compose(overrides), run_dir)


def main(argv=None) -> dict:
    overrides = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        plain = timed_run([*overrides, "monitor=none"], Path(tmp) / "plain")
        watched = timed_run([*overrides, "monitor=knn"], Path(tmp) / "knn")
    epochs = max(1, int(compose(overrides).distill.epochs))
    evals = watched["monitor"]["knn"]
    monitor_s = sum(e["seconds"] for e in evals) + sum(t["seconds"] for t in watched["monitor"]["teachers"].values())
    epoch_s = plain["wall_s"] / epochs
    out = {"epochs": epochs, "evaluations": len(evals), "images": watched["monitor"]["num_images"],
           "epoch_s_unmonitored": round(epoch_s, 3), "epoch_s_monitored": round(watched["wall_s"] / epochs, 3),
           "seconds_per_evaluation": round(sum(e["seconds"] for e in evals) / len(evals), 3),
           "monitor_share_of_epoch": round(monitor_s / epochs / epoch_s, 4),
           "wall_difference_share": round((watched["wall_s"] - plain["wall_s"]) / plain["wall_s"], 4)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
