"""The language half of a VLM: a Seshu causal LM (a folder, a Hub id, or a fresh `arch:preset`) made to fit
transformers' `LlavaForConditionalGeneration`, which rebuilds the LM as `AutoModel` (the decoder without its
head) plus a bias-free `lm_head` of its own, and ties the two only through the name `embed_tokens`.

Two kinds of LM do not fit that mould as they are, and are changed here without changing what they compute:
- an LM whose tied embeddings are not called `embed_tokens` (Mamba's are `embeddings`): transformers cannot tie
  them and construction fails, so the head gets its own copy of the embedding matrix (identical logits; the
  saved model is larger by one vocabulary x hidden matrix);
- an LM whose head has a bias (Phi, Phi-2): the bias is folded into the head's weights, see `fold_head_bias`.
A mixture of experts also stops returning its router logits: LLaVA's output has no field for them (the forward
pass fails with a TypeError) and LLaVA's loss is the LM loss alone, without the router's load-balancing term.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from seshu.errors import UserError, first_line
from seshu.models.loading import check_model_dir, load_causal_lm
from seshu.models.registry import ARCHS, build_config, build_model, get_preset_arch
from seshu.tokenizer import load_tokenizer

# `arch:preset`, e.g. `llama:tiny`; neither a Hub id (no ':') nor, unless it exists, a path.
_FRESH = re.compile(r"([a-z0-9_]+):([a-z0-9_]+)")

# The one embedding name LLaVA's weight tying knows (`_tied_weights_keys` of LlavaForConditionalGeneration).
_LLAVA_TIED_NAME = "embed_tokens"

# Names of the final layer norm in the decoders whose heads have a bias (Phi's `final_layernorm`).
_FINAL_NORMS = ("final_layernorm", "norm_f", "norm", "ln_f")


def check_language_model(ref: str, tokenizer: str | None) -> None:
    """The cheap checks of `load_language_model`'s input (names, folders, config), before anything is loaded."""
    fresh = _fresh(ref)
    if fresh:
        get_preset_arch(*fresh)
        if tokenizer is None:
            raise UserError(f"--lm {ref} builds a fresh model: give its tokenizer with --tokenizer")
        return
    if tokenizer is not None:
        raise UserError("--tokenizer is for a fresh --lm arch:preset; a model folder or Hub id brings its own")
    check_model_dir(ref)
    try:
        model_type = AutoConfig.from_pretrained(ref).model_type
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{ref}: cannot read the language model's config: {first_line(exc)}") from None
    if model_type not in ARCHS:
        raise UserError(f"{ref}: a '{model_type}' model; --lm takes one of Seshu's archs: {', '.join(ARCHS)}")


def load_language_model(
    ref: str, *, tokenizer: str | None = None, context_length: int = 2048, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM `ref` in float32 on the CPU with its tokenizer: a Seshu model folder or Hub id (its own
    tokenizer), or `arch:preset` for a fresh seeded model sized to the tokenizer folder `tokenizer`."""
    check_language_model(ref, tokenizer)
    fresh = _fresh(ref)
    if fresh is None:
        return load_causal_lm(ref, dtype="float32", device="cpu")
    assert tokenizer is not None  # checked above
    tok = load_tokenizer(tokenizer)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    config = build_config(*fresh, vocab_size=len(tok), context_length=context_length, special_token_ids=ids)
    model = build_model(config, seed=seed)
    model.eval()
    return model, tok


def _fresh(ref: str) -> tuple[str, str] | None:
    match = _FRESH.fullmatch(ref)
    if match is None or Path(ref).exists():
        return None
    return match.group(1), match.group(2)


@torch.no_grad()
def fit_for_llava(model: PreTrainedModel) -> None:
    """Make `model` (in place) hold the same function in a form `LlavaForConditionalGeneration` can carry: a
    bias-free head, tied to the embeddings only where those are called `embed_tokens`."""
    head = cast(nn.Linear, model.get_output_embeddings())
    embeddings = cast(nn.Embedding, model.get_input_embeddings())
    tied = head.weight.data_ptr() == embeddings.weight.data_ptr()
    if tied and not hasattr(model.base_model, _LLAVA_TIED_NAME):
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
        tied = False
    model.config.tie_word_embeddings = tied
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    if head.bias is None:
        return
    if tied:  # no Seshu arch ties a biased head; folding would change the shared embeddings too
        raise UserError(f"a '{model.config.model_type}' LM with tied embeddings and a head bias cannot be carried")
    if bool((head.bias != 0).any()):
        norm = _final_norm(model)
        head.weight.copy_(fold_head_bias(head.weight, head.bias, norm.weight, norm.bias))
    head.register_parameter("bias", None)


def _final_norm(model: PreTrainedModel) -> nn.LayerNorm:
    for name in _FINAL_NORMS:
        module: Any = getattr(model.base_model, name, None)
        if isinstance(module, nn.LayerNorm) and module.weight is not None and module.bias is not None:
            return module
    raise UserError(
        f"the '{model.config.model_type}' LM's head has a bias and no final LayerNorm to fold it through; "
        "LLaVA's head has no bias"
    )


def fold_head_bias(
    weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor
) -> torch.Tensor:
    """Head weights W' with W' h == W h + b for every output h = g * n + beta of the final LayerNorm.

    A LayerNorm's normalised vector n has zero mean, so for any vector u, (u (1/g)^T)(g * n) = u sum(n) = 0: W and
    W + u (1/g)^T agree on the g * n part of h, and differ by u * s on its beta part, with s = sum(beta / g).
    u = b / s moves the bias into the weights; exact in real numbers, and in floating point as close as the
    caller's logits check shows. Computed in float64, returned in W's dtype.
    """
    gain = norm_weight.double()
    if bool((gain == 0).any()):
        raise UserError("cannot fold the LM head's bias: its final LayerNorm has a zero gain")
    s = float((norm_bias.double() / gain).sum())
    if abs(s) < 1e-6 * float((norm_bias.double() / gain).abs().sum() + 1):
        raise UserError("cannot fold the LM head's bias: its final LayerNorm's bias is orthogonal to the fold")
    u = bias.double() / s
    return (weight.double() + torch.outer(u, 1 / gain)).to(weight.dtype)
