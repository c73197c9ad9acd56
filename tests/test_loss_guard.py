"""The non-finite loss guard without a host read per step: the fused update is skipped on the device, the run stops
at the next step or checkpoint, and no parameter ever holds a bad update."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY, compose
from fdlight.errors import FDLightError
from fdlight.modules.base import on_device_guard
from fdlight.stages.distill import STAGE

DIVERGING = [*TINY, "data.num_train=64", "distill.batch_size=16", "distill.epochs=20", "distill.base_lr=1e35",
             "distill.warmup_epochs=0", "distill.clip_grad=0"]


class Watch(Callback):
    """The student's parameters at the start of every step, and whether the guard ran on the device."""

    def __init__(self):
        self.before, self.on_device, self.module = {}, None, None

    def on_train_start(self, trainer, module):
        self.on_device, self.module = on_device_guard(trainer), module

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = {n: p.detach().clone() for n, p in module.student.named_parameters()}


@pytest.mark.parametrize("every", [1, 1000])
def test_a_non_finite_loss_leaves_the_weights_of_the_step_before_it(tmp_path, one_thread, every):
    watch = Watch()
    cfg = compose([*DIVERGING, f"distill.checkpoint_every_n_steps={every}"])
    with pytest.raises(FDLightError, match="non-finite FD loss") as err:
        STAGE.run(cfg, tmp_path / "run", callbacks=[watch])
    assert watch.on_device  # fused AdamW on this CPU: found_inf skips the update, the flag is read a step late
    bad = int(str(err.value).split("at step ")[1].split(";")[0])
    assert bad >= 1 and max(watch.before) <= bad + 1  # stopped at the latest one step after the bad loss
    after = dict(watch.module.student.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(torch.equal(after[n], p) for n, p in watch.before[bad].items())  # the bad step changed nothing
    if every == 1:
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == bad
        assert all(torch.equal(ckpt["state_dict"][f"student.{n}"], p) for n, p in watch.before[bad].items())
