"""Target whitening with state: PHI-S (docs/method.md §1.10) and the Hadamard matrices it rotates with.

PHI-S standardises a teacher's features isotropically: y = H U^T (x - mu) / alpha, with mu and the covariance
U diag(lambda) U^T estimated over the first N training batches, H a normalised Hadamard matrix (H H^T = I, every
entry +-1/sqrt(D)) and alpha^2 = mean(lambda). Every output dimension then has variance 1 and the map is a rotation
times one scalar, so it is inverted exactly: x = mu + alpha^2 * (y @ T) for T = H U^T / alpha.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn

from fdlight.errors import FDLightError


# --------------------------------------------------------------------------------------------------- Hadamard
ORDERS = "2^k or (q + 1) * 2^k for a prime q = 3 mod 4, e.g. 64, 96, 768, 1024, 1152, 1280"


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _paley_core(n: int) -> bool:
    """Whether Paley's first construction gives a Hadamard matrix of order n (n = q + 1, q prime, q = 3 mod 4)."""
    return n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, k) with n = m * 2^k, m = 1 or a Paley order, k as large as possible; None when no such split exists."""
    if n < 1:
        return None
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):  # the smallest core first: pure powers of two are Sylvester matrices
        m = n >> k
        if m == 1 or _paley_core(m):
            return m, k
    return None


def _paley(n: int) -> torch.Tensor:
    """Paley I: H = I + S with S = [[0, 1^T], [-1, Q]], Q[i, j] = Legendre symbol of (j - i) mod q."""
    q = n - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    idx = torch.arange(q)
    s[1:, 1:] = torch.tensor(chi, dtype=torch.float64)[(idx.view(1, -1) - idx.view(-1, 1)) % q]
    return torch.eye(n, dtype=torch.float64) + s


@lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """A normalised Hadamard matrix of order n (float64, H H^T = I, entries +-1/sqrt(n)): Sylvester doubling of
    [1] or of a Paley matrix. Orders such as 64, 96, 768, 1024, 1152 and 1280 are covered."""
    factors = hadamard_factors(n)
    if factors is None:
        raise FDLightError(f"no Hadamard matrix of order {n} is built here (orders {ORDERS})")
    m, k = factors
    h = _paley(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        h = torch.kron(two, h)
    return h / math.sqrt(n)


def check_hadamard_order(dim: int, who: str) -> None:
    """PHI-S needs a Hadamard matrix of the teacher's width: refuse other widths in one line."""
    if hadamard_factors(int(dim)) is None:
        raise FDLightError(f"{who}: whitening=phi_s rotates with a Hadamard matrix, and none of order {dim} is built "
                           f"here (orders {ORDERS}); use whitening fd_ln or none for this teacher")


# ------------------------------------------------------------------------------------------------------ PHI-S
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(*tensors: torch.Tensor) -> None:
    """Sum over every rank, so the moments are those of the whole global batch."""
    if _distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


def _broadcast(*tensors: torch.Tensor) -> None:
    """Rank 0's values everywhere: eigenvectors of (near-)equal eigenvalues are not unique, so ranks must not
    each pick their own."""
    if _distributed():
        for t in tensors:
            torch.distributed.broadcast(t, src=0)


class PhiS(nn.Module):
    """PHI-S of D-channel tokens. In train mode the first `batches` calls add their tokens to the running moments
    and re-estimate the transform (the current batch included); from then on it is frozen. The moments, the batch
    count and the transform are buffers, so a checkpoint holds them and a resumed run continues the estimate."""

    def __init__(self, dim: int, batches: int, eps: float = 1e-5):
        super().__init__()
        check_hadamard_order(dim, f"a {dim}-channel teacher")
        self.dim, self.batches, self.eps = int(dim), int(batches), float(eps)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("transform", torch.eye(dim))   # T = H U^T / alpha; identity until estimated
        self.register_buffer("scale", torch.ones(()))        # alpha
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("outer", torch.zeros(dim, dim, dtype=torch.float64))
        self._frozen: bool | None = None  # mirrors seen >= batches without a device sync per step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = None

    @property
    def estimating(self) -> bool:
        if self._frozen is None:
            self._frozen = int(self.seen) >= self.batches
        return self.training and not self._frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.estimating:
            self.observe(x)
        return self.apply_transform(x)

    def apply_transform(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 step
            return (x.float() - self.mean) @ self.transform.T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Teacher-space tokens from PHI-S tokens: T^-1 = alpha^2 T^T because T is a rotation over alpha."""
        with torch.autocast(y.device.type, enabled=False):
            return self.mean + self.scale.square() * (y.float() @ self.transform)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, self.dim).double()
        count = torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=flat.device)
        total, outer = flat.sum(0), flat.T @ flat
        _all_reduce(count, total, outer)
        self.count += count
        self.total += total
        self.outer += outer
        self.seen += 1
        self._frozen = int(self.seen) >= self.batches
        self.estimate()

    @torch.no_grad()
    def estimate(self) -> None:
        """mu, then the sample covariance's eigenvectors U and eigenvalues (clipped at 0), then T = H U^T / alpha.
        Fewer tokens than channels leave a null space whose eigenvectors (and so T) are arbitrary: estimate over
        many more tokens than channels."""
        n = self.count.clamp(min=2.0)
        mu = self.total / self.count.clamp(min=1.0)
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        alpha = evals.clamp(min=0).mean().clamp(min=self.eps).sqrt()
        h = hadamard(self.dim).to(evecs.device)
        self.mean.copy_(mu.float())
        self.transform.copy_((h @ evecs.T / alpha).float())
        self.scale.copy_(alpha.float())
        _broadcast(self.mean, self.transform, self.scale)
