"""The arithmetic of combining adapters, on plain tensors (no files, no models): the combination types of
peft's `add_weighted_adapter`, with the same math and the same draw order, so that for the same inputs and
seed the results are the same (tested against peft in tests/test_combine.py).

Two families:

- **factor-wise** (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): the A matrices are
  combined among themselves and the B matrices among themselves, adapter i weighted by sqrt(|w_i| s_i) on
  both sides with the sign of w_i on A (s_i its scaling). B' A' = sum_i w_i s_i B_i A_i + cross terms
  sqrt(|w_i s_i w_j s_j|) sign(w_j) B_i A_j: a cheap approximation that needs equal ranks. With mixed signs
  the cross terms of (i, j) and (j, i) must have opposite signs (their product is w_i s_i w_j s_j < 0), so
  no placement of the sign is symmetric; we keep peft's.
- **full-delta** (`cat`, exact and low-rank; the `*_svd` types): each adapter's update delta_i = s_i B_i A_i
  (or any method's full per-layer update) is combined, then the `*_svd` types factor the result again with a
  truncated SVD of rank k.

Sparsifying (`density`): `magnitude_prune`/`ties` keep the largest |values| of each task tensor; DARE
(`dare_*`) keeps each value with probability `density` and divides the kept ones by it, drawing from the
generator given (peft draws from torch's global RNG, in this order: layers in model order, then adapters).

TIES elects a sign per entry. peft elects it from the unweighted task tensors, so an adapter given a negative
weight (a task to subtract) votes with the sign it is *not* applied with, and the merge keeps exactly its
conflicting entries; one of weight 0 votes too, and counts among the entries averaged. We elect from
sign(w_i) * tensor_i: identical for positive weights, right for negative ones, and weight 0 is no vote.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from peftkit.errors import PeftkitWarning

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")
ELECTS_SIGN = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
DRAWS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
"""The methods that prune at random (DARE), from the combination's seed."""

MajoritySign = Literal["total", "frequency"]


def _least_density(numel: int) -> str:
    """The least density, written to 3 significant digits, that keeps a value of `numel`: 1 / numel rounded up (rounded
    to nearest, 1 / 32768 was 3.05e-05, which keeps none)."""
    exact, step = 1 / numel, 10.0 ** (math.floor(math.log10(1 / numel)) - 2)
    shown = f"{exact:.3g}"
    while int(float(shown) * numel) == 0:
        exact += step
        shown = f"{exact:.3g}"
    return shown


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest |values| set to zero (peft's top-k); none kept (a
    density below 1 / numel) is said, as peft does not: the combined update of that tensor is then zero."""
    if (k := int(density * tensor.numel())) == 0 and tensor.numel():
        warnings.warn(PeftkitWarning(
            f"--density {density:g} keeps no value of a tensor of {tensor.numel()} ({tuple(tensor.shape)}: "
            f"int({density:g} x {tensor.numel()}) = 0), so its part of the combined adapter is zero; raise --density "
            f"to at least {_least_density(tensor.numel())}."), stacklevel=2)
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each value kept with probability `density` and divided by it (the expectation is unchanged)."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _sparsified(kind: str, tensors: list[torch.Tensor], density: float | None,
                generator: torch.Generator | None) -> list[torch.Tensor]:
    """The task tensors as `kind` sparsifies them before combining; density 1 keeps everything (as peft)."""
    if kind.removesuffix("_svd") in ("linear", "svd", "cat") or density is None or density >= 1:
        return tensors
    if kind.startswith("dare"):
        return [_prune_random(t, density, generator) for t in tensors]
    return [_prune_magnitude(t, density) for t in tensors]


def _elected(stacked: torch.Tensor, weights: torch.Tensor, method: MajoritySign) -> torch.Tensor:
    """TIES: where each task tensor has the elected sign, from the tensors signed as they are applied.

    `total`: the sign of the summed (signed) values; `frequency`: the sign most tensors have (ties count +). A task of
    weight 0 applies nothing and has no vote, nor a place among those averaged (peft's, signed +, has both)."""
    signs = torch.sign(weights).view(-1, *[1] * (stacked.dim() - 1))
    signed = stacked * signs
    votes = signed.sum(dim=0) if method == "total" else signed.sign().sum(dim=0)
    return signed.sign() == torch.where(votes >= 0, 1, -1)


def combine_tensors(kind: str, tensors: list[torch.Tensor], weights: list[float], density: float | None = None,
                    majority_sign: MajoritySign = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One tensor from the task tensors (deltas, or A or B factors) of several adapters.

    Args:
        kind: a combination type; `*_svd` types combine as their base type (the SVD comes after).
        tensors: one per adapter, all of one shape.
        weights: one per adapter (any sign).
        density: fraction kept by the pruning types, in (0, 1].
        majority_sign: how TIES elects each entry's sign.
        generator: DARE's random draws.
    """
    stacked = torch.stack(_sparsified(kind, tensors, density, generator), dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *[1] * (stacked.dim() - 1))
    if kind not in ELECTS_SIGN:
        return weighted.sum(dim=0)
    mask = _elected(stacked, w, majority_sign)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def factor_weights(weights: list[float], scalings: list[float]) -> tuple[list[float], list[float]]:
    """(A weights, B weights) of the factor-wise types: sqrt(|w s|) on each side, the sign of w on A only."""
    scaled = [w * s for w, s in zip(weights, scalings, strict=True)]
    root = [math.sqrt(abs(v)) for v in scaled]
    return [r if v >= 0 else -r for r, v in zip(root, scaled, strict=True)], root


def combine_factors(kind: str, a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float],
                    scalings: list[float], density: float | None = None, majority_sign: MajoritySign = "total",
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of a factor-wise type (equal ranks), scaling 1: all A's combined first, then all B's (peft's
    draw order for DARE). `a[i]` (r, in), `b[i]` (out, r), `scalings[i]` adapter i's alpha / r."""
    weights_a, weights_b = factor_weights(weights, scalings)
    new_a = combine_tensors(kind, a, weights_a, density, majority_sign, generator)
    new_b = combine_tensors(kind, b, weights_b, density, majority_sign, generator)
    return new_a, new_b


def concatenate(a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float], scalings: list[float],
                rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cat`, exact: A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1, B_2, ...], so B' A' = sum_i w_i s_i B_i A_i;
    zero-padded to `rank` (the sum of all the adapters' ranks, for a layer some of them leave out)."""
    new_a = torch.cat([t * w * s for t, w, s in zip(a, weights, scalings, strict=True)], dim=0)
    new_b = torch.cat(b, dim=1)
    pad = rank - new_a.shape[0]
    return (torch.cat([new_a, new_a.new_zeros(pad, new_a.shape[1])], dim=0),
            torch.cat([new_b, new_b.new_zeros(new_b.shape[0], pad)], dim=1))


def low_rank(delta: torch.Tensor, rank: int, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of `delta` (out, in): B = U_k S_k, A = V_k^T.

    Args:
        clamp: a quantile q: entries of A and B beyond the q-quantile of all their values are clipped to
            +-that value (peft's `svd_clamp`, from kohya's sd-scripts).

    A layer narrower than `rank` gets its exact factors, zero-padded to `rank` (every layer of a PEFT adapter
    has the same rank).
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    k = min(rank, s.shape[0])
    b, a = u[:, :k] @ torch.diag(s[:k]), vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return (torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0),
            torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1))
