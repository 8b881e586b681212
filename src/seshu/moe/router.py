"""Router initialisation for an assembled mixture of experts: one gate vector per layer and expert.

A Mixtral router scores expert e for a token by `gate[e] . x`, where x is the hidden state entering the layer's
MLP (the output of `post_attention_layernorm`). A gate row that points where an expert's typical tokens point
sends those tokens to it. The three modes differ in what they take as an expert's typical token:

- `hidden`: the mean, over every text token of the expert's positive prompts, of the hidden state entering each
  layer's MLP in the base model, minus the same mean over its negative prompts; one vector per layer.
- `cheap_embed`: the mean input embedding of those tokens (minus the negatives'), the same vector in every
  layer. No forward pass, so it suits a model too large to run here, but it only sees which tokens occur.
- `random`: a seeded random direction per layer and expert.

Every row is scaled to unit length, so the modes differ in direction only and the router's logits are
`cos(gate, x) * |x|`. Means leave out the bos token each prompt starts with: its state is the same whatever
the prompt, and in trained models it carries outsized activations that would swamp the mean.

The functions here are pure (token ids and states in, tensors out); `seshu.moe.layerwise` runs the base model
for `hidden` and `seshu.moe.build` does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from seshu.chat import encode_prompt

GATE_MODES = ("hidden", "cheap_embed", "random")


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as the model sees a document start: [bos] text."""
    return [encode_prompt(tokenizer, prompt) for prompt in prompts]


def text_start(ids: Sequence[int], bos_token_id: int | None) -> int:
    """The first position after a leading bos (0 when there is none)."""
    return 1 if bos_token_id is not None and len(ids) > 1 and ids[0] == bos_token_id else 0


def normalise_rows(vectors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each vector along the last dimension scaled to unit length (a zero vector stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=eps)


def gate_rows(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """Unit gate vector(s) from the mean state of the positive prompts and, if any, of the negative ones."""
    direction = positive if negative is None else positive - negative
    return normalise_rows(direction.float())


def mean_state(states: Sequence[torch.Tensor], prompts: list[list[int]], bos_token_id: int | None) -> torch.Tensor:
    """Mean over every text token of `prompts` of their states (one [positions, hidden] each): [hidden]."""
    total: torch.Tensor | None = None
    count = 0
    for ids, state in zip(prompts, states, strict=True):
        text = state[text_start(ids, bos_token_id) :]
        summed = text.sum(dim=0)
        total = summed if total is None else total + summed
        count += text.shape[0]
    assert total is not None and count > 0
    return total / count


def mean_embedding(embed: torch.Tensor, prompts: list[list[int]], bos_token_id: int | None) -> torch.Tensor:
    """Mean input embedding over every text token of `prompts`: [hidden]."""
    ids = [token for p in prompts for token in p[text_start(p, bos_token_id) :]]
    return embed[torch.tensor(ids, dtype=torch.long)].float().mean(dim=0)


ExpertPrompts = list[tuple[list[list[int]], list[list[int]]]]  # each expert's (positive, negative) prompt ids


def _expert_rows(experts: ExpertPrompts, mean_of: Callable[[list[list[int]]], torch.Tensor]) -> list[torch.Tensor]:
    """Each expert's gate rows from the mean state `mean_of` gives its positive (minus its negative) prompts."""
    return [gate_rows(mean_of(positive), mean_of(negative) if negative else None) for positive, negative in experts]


# Given token sequences, the hidden states entering each layer's MLP, layer by layer: for each layer (in order)
# one [positions, hidden] tensor per sequence (`seshu.moe.layerwise.mlp_inputs_by_layer`).
LayerStates = Callable[[list[list[int]]], Iterable[list[torch.Tensor]]]


def hidden_gates(layer_states: LayerStates, experts: ExpertPrompts, bos_token_id: int | None) -> torch.Tensor:
    """`hidden` mode: [layers, experts, hidden]."""
    groups = [group for positive, negative in experts for group in (positive, negative)]
    layers: list[list[torch.Tensor | None]] = []  # per layer, the mean state of each group (None: no prompts)
    for states in layer_states([ids for group in groups for ids in group]):
        at, means = 0, []
        for group in groups:
            means.append(mean_state(states[at : at + len(group)], group, bos_token_id) if group else None)
            at += len(group)
        layers.append(means)

    def over_layers(group: int) -> torch.Tensor | None:
        means = [m[group] for m in layers]
        return torch.stack([m for m in means if m is not None]) if means[0] is not None else None

    rows = []
    for e in range(len(experts)):
        positive = over_layers(2 * e)
        assert positive is not None  # `check_config` requires positive prompts in this mode
        rows.append(gate_rows(positive, over_layers(2 * e + 1)))
    return torch.stack(rows, dim=1)


def cheap_embed_gates(
    embed: torch.Tensor, experts: ExpertPrompts, bos_token_id: int | None, num_layers: int
) -> torch.Tensor:
    """`cheap_embed` mode: [layers, experts, hidden], the same rows in every layer."""
    rows = _expert_rows(experts, lambda ids: mean_embedding(embed, ids, bos_token_id))
    return torch.stack(rows).unsqueeze(0).repeat(num_layers, 1, 1)


def random_gates(num_layers: int, num_experts: int, hidden_size: int, seed: int) -> torch.Tensor:
    """`random` mode: [layers, experts, hidden], seeded unit-length random directions."""
    generator = torch.Generator().manual_seed(seed)
    return normalise_rows(torch.randn(num_layers, num_experts, hidden_size, generator=generator))


def max_gate_cosine(gates: torch.Tensor) -> list[tuple[float, int, int]]:
    """Per layer, the largest cosine similarity between two experts' gate rows and which two they are.

    Two rows that nearly coincide send the same tokens to both experts: the router cannot tell them apart.
    """
    unit = normalise_rows(gates.float())
    result = []
    for layer in unit:
        sims = layer @ layer.T
        sims.fill_diagonal_(-2.0)
        flat = int(torch.argmax(sims))
        i, j = divmod(flat, sims.shape[1])
        result.append((float(sims[i, j]), min(i, j), max(i, j)))
    return result
