"""How alike two LoRA updates are, computed exactly from their factors, and which submissions are near-copies.

The update of one weight is delta = s * B @ A (or its transpose; see `seshu.merge.lora.LoraPair`). Its Frobenius
inner product with another adapter's update of the same weight never needs either delta:

    <s1 B1 A1, s2 B2 A2>_F = s1 s2 trace(A1 A2^T B2^T B1) = s1 s2 sum((A1 A2^T) * (B1^T B2))

which costs O(r1 r2 (in + out)) instead of O(in * out) per weight (for a 4096 x 4096 projection at rank 16, ~130
thousand multiply-adds instead of 16 million, and no 64 MB delta). Norms are the inner product of an update with
itself. Everything runs in float64 so that a cosine of 0.95 is not a rounding artefact of float32 factors.

Near-duplicates. A release weighs every submission by its (capped) example count, so the same update sent n
times would weigh n times: by n colluding clients, or by one client resubmitting. Both should count once, so
`near_duplicate_groups` groups submissions whose updates have cosine >= the bound whoever sent them; the client
ids do not change the grouping. They tell the two cases apart for the admins: `cross_client_groups` keeps the
groups that span several clients (collusion, or one adapter passed around), which is worth a look, while a
group of one client's submissions is merely a resubmission. Groups are connected components, so a chain
a ~ b ~ c joins a and c even when they are less alike than the bound; at bounds near 1 a chain cannot drift far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from seshu.errors import UserError
from seshu.merge.lora import LoraPair

Update = Mapping[str, LoraPair]  # one adapter's pairs by base weight name (lora.adapter_pairs)


def pair_inner(p: LoraPair, q: LoraPair) -> float:
    """<delta_p, delta_q>_F, exact in float64, for two updates of the same weight."""
    if p.shape != q.shape:
        raise ValueError(f"{p.weight}: updates of shapes {list(p.shape)} and {list(q.shape)} have no inner product")
    a1, b1, a2, b2 = (t.double() for t in (p.a, p.b, q.a, q.b))
    # Same layout: <X1, X2> = <X1^T, X2^T>, so it does not matter which. Mixed layouts (a square weight):
    # <X1^T, X2> = trace(X1 X2) = trace(B1 A1 B2 A2) = sum((A1 B2) * (B1^T A2^T)).
    same = p.transposed == q.transposed
    value = ((a1 @ a2.T) * (b1.T @ b2)).sum() if same else ((a1 @ b2) * (b1.T @ a2.T)).sum()
    return float(value) * p.scale * q.scale


def update_inner(x: Update, y: Update) -> float:
    """<X, Y>_F of two whole updates (every weight concatenated; a weight only one adapts contributes zero)."""
    return math.fsum(pair_inner(x[name], y[name]) for name in sorted(set(x) & set(y)))


def module_norms(update: Update) -> dict[str, float]:
    """||scale * B @ A||_F of every adapted weight."""
    return {name: math.sqrt(max(0.0, pair_inner(pair, pair))) for name, pair in sorted(update.items())}


def total_norm(norms: Mapping[str, float]) -> float:
    """The norm of the whole update from its weights' norms."""
    return math.sqrt(math.fsum(n * n for n in norms.values()))


def cosine(x: Update, y: Update) -> float:
    """The cosine of two whole updates; 0 when either is zero (a zero update is like nothing)."""
    nx, ny = update_inner(x, x), update_inner(y, y)
    if nx <= 0 or ny <= 0:
        return 0.0
    return max(-1.0, min(1.0, update_inner(x, y) / math.sqrt(nx * ny)))


def cosine_matrix(updates: Sequence[Update]) -> torch.Tensor:
    """[n, n] float64 cosines of every pair of updates (each self inner product computed once)."""
    n = len(updates)
    norms = [math.sqrt(max(0.0, update_inner(u, u))) for u in updates]
    out = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            denominator = norms[i] * norms[j]
            value = update_inner(updates[i], updates[j]) / denominator if denominator > 0 else 0.0
            out[i, j] = out[j, i] = max(-1.0, min(1.0, value))
    return out


def near_duplicate_groups(updates: Sequence[Update], client_ids: Sequence[str], bound: float) -> list[list[int]]:
    """Groups (indices into `updates`, ascending; groups by their first index) of two or more submissions joined
    by cosines >= `bound`, whoever sent them (see the module's note). Submissions in no group stand alone."""
    if len(client_ids) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(client_ids)} client ids")
    if not 0 < bound <= 1:
        raise UserError(f"the near-duplicate bound is a cosine in (0, 1], got {bound}")
    cos = cosine_matrix(updates)
    parent = list(range(len(updates)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(updates)):
        for j in range(i + 1, len(updates)):
            if cos[i, j] >= bound:
                parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(updates)):
        groups.setdefault(root(i), []).append(i)
    return [members for _, members in sorted(groups.items()) if len(members) > 1]


def cross_client_groups(groups: Sequence[Sequence[int]], client_ids: Sequence[str]) -> list[list[int]]:
    """The groups whose members come from more than one client: possible collusion, for an admin to look at."""
    return [list(g) for g in groups if len({client_ids[i] for i in g}) > 1]
