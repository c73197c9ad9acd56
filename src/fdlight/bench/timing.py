"""What the benchmarks share: synchronised timing, the model FLOPs utilisation's peak, and a profile of where a
step's time goes."""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (vendor figures, TFLOP/s) for the MFU column; --peak-tflops overrides.
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


def timed(fn, steps: int, device: str, warmup: int = 0) -> float:
    """Mean seconds per call after `warmup` untimed calls, synchronised."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


KINDS = (("attention", ("fmha", "flash", "attention", "sdpa", "attn")),
         ("matmul", ("gemm", "nvjet", "cublas", "matmul", "mm", "linear", "addmm")),
         ("convolution", ("conv", "implicit")),
         ("fused (compiled)", ("triton", "cpp_fused")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile_step(step, device: str, top: int, steps: int = 3) -> list[tuple[str, float, int]]:
    """Print where one step's time goes: per-kind totals and the `top` kernels (GPU) or ops (CPU), in ms per step.
    Returns the (name, ms per step, calls per step) rows, longest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    rows = sorted(((e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps,
                    e.count // steps) for e in events), key=lambda r: -r[1])
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    print(f"fdlight.bench profile: {sum(kinds.values()):.1f} ms per step on {'GPU kernels' if cuda else 'CPU ops'}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for name, ms, calls in rows[:top]:
        print(f"{ms:9.2f} ms  x{calls:<4d} {name[:110]}")
    return rows
