"""`python -m fdlight.bench.embed [overrides]`: images/s of stage=embed, the whole stage as a user runs it (data
loading, the model in bf16 on a GPU, the parts and the joined file), in a temporary run directory.

Default: the tiny teacher on the embedded synthetic data (embed.pretrained=teacher); e.g. `python -m
fdlight.bench.embed teacher=clip_vitb teacher.weights=null data.num_train=4096 embed.batch_size=256` on a GPU."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from fdlight.config import compose


def main(argv=None) -> dict:
    from fdlight.stages import run

    overrides = ["stage=embed", "embed.pretrained=teacher", *(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory() as tmp:
        m = run(compose(overrides), Path(tmp) / "run")
    out = {"rows": m["rows"], "dim": m["dim"], "dtype": m["dtype"], "img_per_s": round(m["img_per_s"], 1),
           "wall_s": round(m["wall_s"], 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
