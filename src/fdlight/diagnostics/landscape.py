"""Loss landscape (docs/method.md §4.4; Li et al., NeurIPS 2018) and the top Hessian eigenvalue.

The centre is the trained model. Two directions are drawn from a seeded Gaussian with the parameters' shapes and
filter-normalised: each slice along dim 0 of a tensor with ndim >= 2 (a Linear output row, a conv output channel, a
row of a bias table) gets the norm of the matching weight slice; tensors with ndim <= 1 (biases, norms, layer scale)
get a zero direction. The surface is L(w + a*d1 + b*d2) on a grid over fixed batches, in eval mode, without gradients.
Sharpness = mean loss increase at the two ends a = +-span of the 1-D curve along d1. An objective with parts (the FD
loss of a student distilled from several teachers) also gets each part's surface, curve and sharpness, from the same
evaluations along the same directions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fdlight.diagnostics.attention import unfused_attention
from fdlight.errors import check
from fdlight.modules.distill import fd_loss


# --------------------------------------------------------------------------------------------------- objectives
class Objective:
    """A loss over fixed (input, target) batches as a function of the parameters of `module`."""
    kind = "loss"

    def __init__(self, module: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        check(len(batches) > 0, "the loss landscape needs at least one evaluation image; raise diagnose.num_images")
        self.module = module.eval()
        self.batches = batches

    @property
    def num_images(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def batch_loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_loss_parts(self, x: torch.Tensor, target) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its named parts ({} for an objective without parts)."""
        return self.batch_loss(x, target), {}

    def batch_correct(self, x: torch.Tensor, target: torch.Tensor) -> int | None:
        return None


class _Logits(Objective):
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_loss(self, x, target):
        return F.cross_entropy(self.logits(x).float(), target)

    def batch_correct(self, x, target):
        return int((self.logits(x).argmax(-1) == target).sum())


class ClassificationLoss(_Logits):
    """Cross entropy of a model with a classification head (fine-tuned models)."""
    kind = "ce"

    def logits(self, x):
        return self.module(x)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logits features of a timm model (token mean where its pooling was pruned away)."""
    out = model.forward_head(model.forward_features(x), pre_logits=True)
    return out.flatten(1, -2).mean(1) if out.ndim > 2 else out


class ProbeLoss(_Logits):
    """Cross entropy of a headless backbone through a linear probe fitted on the same images; both are perturbed."""
    kind = "probe"

    def __init__(self, backbone: nn.Module, batches, num_classes: int, l2: float = 1e-3, iters: int = 100):
        probe = fit_probe(backbone, batches, num_classes, l2, iters)
        super().__init__(nn.ModuleDict({"backbone": backbone, "probe": probe}), batches)

    def logits(self, x):
        return self.module["probe"](pooled_features(self.module["backbone"], x))


class DistillationLoss(Objective):
    """The FD loss of a distilled student + projector against the whitened tokens of its (unperturbed) teacher; with
    several teachers the weighted total, each teacher's own loss a part."""
    kind = "fd"

    def __init__(self, fd_module: nn.Module, images: list[torch.Tensor]):
        with torch.no_grad():
            batches = [(x, fd_module.target(x) if fd_module.single else fd_module.targets(x)) for x in images]
        super().__init__(fd_module, batches)

    def batch_loss(self, x, target):
        return self.batch_loss_parts(x, target)[0]

    def batch_loss_parts(self, x, target):
        m = self.module
        if m.single:
            return fd_loss(m.prediction(x), target, m.loss_beta), {}
        preds = m.predictions(x)
        parts = {n: fd_loss(preds[n], target[n], m.loss_beta) for n in m.names}
        return m.weighted(parts), parts


@torch.no_grad()
def _probe_features(backbone, batches):
    backbone.eval()
    return torch.cat([pooled_features(backbone, x).float() for x, _ in batches]), torch.cat([y for _, y in batches])


