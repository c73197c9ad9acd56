"""Shared fixtures: offline hubs, a Hydra compose of the real config tree, and stage runs in temporary folders."""
from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
if not torch.cuda.is_available():  # Triton kernels (trainer.attention=triton) run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the cores are shared out, so N workers do not fight
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # the runs a test starts in a subprocess too
    torch.set_num_threads(THREADS)

TINY = ["trainer=cpu", "logger=csv"]


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker with the rest of its group, "
                                       "one at a time (\"processes\": tests that train on several processes at once)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup`, the tests of a module that share a module-scoped fixture (one tiny run
    that several tests read) go to one worker, so the run is made once; every other test goes where a worker is free."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if item.get_closest_marker("xdist_group") or fixtures is None:
            continue
        if any(defs[-1].scope in ("module", "class", "package") for defs in fixtures.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def compose(overrides=()):
    """The config `python -m fdlight <overrides>` would run, composed from the packaged config tree."""
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="fdlight.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_stage(overrides, run_dir: Path) -> dict:
    """Run a stage in-process on the composed config, writing into run_dir."""
    from fdlight.stages import run

    return run(compose([*TINY, *overrides]), run_dir)


def run_cli(args, cwd: Path, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """`python -m fdlight ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fdlight", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# What a command run by run_main changes in the process that a new process would start without: restored after it.
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")  # fdlight.console routes them to the root


def run_main(args, cwd: Path | None = None, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m fdlight ARGS` through its entry point, `fdlight.__main__.main`, in this process: its exit status
    and what it printed (file descriptors 1 and 2, so data workers' lines too; warnings printed as a new process
    prints them), as run_cli gives them, without the seconds a new process spends importing torch and Lightning.
    What only a process of its own shows (a signal, a refusal before torch loads or before a second process starts,
    DDP ranks, a console in a file) keeps run_cli. The command line, working folder, environment, logging, warning
    filters, random generators, thread count and fdlight's once-per-process state are left as they were; a command
    still running after `timeout` seconds is stopped with an error."""
    import random
    import traceback
    import warnings

    import numpy as np
    from hydra.core.hydra_config import HydraConfig

    from fdlight import console
    from fdlight.__main__ import main
    from fdlight.sweeps import record

    root = logging.getLogger()
    libraries = {name: (lg.handlers[:], lg.propagate) for name in LIBRARY_LOGGERS for lg in [logging.getLogger(name)]}
    saved = (sys.argv, os.getcwd(), dict(os.environ), root.handlers[:], root.level, torch.get_num_threads(),
             HydraConfig.instance().cfg, set(console._shown_once), dict(record._kept),
             torch.get_rng_state(), np.random.get_state(), random.getstate())
    sys.stdout.flush()
    sys.stderr.flush()
    files = [tempfile.TemporaryFile() for _ in range(2)]
    fds = [os.dup(1), os.dup(2)]
    streams = sys.stdout, sys.stderr
    wrappers = []

    def too_long(signum, frame):
        raise TimeoutError(f"python -m fdlight {' '.join(map(str, args))} ran past {timeout} s")

    alarm = signal.signal(signal.SIGALRM, too_long)
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        wrappers = [open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False) for fd in (1, 2)]
        sys.stdout, sys.stderr = wrappers
        sys.argv = ["fdlight", *map(str, args)]
        os.environ.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings():  # a new process's filters, and its printing to stderr (not pytest's record)
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = warnings._showwarning_orig
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                main()
                code = 0
            except SystemExit as e:  # as the interpreter reports it
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - a crash, as a process shows it (Hydra re-raises under a tracer)
                traceback.print_exc()
                code = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, alarm)
        for handler in root.handlers:  # Hydra's, for this command's job: on streams that close here
            if handler not in saved[3]:
                handler.close()
        for stream in (*wrappers, sys.__stdout__, sys.__stderr__):
            stream.flush()
        gc.collect()  # what the command left open (its run's files) is closed, as at a process's exit
        for stream in wrappers:
            stream.close()
        sys.stdout, sys.stderr = streams
        for fd, old in zip((1, 2), fds):
            os.dup2(old, fd)
            os.close(old)
        (sys.argv, cwd_before, environ, root.handlers[:], level, threads, HydraConfig.instance().cfg, shown, kept,
         torch_rng, numpy_rng, python_rng) = saved
        os.chdir(cwd_before)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        root.setLevel(level)
        torch.set_num_threads(threads)
        console._shown_once.clear()
        console._shown_once.update(shown)
        record._kept.clear()
        record._kept.update(kept)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        for name, (handlers, propagate) in libraries.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
    printed = []
    for f in files:
        f.seek(0)
        printed.append(f.read().decode("utf-8", errors="replace"))
        f.close()
    return subprocess.CompletedProcess(["fdlight", *map(str, args)], code, *printed)


def dense_lrs(module, total_steps: int = 10) -> dict[str, float]:
    """The initial lr of every parameter of a dense module's model, by name, from its real optimizer."""
    opt = module.optimizer(total_steps=total_steps)["optimizer"]
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in module.model.named_parameters()}


@pytest.fixture
def one_thread():
    """Tiny models run much faster on one thread (and do not fight other tests for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.getbasetemp() / "wandb"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(base))
