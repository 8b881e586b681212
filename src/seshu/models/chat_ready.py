"""A copy of a base model that is ready for chat fine-tuning: chat template and chat tokens already in place.

`seshu sft` on a base without a chat template adds Seshu's ChatML template and, when the tokenizer lacks them, the
`<|im_start|>`/`<|im_end|>` tokens; LoRA then also trains those tokens' embedding rows (`trainable_token_indices`),
and such an adapter is no longer a plain low-rank delta, so `seshu merge` refuses it. Doing that step once, here,
on the base itself gives a base that every fine-tune starts from as it is: no tokens added, adapters that are plain
LoRA deltas and merge. The federation's first release (v0) is made this way.

This is a module of its own rather than a function beside `ensure_chat_template` in `seshu.chat`: that module
only sets a tokenizer's template and tokens and never touches weights, while this one loads, resizes and writes a
model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from seshu.chat import ensure_chat_template
from seshu.hub.card import check_replaceable_output, describe_model, render_card
from seshu.io import staged_dir
from seshu.models.loading import embedding_rows, load_causal_lm

CARD_COMMAND = "chat-ready"


def write_chat_ready_model(model: str, out: str | Path) -> bool:
    """Write to `out` a copy of the model `model` (folder or Hub id) whose tokenizer carries a chat template and
    the chat tokens, loadable by plain transformers (safetensors, dtype as saved).

    The tokenizer goes through `ensure_chat_template` (its own template is kept; without one, Seshu's ChatML
    template and, where missing, its two tokens are added). New tokens get embedding rows (and output rows when
    the output layer is not tied to the embeddings) set to the mean of the existing tokens' rows. `out` must be
    new, empty or an earlier output of this function; it is replaced whole and only when the copy is complete.
    Returns True when tokens were added (the embeddings grew), False when the tokenizer already had them.
    """
    out = Path(out)
    check_replaceable_output(out, [model], (CARD_COMMAND,), "a chat-ready model")
    lm, tokenizer = load_causal_lm(model, device="cpu")
    known = len(tokenizer)
    added = ensure_chat_template(tokenizer)
    if added:
        add_mean_token_rows(lm, known, len(tokenizer))
    new_tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(known, len(tokenizer))))]
    card = _card(model, lm, new_tokens)
    with staged_dir(out) as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return added


@torch.no_grad()
def add_mean_token_rows(model: PreTrainedModel, known: int, size: int) -> None:
    """Give token ids [known, size) rows of their own: the embeddings (and an untied output layer) grow to at
    least `size` rows, and those ids' rows are set to the mean of the rows of ids [0, known).

    The mean (Hewitt, "Initializing new word embeddings for pretrained language models", 2021): a new input row
    is then an ordinary point of the embedding space, and a new output row's logit is the average of the old
    tokens' logits, so the new tokens start with an average share of probability and the model's predictions
    barely move. A random row can give a new token a large logit and a zero row one above the many negative
    logits; either shifts the output of the untouched model until fine-tuning unlearns it. Rows that a padded
    vocabulary already holds for these ids are unused by any token and are overwritten the same way.
    """
    if size > embedding_rows(model):
        # mean_resizing=False: transformers' default draws the new rows at random around the mean.
        model.resize_token_embeddings(size, mean_resizing=False)
    embeddings = cast(torch.Tensor, model.get_input_embeddings().weight)
    _set_mean_rows(embeddings, known, size)
    head: Any = model.get_output_embeddings()
    if head is None:
        return
    if head.weight.data_ptr() != embeddings.data_ptr():  # untied: the output layer has rows of its own
        _set_mean_rows(head.weight, known, size)
    bias = getattr(head, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.shape[0] >= size:
        _set_mean_rows(bias, known, size)


def _set_mean_rows(weight: torch.Tensor, known: int, size: int) -> None:
    # The mean in float32: a 16-bit sum over tens of thousands of rows would lose most of its digits.
    weight[known:size] = weight[:known].float().mean(dim=0).to(weight.dtype)


def _card(model: str, lm: PreTrainedModel, new_tokens: list[str]) -> str:
    rows = embedding_rows(lm)
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        **({} if Path(model).exists() else {"base_model": model}),
        "tags": ["seshu", lm.config.model_type, "chat-ready"],
        "seshu": {
            "command": CARD_COMMAND,
            "base": model,
            "tokens_added": new_tokens,
            "embedding_rows": rows,
            "base_model": describe_model(model),
        },
    }
    added = ", ".join(f"`{t}`" for t in new_tokens) if new_tokens else "no tokens"
    body = (
        f"`{model}` with a chat template in its tokenizer, made with Seshu. Added {added}; the embeddings now have "
        f"{rows:,} rows, new rows set to the mean of the existing ones. Fine-tune it with `seshu sft`: its "
        "adapters need no new tokens and merge as plain LoRA deltas."
    )
    return render_card(f"{Path(model).name} (chat-ready)", metadata, body)
