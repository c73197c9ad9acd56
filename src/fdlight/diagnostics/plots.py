"""Figures of the diagnostics, one checkpoint per panel (shared axes) or one line per checkpoint. Each function takes
the JSON-ready results (`diagnostics.json` entries) and returns a matplotlib Figure (no pyplot state, so the stage
writes PNGs headless and a notebook displays them inline)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _layer_ticks(ax, depth: int) -> None:
    step = max(1, int(np.ceil(depth / 12)))
    ax.set_xticks(range(1, depth + 1, step))
    ax.set_xlim(0.5, depth + 0.5)


def distance_figure(results: dict[str, dict]) -> Figure:
    """Average attention distance vs layer, one dot per head; checkpoints side by side on the same axes."""
    n = len(results)
    fig = Figure(figsize=(max(4.5, 3.6 * n), 3.6), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    depth = max(len(r["attention"]["layers"]) for r in results.values())
    for i, (ax, (name, r)) in enumerate(zip(axes, results.items())):
        a = r["attention"]
        for layer, dists in enumerate(a["distance_px"], start=1):
            ax.scatter([layer] * len(dists), dists, s=16, alpha=0.75, color=_color(i), edgecolors="none")
        ax.plot(range(1, len(a["layers"]) + 1), a["distance_mean_px"], color="black", lw=0.8, alpha=0.5,
                label="mean over heads")
        where = ", in-window" if a["windowed"] else ""
        ax.set_title(f"{name}\nspread {a['attn_distance_spread']:.3g} px (std over heads{where})", fontsize=9)
        ax.set_xlabel("layer")
        _layer_ticks(ax, depth)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("avg. attention distance (px)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Attention distance per head (one dot per head)", fontsize=10)
    return fig


def diversity_figure(results: dict[str, dict]) -> Figure:
    """Per layer: KL diversity between heads, std of the heads' distances, diagonality; one line per checkpoint."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("kl_diversity", "head diversity: mean KL(h || g)"),
              ("distance_std_px", "std of head distances (px)"),
              ("diagonality_mean", "diagonality (mean over heads)"))
    depth = max(len(r["attention"]["layers"]) for r in results.values())
    for ax, (key, label) in zip(axes, panels):
        for i, (name, r) in enumerate(results.items()):
            values = r["attention"][key]
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=4, color=_color(i), label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        _layer_ticks(ax, depth)
        ax.grid(alpha=0.3)
    axes[2].axhline(0.5, color="gray", lw=0.8, ls="--", label="0.5: uniform attention")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("1: diagonal (relative position), ~0: vertical columns", fontsize=8)
    axes[0].legend(fontsize=8)
    axes[2].legend(handles=axes[2].get_lines()[-1:], fontsize=8, loc="lower right")
    fig.suptitle("Head diversity per layer", fontsize=10)
    return fig


def pick_layers(depth: int, max_layers: int) -> list[int]:
    if depth <= max_layers:
        return list(range(depth))
    return sorted({int(round(v)) for v in np.linspace(0, depth - 1, max_layers)})