def fit_probe(backbone: nn.Module, batches, num_classes: int, l2: float = 1e-3, iters: int = 100) -> nn.Linear:
    """Multinomial logistic regression on frozen pooled features (L-BFGS from zero, deterministic)."""
    feats, labels = _probe_features(backbone, batches)
    probe = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(feats), labels) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.requires_grad_(False)


@torch.no_grad()
def evaluate(objective: Objective) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) over every batch, weighted by batch size."""
    loss, acc, _ = evaluate_parts(objective)
    return loss, acc


@torch.no_grad()
def evaluate_parts(objective: Objective) -> tuple[float, float | None, dict[str, float]]:
    """evaluate() and the mean of each named part of the loss."""
    total, correct, n, parts = 0.0, 0, 0, {}
    for x, t in objective.batches:
        loss, batch_parts = objective.batch_loss_parts(x, t)
        total += float(loss) * len(x)
        for name, value in batch_parts.items():
            parts[name] = parts.get(name, 0.0) + float(value) * len(x)
        c = objective.batch_correct(x, t)
        correct = None if c is None else correct + c
        n += len(x)
    return total / n, (None if correct is None else correct / n), {k: v / n for k, v in parts.items()}


# --------------------------------------------------------------------------------------------------- directions
def filter_normalized_direction(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A Gaussian direction with each filter (slice along dim 0) scaled to the norm of the weight's filter."""
    out = {}
    for name, w in params.items():
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device, w.dtype)
        if w.ndim <= 1:
            out[name] = torch.zeros_like(w)
            continue
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
        out[name] = d * (w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.ndim - 1)))
    return out


def grid_coordinates(steps: int, span: float) -> list[float]:
    """`steps` evenly spaced values on [-span, span]; the middle one is exactly 0 when steps is odd."""
    check(isinstance(steps, int) and steps > 0, f"diagnose.landscape.steps={steps} is not a positive grid size; "
                                                f"pass an odd count such as diagnose.landscape.steps=11")
    check(isinstance(span, (int, float)) and math.isfinite(span) and span > 0,
          f"diagnose.landscape.span={span} is not a positive size; pass e.g. diagnose.landscape.span=1.0")
    if steps == 1:
        return [0.0]
    return [span * (2.0 * i / (steps - 1) - 1.0) for i in range(steps)]


@dataclass
class Landscape:
    kind: str
    coords: list[float]                  # alphas (x) = betas (y)
    surface: list[list[float]]           # surface[j][i] = L(alpha_i, beta_j)
    curve: list[float]                   # L(alpha_i, 0)
    origin: float
    accuracy_origin: float | None = None
    curve_accuracy: list[float] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sharpness(self) -> float:
        return 0.5 * (self.curve[0] + self.curve[-1]) - self.origin

    def to_json(self) -> dict:
        flat = [v for row in self.surface for v in row]
        return {"loss": self.kind, "alphas": self.coords, "betas": self.coords, "surface": self.surface,
                "curve": self.curve, "curve_accuracy": self.curve_accuracy, "origin": self.origin,
                "accuracy_origin": self.accuracy_origin, "sharpness": self.sharpness,
                "sharpness_rel": self.sharpness / self.origin if self.origin > 0 else None,
                "mean_increase_2d": sum(flat) / len(flat) - self.origin if flat else None, **self.extra}


