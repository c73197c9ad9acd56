"""fdlight: Feature Distillation (Wei et al. 2022, arXiv 2205.14141) with Lightning and Hydra."""
import os

# Every `python -m fdlight...` imports this package before its own module, so this runs before anything loads torch,
# whose OpenMP runtime reads it once: threads that spin while they wait (libgomp's default) made a CPU step 3x slower
# and benchmarks 50-200x slower on a machine shared with other jobs. An exported value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def distill(student=None, teacher=None, overrides=(), run_dir=None):
    """Distil into a module of one's own (or from one): `fdlight.api.distill`, imported when called (torch loads
    then, not with the command line)."""
    from fdlight.api import distill as run

    return run(student=student, teacher=teacher, overrides=overrides, run_dir=run_dir)
