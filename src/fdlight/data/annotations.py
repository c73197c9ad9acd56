"""What the dense datasets and their DataModules share, kept in a leaf module so that data/dense.py can import
data/ade20k.py and data/coco.py without a cycle: the ignored label, ADE20K's zero-label rule, and the file names an
error message lists."""
from __future__ import annotations

import numpy as np

from fdlight.constants import IGNORE


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's rule: 0 ("other") is ignored, class k >= 1 becomes k - 1."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE
    return out.astype(np.uint8)


def name_some(names: list[str], limit: int = 3) -> str:
    """The first few names of a list, for error messages."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
