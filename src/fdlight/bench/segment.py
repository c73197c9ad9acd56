"""GPU check of the segmentation model: training images/s of ViT-B/16 (FD student shape) + UPerNet at 512 px in bf16.
`python -m fdlight.bench.segment [--compile] [--attention triton] [--profile N]`."""
from __future__ import annotations

import math
import time

import torch

from fdlight.bench.timing import profile_step
from fdlight.constants import IGNORE
from fdlight.errors import check
from fdlight.models.attention import set_attention
from fdlight.models.factory import create_model
from fdlight.models.pyramid import Backbone
from fdlight.models.upernet import UPerNet, segmentation_loss


def bench(steps: int = 20, batch: int = 16, size: int = 512, channels: int = 768, warmup: int = 5,
          compile_model: bool = False, device: str | None = None, attention: str = "sdpa",
          profile: int = 0) -> float | None:
    """Training images/s of ViT-B/16 (FD student shape, per-block bias, random weights) + UPerNet at `size`, bf16
    autocast, AdamW, on random tensors. Returns None (with a message) when there is no GPU."""
    if device is None and not torch.cuda.is_available():
        print("segment bench: no CUDA device here; run it on a GPU machine "
              "(python -m fdlight.bench.segment)")
        return None
    device = torch.device(device or "cuda")
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    vit = create_model("beit_base_patch16_224", pretrained=False, img_size=size, num_classes=0, use_abs_pos_emb=False,
                       use_rel_pos_bias=True, init_values=0.1, drop_path_rate=0.1)
    set_attention(vit, attention)
    model = UPerNet(Backbone(vit), num_classes=150, channels=channels, aux_channels=256).to(device)
    model = model.to(memory_format=torch.channels_last)
    step_fn = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=cuda)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 150, (batch, size, size), device=device)
    y[:, :8] = IGNORE
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = segmentation_loss(step_fn(x), y, 0.4)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    timings = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        if i >= warmup:
            timings.append(time.perf_counter() - t)
    ips = batch * len(timings) / sum(timings)
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    print(f"segment bench: ViT-B/16 + UPerNet({channels}) at {size}px, batch {batch}, bf16, {where}: "
          f"{ips:.1f} img/s ({1000 * sum(timings) / len(timings):.0f} ms/step{mem}, loss {float(loss.detach()):.3f}, "
          f"compile={compile_model}, attention={attention})")
    check(math.isfinite(float(loss.detach())), "the benchmark loss is not finite")
    if profile:
        profile_step(step, device.type, profile)
    return ips


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fdlight.bench.segment", description=bench.__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attention", choices=["sdpa", "triton"], default="sdpa")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="then print the N longest kernels")
    args = p.parse_args(argv)
    bench(args.steps, args.batch, args.size, args.channels, compile_model=args.compile, attention=args.attention,
          profile=args.profile)


if __name__ == "__main__":
    main()
