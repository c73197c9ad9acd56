"""`python -m fdlight.bench`: the distillation step's benchmark (see fdlight.bench.distill)."""
import os

from fdlight.bench.distill import main

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
