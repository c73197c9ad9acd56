"""Attention statistics (docs/method.md §4.1-4.3), read from the post-softmax probabilities of timm attention layers.

For every attention layer and head, over a set of images:
- average attention distance in pixels: (1/P) sum_i sum_j A_ij |p_i - p_j| over the P patch tokens (prefix rows and
  columns dropped, rows not renormalised), p = token centre in pixels; Swin/SwinV2 use in-window coordinates;
- head diversity: KL(h || g) between the attention distributions of heads h != g of a layer (patch-token queries, every
  key, eps 1e-8), averaged over queries and images; the layer's value is the mean over ordered pairs;
- the attention map (patch tokens, raster order) averaged over images (and over every window for Swin, the shifted
  blocks' masked boundary windows included, whose masks show as blocks);
- diagonality of that map: a head that attends by relative position puts its mass on a few query-key offsets, a head
  that attends to fixed positions puts it on a few key columns. With the rows renormalised over patch keys,
  rel = mass of the k most used offsets, col = mass of the k most used columns (both as a share of all queries'
  mass), diagonality = rel / (rel + col): ~1 for a banded (diagonal) map, ~0.5 for uniform attention, ~k/P for
  a map of vertical columns.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from fdlight.errors import FDLightError

KL_EPS = 1e-8


@dataclass(frozen=True)
class Geometry:
    """Where the tokens of one attention map sit: a grid of patch tokens after `prefix` other tokens."""
    prefix: int             # CLS/register tokens before the grid; dropped from distances and maps
    grid: tuple[int, int]   # the token grid of one map: the whole image (ViT) or one window (Swin)
    stride: float           # pixels between neighbouring tokens
    windowed: bool = False

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def patch_coords(grid: tuple[int, int], stride: float) -> torch.Tensor:
    """(P, 2) token centres in pixels, raster order (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * stride


def _geometry(model: nn.Module, attn_name: str, attn: nn.Module) -> Geometry | None:
    block = model.get_submodule(attn_name.rpartition(".")[0])
    pe = getattr(model, "patch_embed", None)
    window, res = getattr(attn, "window_size", None), getattr(block, "input_resolution", None)
    if window is not None and res is not None:  # Swin/SwinV2: one window's tokens, at the stride of the block's stage
        img = getattr(pe, "img_size", None)
        if img is None:
            return None
        window = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
        return Geometry(0, (int(window[0]), int(window[1])), float(img[0]) / float(res[0]), True)
    grid = getattr(pe, "grid_size", None)
    if grid is None:
        return None
    patch = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size,)
    return Geometry(int(getattr(model, "num_prefix_tokens", 0)), (int(grid[0]), int(grid[1])), float(patch[0]))


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module, Geometry]]:
    """(attention module name, its attn_drop module, token geometry) for every timm attention layer, in order."""
    layers = []
    for name, _ in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf != "attn_drop" or not parent:
            continue
        geometry = _geometry(model, parent, model.get_submodule(parent))
        if geometry is not None:
            layers.append((parent, model.get_submodule(name), geometry))
    return layers


def check_has_attention(model: nn.Module, what: str) -> None:
    if not attention_layers(model):
        raise FDLightError(
            f"{what} ({type(model).__name__}) has no attention layers whose probabilities fdlight can read; diagnose "
            f"a timm ViT, DeiT, Beit, Eva, Swin or SwinV2 (CLIP through timm: teacher=clip_vitb)")


