"""GPU timing of the attention statistics: ViT-B/16 with random weights over 1,000 random images, as the diagnose stage
computes them (fp32, fused attention off, hooks on attn_drop, distances, head KL, averaged maps, diagonality).

    python -m fdlight.bench.attention [--images 1000] [--batch 100] [--model vit_base_patch16_224]

Prints the seconds; exits 0 with a note where no CUDA GPU is visible.
"""
from __future__ import annotations

import argparse
import time

import torch

from fdlight.diagnostics.attention import attention_statistics, summarize_layers
from fdlight.models.factory import create_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--model", default="vit_base_patch16_224")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.attention: skipped, no CUDA GPU is visible")
        return 0
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(args.model).to(device).eval()
    images = torch.randn(args.images, 3, *model.pretrained_cfg["input_size"][1:], device=device)
    attention_statistics(model, [images[: args.batch]])  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    layers = attention_statistics(model, images.split(args.batch))
    out = summarize_layers(layers)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"bench.attention: attention statistics of {args.model} over {args.images} images (batch {args.batch}) on "
          f"{torch.cuda.get_device_name()}: {seconds:.2f} s ({args.images / seconds:.0f} img/s); "
          f"{len(layers)} layers, mean distance {sum(out['distance_mean_px']) / len(layers):.1f} px, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