def maps_figure(name: str, result: dict, maps: dict, max_layers: int = 6, max_heads: int = 6) -> Figure:
    """Image-averaged patch-token attention maps (rows: queries, columns: keys, raster order), selected layers x
    first heads; each map stretched from its own minimum to its maximum, its diagonality in the title."""
    a = result["attention"]
    rows = pick_layers(len(a["layers"]), max_layers)
    cols = min(max_heads, max(a["heads"][r] for r in rows))
    fig = Figure(figsize=(1.7 * cols + 0.6, 1.8 * len(rows) + 0.7), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for ri, layer in enumerate(rows):
        m = np.asarray(maps[a["layers"][layer]], dtype=np.float32)
        for h in range(cols):
            ax = axes[ri, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= m.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(m[h], cmap="viridis", vmin=float(m[h].min()), vmax=float(m[h].max()), interpolation="nearest")
            ax.set_title(f"L{layer + 1} h{h + 1}  diag {a['diagonality'][layer][h]:.2f}", fontsize=7)
            if h == 0:
                ax.set_ylabel("query", fontsize=7)
            if ri == len(rows) - 1:
                ax.set_xlabel("key", fontsize=7)
    fig.suptitle(f"{name}: image-averaged attention over patch tokens\n(each map min-max stretched)", fontsize=9)
    return fig


def _curves(ax, items) -> None:
    """1-D loss increase along direction 1 of each (color index, name, landscape)."""
    ranges, lowest = [], 0.0
    for i, name, ls in items:
        increase = np.asarray(ls["curve"]) - ls["origin"]
        ranges.append(float(np.abs(increase).max()))
        lowest = min(lowest, float(increase.min()))
        ax.plot(ls["alphas"], increase, marker="o", ms=3, color=_color(i), label=f"{name} ({ls['loss']})")
    ax.axhline(0, color="gray", lw=0.8)
    small = min((r for r in ranges if r > 0), default=0.0)
    if small and max(ranges) / small > 30:  # curves of very different heights: keep the flat ones visible
        ax.set_yscale("symlog", linthresh=small / 5)
        ax.set_ylim(bottom=min(-small / 5, 1.5 * lowest))
        ax.set_ylabel("loss increase L(alpha) - L(0), symlog")
    ax.set_xlabel("alpha (filter-normalised direction 1)")
    if ax.get_yscale() == "linear":
        ax.set_ylabel("loss increase L(alpha) - L(0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def landscape_figure(results: dict[str, dict]) -> Figure | None:
    """Top: 2-D contour per checkpoint (same alpha/beta axes). Bottom: 1-D loss increase of every checkpoint, one
    panel per loss (a teacher's probe loss and a student's FD loss are not on one scale)."""
    items = [(name, r["landscape"]) for name, r in results.items() if r.get("landscape")]
    if not items:
        return None
    n = len(items)
    fig = Figure(figsize=(max(6.0, 4.0 * n), 7.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1)  # each row laid out on its own: the curves' panels need not match the maps'
    for ax, (name, ls) in zip(top.subplots(1, n, squeeze=False)[0], items):
        if ls["surface"]:
            z = np.asarray(ls["surface"], dtype=np.float64)
            alphas, betas = np.asarray(ls["alphas"]), np.asarray(ls["betas"])
            if z.shape[0] > 1 and z.shape[1] > 1:
                filled = ax.contourf(alphas, betas, z, levels=14, cmap="viridis")
                ax.contour(alphas, betas, z, levels=filled.levels, colors="black", linewidths=0.3)
                top.colorbar(filled, ax=ax, shrink=0.85, label=f"{ls['loss']} loss")
            ax.plot([0], [0], marker="+", color="red", ms=10, mew=2)
        else:
            ax.text(0.5, 0.5, "2-D surface off", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{name}\n{ls['loss']} loss: L(0)={ls['origin']:.3g}, sharpness {ls['sharpness']:.3g}",
                     fontsize=9)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
        ax.set_aspect("equal")
    kinds = list(dict.fromkeys(ls["loss"] for _, ls in items))  # unlike losses never share an axis
    for ax, kind in zip(bottom.subplots(1, len(kinds), squeeze=False)[0], kinds):
        _curves(ax, [(i, name, ls) for i, (name, ls) in enumerate(items) if ls["loss"] == kind])
        if len(kinds) > 1:
            ax.set_title(f"{kind} loss", fontsize=9)
    span = max(max(ls["alphas"]) for _, ls in items)
    fig.suptitle(f"Loss landscape along filter-normalised random directions (sharpness: mean loss rise at "
                 f"alpha = ±{span:g})", fontsize=10)
    return fig


def loss_curves_figure(curves: dict[str, list[tuple[int, float]]], keys=None) -> Figure:
    """Logged training curves (default: every column with 'loss' in its name) against the step."""
    keys = [k for k in curves if "loss" in k] if keys is None else [k for k in keys if k in curves]
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    for i, key in enumerate(keys):
        steps, values = zip(*curves[key])
        ax.plot(steps, values, marker=".", color=_color(i), label=key)
    if not keys:
        ax.text(0.5, 0.5, "no CSV loss logs in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    return fig
