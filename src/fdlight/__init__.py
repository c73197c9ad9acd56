"""fdlight: Feature Distillation (Wei et al. 2022, arXiv 2205.14141) with Lightning and Hydra."""
import os

# Every `python -m fdlight...` imports this package before its own module, so this runs before anything loads torch,
# whose OpenMP runtime reads it once: threads that spin while they wait (libgomp's default) made a CPU step 3x slower
# and benchmarks 50-200x slower on a machine shared with other jobs. An exported value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
