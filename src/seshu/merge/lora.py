"""LoRA adapters as exact weight deltas, and merged deltas re-factored into an adapter.

A LoRA adapter changes a weight W [out, in] by delta_W = scale * B @ A (A: [r, in], B: [out, r]; scale =
alpha / r, or alpha / sqrt(r) with rsLoRA); an embedding adapter stores A: [r, vocab] and B: [dim, r] and its
delta is (B @ A)^T * scale, as is a fan_in_fan_out (Conv1D) layer's. Merging adapters means merging these deltas:
averaging the A's and the B's separately is not the same (the mean of products is not the product of means),
which is what `seshu merge` avoids. A merged delta is generally of higher rank than any input; `refactor`
returns the best rank-r approximation (truncated SVD, Eckart-Young) and how much of it is lost. When the merge is
a weighted sum of the deltas, `refactor_sum` finds the same truncated SVD from the stacked factors without
building the delta.

Only plain LoRA on weight matrices has such a delta. DoRA rescales each column by a learned magnitude over the
norm of W + delta_W, LoRA on `target_parameters` (fused MoE experts) and `modules_to_save` replace or wrap
weights in other ways: those adapters are refused with the way out (fold each, then merge the folded models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from seshu.errors import UserError
from seshu.merge.adapters import AdapterFiles

PREFIX = "base_model.model."
# Adapter settings whose effect is not a plain low-rank weight delta, with what each does instead.
_NOT_A_DELTA = {
    "use_dora": "DoRA rescales the adapted weight by a learned magnitude",
    "target_parameters": "it adapts fused parameters (mixture-of-experts weights)",
    "modules_to_save": "it replaces whole modules",
    "trainable_token_indices": "it trains embedding rows directly",
    "layer_replication": "it duplicates layers",
    "lora_bias": "it trains a bias as well",
    "use_qalora": "QA-LoRA pools its inputs",
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens",
}


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: the factors and how they make the delta of `weight` (a base tensor name)."""

    weight: str
    a: torch.Tensor  # [r, in] (for embeddings and fan_in_fan_out: [r, rows of the weight])
    b: torch.Tensor  # [out, r]
    scale: float
    transposed: bool  # delta = (b @ a)^T * scale
    embedding: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight this pair changes."""
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transposed else (rows, cols)

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the exact float32 delta."""
        a, b = self.a.float(), self.b.float()
        if self.transposed:
            return (b @ a[:, start:stop]).T.mul_(self.scale)
        return (b[start:stop] @ a).mul_(self.scale)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [rows, r], right [r, cols]) in float64 with delta = left @ right, the scale in `left`."""
        a, b = self.a.double(), self.b.double()
        if self.transposed:  # (b a)^T s = (a^T s) b^T
            return a.T * self.scale, b.T
        return b * self.scale, a


def adapter_pairs(files: AdapterFiles) -> dict[str, LoraPair]:
    """The adapter's deltas by base tensor name. Raises UserError for an adapter that is not a weight delta."""
    raw, where = files.raw_config, str(files.path)
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{where}: a {raw.get('peft_type')} adapter is not LoRA; only LoRA adapters merge as deltas")
    for key, why in _NOT_A_DELTA.items():
        if raw.get(key):
            raise UserError(
                f"{where}: sets {key}, so its change is not a low-rank weight delta ({why}); fold it with "
                "`seshu adapters fold` and merge the folded models instead"
            )
    if raw.get("bias", "none") != "none":
        raise UserError(f"{where}: trains biases (bias: {raw['bias']}); fold it and merge the folded models instead")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in files.tensors.items():
        module, part = _split_key(key, where)
        factors.setdefault(module, {})[part] = tensor
    pairs: dict[str, LoraPair] = {}
    for module, parts in sorted(factors.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{where}: the LoRA factors of {module} are missing or do not fit each other")
        rank = int(a.shape[0])
        pairs[f"{module}.weight"] = LoraPair(
            weight=f"{module}.weight",
            a=a,
            b=b,
            scale=_scale(raw, module, rank),
            transposed=embedding or bool(raw.get("fan_in_fan_out")),
            embedding=embedding,
        )
    return pairs


def _split_key(key: str, where: str) -> tuple[str, str]:
    if not key.startswith(PREFIX):
        raise UserError(f"{where}: tensor {key} is not named as peft names LoRA weights")
    body = key[len(PREFIX) :]
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if body.endswith(suffix):
            return body[: -len(suffix)], part
    for part in ("lora_embedding_A", "lora_embedding_B"):
        if body.endswith(f".{part}"):
            return body[: -len(part) - 1], part
    raise UserError(f"{where}: tensor {key} is not a LoRA factor (lora_A / lora_B); this adapter is not plain LoRA")


def _scale(raw: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling for one module: its alpha (alpha_pattern wins) over its rank, or over sqrt(rank)."""
    alpha = float(raw.get("lora_alpha", 8))
    patterns = raw.get("alpha_pattern") or {}
    if patterns:
        from peft.utils.other import get_pattern_key  # peft takes seconds to import; model merges never need it

        key = get_pattern_key(list(patterns), module)
        alpha = float(patterns.get(key, alpha))
    return alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank


def check_against_base(pairs: dict[str, LoraPair], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every adapted weight must be a 2-D tensor of the base with the shape the factors make."""
    for name, pair in pairs.items():
        if name not in shapes:
            raise UserError(f"{where}: adapts {name}, which the base model does not have; it is for another base")
        if tuple(shapes[name]) != pair.shape:
            raise UserError(
                f"{where}: {name} has shape {list(shapes[name])} in the base but the adapter's factors make "
                f"{list(pair.shape)}; the adapter was trained on another base model"
            )


@dataclass(frozen=True)
class Refactored:
    a: torch.Tensor
    b: torch.Tensor
    tail_energy: float  # sum of the dropped squared singular values: ||delta - b a||_F^2
    energy: float  # ||delta||_F^2

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.tail_energy / self.energy) if self.energy > 0 else 0.0


def refactor(delta: torch.Tensor, rank: int) -> Refactored:
    """The best rank-`rank` factors of `delta` ([rows, cols]): b [rows, r] and a [r, cols] with b @ a ~ delta."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _truncated(u, s, vh, rank)


def refactor_sum(terms: Sequence[tuple[LoraPair, float]], rank: int) -> Refactored:
    """`refactor` of sum(c_i delta_i) over (pair_i, c_i), from the factors alone.

    The sum is L @ R with L = [c_1 left_1 | c_2 left_2 | ...] ([rows, K]) and R = [right_1; right_2; ...]
    ([K, cols]), K the summed ranks. With L = Q_L R_L and R^T = Q_R R_R (QR), L R = Q_L (R_L R_R^T) Q_R^T, and
    the SVD of the small core R_L R_R^T = U S V^T gives the delta's SVD (Q_L U) S (Q_R V)^T exactly: the same
    singular values, the same factors up to sign. That is O((rows + cols) K^2) instead of the
    O(rows cols min(rows, cols)) of an SVD of the delta (seconds for a 4096 x 4096 weight, per weight)."""
    lefts, rights = zip(*(pair.factors() for pair, _ in terms), strict=True)
    left = torch.cat([part * c for part, (_, c) in zip(lefts, terms, strict=True)], dim=1)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(torch.cat(rights, dim=0).T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return _truncated(q_left @ u, s, vh @ q_right.T, rank)


def _truncated(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Refactored:
    """The rank-`rank` truncation of the SVD u diag(s) vh. The singular values are split evenly (b = U sqrt(S),
    a = sqrt(S) V^T) so that neither factor dwarfs the other when the adapter is trained further.

    The result has rank min(rank, rows, cols) whatever s holds: a sum of low-rank deltas has fewer singular values
    than that (the rest are 0), and the adapter's config promises one rank for every weight."""
    r = min(rank, u.shape[0], vh.shape[1])
    missing = r - s.numel()
    if missing > 0:
        s = torch.cat([s, s.new_zeros(missing)])
        u = torch.cat([u, u.new_zeros(u.shape[0], missing)], dim=1)
        vh = torch.cat([vh, vh.new_zeros(missing, vh.shape[1])])
    root = s[:r].sqrt()
    energy = float((s * s).sum())
    return Refactored(
        a=(root[:, None] * vh[:r]).float().contiguous(),
        b=(u[:, :r] * root[None, :]).float().contiguous(),
        tail_energy=float((s[r:] * s[r:]).sum()),
        energy=energy,
    )


def adapter_tensors(pair: LoraPair, factors: Refactored) -> dict[str, torch.Tensor]:
    """peft's tensors for a re-factored delta of the weight `pair` adapts, in that pair's layout."""
    module = pair.weight.removesuffix(".weight")
    if not pair.transposed:
        return {f"{PREFIX}{module}.lora_A.weight": factors.a, f"{PREFIX}{module}.lora_B.weight": factors.b}
    # delta = (B @ A)^T = b a, so A = b^T and B = a^T.
    a, b = factors.b.T.contiguous(), factors.a.T.contiguous()
    if pair.embedding:
        return {f"{PREFIX}{module}.lora_embedding_A": a, f"{PREFIX}{module}.lora_embedding_B": b}
    return {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}
