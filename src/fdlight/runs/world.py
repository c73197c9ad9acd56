"""The processes a run has and how its batch is made up. The world is what a launcher started (torchrun, SLURM's srun)
or, without one, the devices present; asking for devices or nodes that are not there is one line before any process
starts. A stage's `total_batch_size` (the paper's) is then made up by gradient accumulation, so the optimizer sees the
recipe's batch and lr schedule on 1 GPU, 8 GPUs or 2x8. Every rank waits for its peers at most
`trainer.init_timeout` seconds."""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from fdlight.errors import FDLightError, check

# Lightning's default for the collectives once every rank has joined (a long checkpoint write on rank 0 waits on it)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def on_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config runs on CUDA GPUs here (accelerator gpu/cuda, or auto with one visible)."""
    return torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")


def launched() -> tuple[int, int, str] | None:
    """(processes per node, nodes, who said so) when a launcher started this process; None otherwise (Lightning
    starts the other ranks itself)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") and env.get("LOCAL_WORLD_SIZE") and env.get("WORLD_SIZE"):
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        return local, max(world // local, 1), f"torchrun started {world} processes, {local} a node"
    if env.get("SLURM_NTASKS") and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # srun, as Lightning
        tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES") or 1)
        per = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", ""))  # "8" or "8(x2)"
        local = int(per.group()) if per else max(tasks // nodes, 1)
        return local, nodes, f"SLURM started {tasks} tasks on {nodes} node{'s' * (nodes != 1)}"
    return None


def asked_devices(d) -> int | None:
    """The device count a `trainer.devices` value names (a count, a list of ids, "0,1"); None for -1 or auto."""
    if OmegaConf.is_list(d) or isinstance(d, (list, tuple)):
        return len(d)
    if isinstance(d, str) and "," in d:
        return len([i for i in d.split(",") if i.strip()])
    if str(d).lstrip("-").isdigit() and int(d) >= 0:
        return int(d)
    return None


def layout(t: DictConfig) -> tuple[int, int]:
    """(devices per node, nodes) this run has; asked-for devices or nodes that are not here are one line."""
    asked, nodes = asked_devices(t.devices), int(t.num_nodes)
    found = launched()
    if found is not None:
        local, have_nodes, who = found
        check(nodes == have_nodes, f"trainer.num_nodes={nodes}, but {who}; pass trainer.num_nodes={have_nodes}")
        check(asked in (None, local), f"trainer.devices={t.devices}, but {who}; pass trainer.devices={local} (or -1)")
        return local, nodes
    check(nodes == 1, f"trainer.num_nodes={nodes} asks for {nodes} nodes, but no multi-node launcher (torchrun, "
                      f"SLURM's srun) started this process; drop trainer.num_nodes (gradient accumulation keeps the "
                      f"recipe's total batch on the devices here), or start the run under one")
    if on_gpu(t):
        visible = torch.cuda.device_count()
        check(asked is None or asked <= visible,
              f"trainer.devices={t.devices} asks for {asked} GPUs and {visible} {'is' if visible == 1 else 'are'} "
              f"visible here; pass trainer.devices=-1 (every GPU here: gradient accumulation keeps the recipe's total "
              f"batch)")
        return asked or visible, 1
    return asked or 1, 1


def world_size(t: DictConfig) -> int:
    devices, nodes = layout(t)
    return devices * nodes


def trainer_devices(t: DictConfig):
    """`devices` for Lightning: the config's list of device ids as it is, else the count this run has."""
    d = t.devices
    if OmegaConf.is_list(d) or (isinstance(d, str) and "," in d):
        return OmegaConf.to_container(d) if OmegaConf.is_list(d) else d
    return layout(t)[0]


def accumulation(t: DictConfig, s: DictConfig) -> int:
    """Micro-batches per optimizer step: what makes `<stage>.total_batch_size` of `batch_size` per device on this
    run's processes (trainer.accumulate_grad_batches when the stage states no total)."""
    total = s.get("total_batch_size")
    if total is None:
        return int(t.accumulate_grad_batches)
    per_step = int(s.batch_size) * world_size(t)
    name = s._key() if hasattr(s, "_key") and s._key() else "stage"
    check(int(t.accumulate_grad_batches) == 1,
          f"{name}.total_batch_size={total} sets the gradient accumulation; drop trainer.accumulate_grad_batches="
          f"{t.accumulate_grad_batches}")
    check(total % per_step == 0,
          f"{name}.total_batch_size={total} is not a whole number of steps of {name}.batch_size={s.batch_size} on "
          f"{world_size(t)} process{'es' * (world_size(t) != 1)} ({per_step} images); pass a {name}.batch_size that "
          f"divides {total} / {world_size(t)}")
    return total // per_step


def total_batch(t: DictConfig, s: DictConfig) -> int:
    return int(s.batch_size) * world_size(t) * accumulation(t, s)


def strategy_with_timeout(name: str, t: DictConfig):
    """A DDP-family strategy named by `trainer.strategy` (auto: DDP when there are several processes) whose ranks
    wait at most trainer.init_timeout seconds for each other; the name itself where there is nothing to wait for."""
    if world_size(t) == 1:
        return name
    from lightning.pytorch.strategies import StrategyRegistry

    entry = dict.get(StrategyRegistry, "ddp" if name == "auto" else name) if isinstance(name, str) else None  # no build
    if entry is None or "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return name
    return entry["strategy"](**{**entry["init_params"], "timeout": init_timeout(t)})


def init_timeout(t: DictConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(t.get("init_timeout", 300)))


@contextlib.contextmanager
def peers(t: DictConfig):
    """Run a fit whose ranks meet first: a rank whose peers do not all come within trainer.init_timeout stops in
    one line that names the world size and the address it waited on; once they have met, the collectives get
    Lightning's usual patience."""
    import torch.distributed as dist

    try:
        yield
    except dist.DistError as e:
        if dist.is_initialized():
            raise
        addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise FDLightError(f"rank {os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))} of a world of "
                           f"{world_size(t)} processes waited {init_timeout(t).total_seconds():g} s at {addr} and its "
                           f"peers did not all come; start every rank (each node of trainer.num_nodes="
                           f"{t.num_nodes}) with that address, or raise trainer.init_timeout") from None


def relax_collectives() -> None:
    """After the ranks have met: the collectives' timeout back to Lightning's default (init_timeout bounds joining)."""
    import torch.distributed as dist

    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if dist.is_initialized() and setter is not None:
        setter(COLLECTIVE_TIMEOUT)


class Joined(Callback):
    """Once the ranks have met (Lightning's setup comes after the process group), relax the collectives' timeout."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        relax_collectives()
