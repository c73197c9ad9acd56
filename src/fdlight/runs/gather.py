"""The trained weights of a fitted module as one plain state dict, gathered from FSDP shards when the run is sharded."""
from __future__ import annotations

import lightning as L
import torch

from fdlight.optim import clean_name


def full_state_dict(root: torch.nn.Module, prefix: str, sharded: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights under `prefix` of a (possibly FSDP-wrapped) module, prefix stripped. Under FSDP this is
    collective: call it on every rank; rank 0 gets the full tensors (on the CPU), the others an empty dict."""
    if sharded:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            state = root.state_dict()
    else:
        state = root.state_dict()
    return {clean_name(k)[len(prefix):]: v for k, v in state.items() if clean_name(k).startswith(prefix)}


def trained_state_dict(trainer: L.Trainer, module: L.LightningModule, prefix: str) -> dict[str, torch.Tensor]:
    """full_state_dict of a fitted LightningModule, gathered through the strategy's wrapped model under FSDP."""
    from lightning.pytorch.strategies import FSDPStrategy

    sharded = isinstance(trainer.strategy, FSDPStrategy)
    return full_state_dict(trainer.strategy.model if sharded else module, prefix, sharded)