@contextmanager
def unfused_attention(model: nn.Module):
    """Compute attention explicitly (softmax, then attn_drop) so hooks see the probabilities; restore afterwards."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield model
    finally:
        for m, value in saved:
            m.fused_attn = value


# --------------------------------------------------------------------------------------------- per-map metrics
def pairwise_distance(geometry: Geometry) -> torch.Tensor:
    coords = patch_coords(geometry.grid, geometry.stride)
    return torch.cdist(coords, coords)


def attention_distance(attn: torch.Tensor, geometry: Geometry, dist: torch.Tensor | None = None) -> torch.Tensor:
    """(..., N, N) attention -> (...) average distance in pixels over patch tokens (no renormalisation)."""
    p = geometry.prefix
    dist = (pairwise_distance(geometry) if dist is None else dist).to(attn.device, attn.dtype)
    return (attn[..., p:, p:] * dist).sum(-1).mean(-1)


def head_kl(attn: torch.Tensor, prefix: int = 0, eps: float = KL_EPS) -> torch.Tensor:
    """(B, H, N, N) attention -> (B, H, H): KL(head h || head g), averaged over the patch-token queries."""
    rows = attn[:, :, prefix:, :].float()
    logs = (rows + eps).log()
    own = (rows * logs).sum((-1, -2))
    cross = torch.einsum("bhqk,bgqk->bhg", rows, logs)
    return (own.unsqueeze(-1) - cross) / rows.shape[2]


def layer_diversity(kl: torch.Tensor) -> float:
    """Mean KL over ordered pairs of different heads (0 for a single head)."""
    h = kl.shape[-1]
    if h < 2:
        return 0.0
    off = ~torch.eye(h, dtype=torch.bool, device=kl.device)
    return float(kl[off].mean())


def diagonality(maps: torch.Tensor, grid: tuple[int, int], k: int = 3) -> torch.Tensor:
    """(H, P, P) patch-token maps -> (H,) rel / (rel + col), see the module docstring."""
    h, p, _ = maps.shape
    gh, gw = grid
    rows = maps.double() / maps.double().sum(-1, keepdim=True).clamp_min(1e-12)
    r = torch.arange(p, device=maps.device) // gw
    c = torch.arange(p, device=maps.device) % gw
    offset = (r[None, :] - r[:, None] + gh - 1) * (2 * gw - 1) + (c[None, :] - c[:, None] + gw - 1)
    per_offset = torch.zeros(h, (2 * gh - 1) * (2 * gw - 1), dtype=rows.dtype, device=maps.device)
    per_offset.scatter_add_(1, offset.flatten().expand(h, -1), rows.reshape(h, -1))
    per_offset /= p
    per_column = rows.mean(1)
    k = max(1, min(k, p))
    rel = per_offset.topk(k, dim=-1).values.sum(-1)
    col = per_column.topk(k, dim=-1).values.sum(-1)
    return (rel / (rel + col)).float()


# ------------------------------------------------------------------------------------------------ accumulation
@dataclass
class LayerAttention:
    """Image-averaged statistics of one attention layer."""
    name: str
    geometry: Geometry
    distance: torch.Tensor   # (H,) pixels
    kl: torch.Tensor         # (H, H) KL(h || g)
    map: torch.Tensor        # (H, P, P) patch-token attention, averaged over images and windows
    samples: int             # images x windows averaged over

    @property
    def heads(self) -> int:
        return int(self.distance.shape[0])

    @property
    def diversity(self) -> float:
        return layer_diversity(self.kl)

    @property
    def distance_std(self) -> float:
        return float(self.distance.std(unbiased=False)) if self.heads > 1 else 0.0


class _Accumulator:
    def __init__(self, name: str, geometry: Geometry):
        self.name, self.geometry = name, geometry
        self.count, self.distance, self.kl, self.map = 0, None, None, None
        self.error: str | None = None
        self.pairwise = pairwise_distance(geometry)

    def update(self, attn: torch.Tensor) -> None:
        attn = attn.detach().float()
        n = self.geometry.prefix + self.geometry.num_patches
        if attn.ndim != 4 or attn.shape[-1] != n or attn.shape[-2] != n:
            self.error = f"{self.name} gave attention of shape {tuple(attn.shape)}, expected (B, H, {n}, {n})"
            return
        p = self.geometry.prefix
        dist = attention_distance(attn, self.geometry, self.pairwise).sum(0)
        kl = head_kl(attn, p).sum(0)
        maps = attn[:, :, p:, p:].sum(0)
        if self.distance is None:
            self.distance, self.kl, self.map = dist, kl, maps
        else:
            self.distance += dist
            self.kl += kl
            self.map += maps
        self.count += attn.shape[0]

    def result(self) -> LayerAttention:
        c = float(self.count)
        return LayerAttention(self.name, self.geometry, (self.distance / c).cpu(), (self.kl / c).cpu(),
                              (self.map / c).cpu(), self.count)


@torch.no_grad()
def attention_statistics(model: nn.Module, batches, device: torch.device | str | None = None,
                         what: str = "the model") -> list[LayerAttention]:
    """Run `batches` (image tensors already in the model's normalisation) through `model` with fused attention off and
    hooks on every attn_drop; return per-layer statistics. The model's fused-attention flags are restored on exit."""
    layers = attention_layers(model)
    if not layers:
        check_has_attention(model, what)
    accs = [_Accumulator(name, geometry) for name, _, geometry in layers]
    handles = []
    was_training = model.training
    with unfused_attention(model):
        try:
            for acc, (_, drop, _) in zip(accs, layers):
                handles.append(drop.register_forward_hook(lambda mod, args, out, acc=acc: acc.update(args[0])))
            model.eval()
            for x in batches:
                model(x.to(device) if device is not None else x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    errors = [a.error for a in accs if a.error]
    if errors:
        raise FDLightError(f"cannot place the tokens of {what}: {errors[0]}; diagnose it at its native image size")
    out = [a.result() for a in accs if a.count]
    if not out:
        raise FDLightError(f"{what}: no attention probabilities were captured; pass a non-empty evaluation subset")
    return out


def summarize_layers(layers: list[LayerAttention], k: int = 3) -> dict:
    """JSON-ready numbers of every layer (the maps themselves are stored apart)."""
    distance = [[round(float(v), 6) for v in layer.distance] for layer in layers]
    stds = [layer.distance_std for layer in layers]
    diag = [diagonality(layer.map, layer.geometry.grid, k) for layer in layers]
    return {
        "layers": [layer.name for layer in layers],
        "heads": [layer.heads for layer in layers],
        "stride_px": [layer.geometry.stride for layer in layers],
        "grid": [list(layer.geometry.grid) for layer in layers],
        "prefix_tokens": [layer.geometry.prefix for layer in layers],
        "windowed": any(layer.geometry.windowed for layer in layers),
        "samples": [layer.samples for layer in layers],  # images x windows per layer
        "distance_px": distance,
        "distance_mean_px": [float(layer.distance.mean()) for layer in layers],
        "distance_std_px": stds,
        "kl_diversity": [layer.diversity for layer in layers],
        "kl_pairs": [[[round(float(v), 6) for v in row] for row in layer.kl] for layer in layers],
        "diagonality_k": k,
        "diagonality": [[round(float(v), 6) for v in d] for d in diag],
        "diagonality_mean": [float(d.mean()) for d in diag],
        "attn_distance_spread": float(sum(stds) / len(stds)),
    }