def loss_landscape(objective: Objective, steps: int, span: float, seed: int = 0, two_d: bool = True) -> Landscape:
    """1-D curve and 2-D surface of the objective around its current parameters (restored afterwards)."""
    coords = grid_coordinates(steps, span)
    params = dict(objective.module.named_parameters())
    origin = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(int(seed))
    d1 = filter_normalized_direction(origin, gen)
    d2 = filter_normalized_direction(origin, gen)

    @torch.no_grad()
    def move(a: float, b: float) -> None:
        for n, p in params.items():
            p.copy_(origin[n] + a * d1[n] + b * d2[n])

    try:
        base, base_acc, base_parts = evaluate_parts(objective)
        surface, curve, curve_acc = [], None, None
        if two_d:
            for b in coords:
                row = []
                for a in coords:
                    move(a, b)
                    row.append(evaluate_parts(objective))
                surface.append(row)
        if two_d and steps % 2 == 1:  # the beta = 0 row is the 1-D curve
            curve_pts = surface[steps // 2]
        else:
            curve_pts = []
            for a in coords:
                move(a, 0.0)
                curve_pts.append(evaluate_parts(objective))
        curve = [v for v, _, _ in curve_pts]
        if base_acc is not None:
            curve_acc = [acc for _, acc, _ in curve_pts]
    finally:
        move(0.0, 0.0)
    extra = {"seed": int(seed), "steps": steps, "span": float(span), "num_images": objective.num_images}
    if base_parts:
        extra["parts"] = {name: part_landscape(name, coords, surface, curve_pts, base_parts[name])
                          for name in base_parts}
    return Landscape(objective.kind, coords, [[v for v, _, _ in row] for row in surface], curve, base, base_acc,
                     curve_acc, extra)


def part_landscape(name: str, coords: list[float], surface: list, curve_pts: list, origin: float) -> dict:
    """One part's surface, curve and sharpness, read from the evaluations of the whole objective."""
    part = Landscape("part", coords, [[p[name] for _, _, p in row] for row in surface],
                     [p[name] for _, _, p in curve_pts], origin).to_json()
    return {k: part[k] for k in ("surface", "curve", "origin", "sharpness", "sharpness_rel", "mean_increase_2d")}


# ------------------------------------------------------------------------------------------------------ Hessian
@dataclass
class Eigen:
    value: float
    vector: list[torch.Tensor]
    iterations: int
    residual: float     # |Hv - value * v| / |value|: how well (value, v) is an eigenpair


def hessian_vector_product(objective: Objective, params: list[torch.Tensor], v: list[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """H v of the mean loss over every batch (double backward, batch by batch). Parameters the loss does not use (a
    classifier head under the probe loss) have zero rows."""
    out = [torch.zeros_like(p) for p in params]
    n = objective.num_images
    for x, t in objective.batches:
        loss = objective.batch_loss(x, t) * (len(x) / n)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = sum((g * u).sum() for g, u in zip(grads, v) if g is not None)
        for o, h in zip(out, torch.autograd.grad(dot, params, allow_unused=True)):
            if h is not None:
                o += h
    return out


def _norm(vs: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(v.double().square().sum() for v in vs))


def top_hessian_eigenvalue(objective: Objective, iters: int = 30, tol: float = 1e-4, seed: int = 0) -> Eigen:
    """Dominant eigenvalue of the Hessian over the parameters with ndim > 1 (as Li et al.), by power iteration."""
    named = [(n, p) for n, p in objective.module.named_parameters() if p.ndim > 1]
    params = [p for _, p in named]
    flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    scale = _norm(v)
    v = [u / scale for u in v]
    value, it = 0.0, 0
    try:
        for p in params:
            p.requires_grad_(True)
        with unfused_attention(objective.module), torch.enable_grad():  # SDPA kernels lack double backward
            for it in range(1, iters + 1):
                hv = hessian_vector_product(objective, params, v)
                new = float(sum((h.double() * u.double()).sum() for h, u in zip(hv, v)))
                scale = _norm(hv)
                v = [h / scale for h in hv]
                done = it > 1 and abs(new - value) <= tol * abs(value)
                value = new
                if done:
                    break
            hv = hessian_vector_product(objective, params, v)
            value = float(sum((h.double() * u.double()).sum() for h, u in zip(hv, v)))
            residual = float(_norm([h - value * u for h, u in zip(hv, v)])) / max(abs(value), 1e-12)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return Eigen(value, [u.detach() for u in v], it, residual)
