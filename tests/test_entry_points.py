"""Every `python -m fdlight...` entry point starts the same way: OpenMP threads wait passively (read once, when torch
loads) unless the user exported another policy."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fdlight

SRC = Path(fdlight.__file__).parent
# The modules `python -m` runs: each package's __main__ and every module with a __main__ guard (found, not listed).
ENTRY_POINTS = sorted(
    ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__main__")
    for p in SRC.rglob("*.py") if p.name == "__main__.py" or 'if __name__ == "__main__"' in p.read_text())
# Run as `python -m` runs it; the first import of torch reports the policy the process has then and stops it there
# (torch never loads: each check takes a fraction of a second).
PROBE = """
import importlib.abc, os, runpy, sys
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY")); sys.stdout.flush(); os._exit(0)
sys.meta_path.insert(0, Probe())
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:  # --help answered without torch: the policy any later import of it would read
    print(os.environ.get("OMP_WAIT_POLICY"))
"""


def policy(module: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-c", PROBE, module], env={**clean, **env}, capture_output=True, text=True)
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-500:]


def test_the_entry_points_are_found():
    assert {"fdlight", "fdlight.bench", "fdlight.bench.fit", "fdlight.convert"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_openmp_threads_wait_passively_before_torch_loads(module):
    assert policy(module) == "PASSIVE"


def test_an_exported_policy_wins():
    assert policy("fdlight.bench", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
