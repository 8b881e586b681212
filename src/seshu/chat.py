"""Chat conventions shared by tokenizers, instruction data, generation, fold and MoE routing: the chat tokens,
Seshu's default template, how a prompt is encoded and where a turn ends.

It imports nothing else of Seshu's but its errors, so every layer can use it without import loops.
"""

from __future__ import annotations

import logging

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from seshu.errors import UserError, first_line

logger = logging.getLogger(__name__)

CHAT_TOKENS: tuple[str, str] = ("<|im_start|>", "<|im_end|>")

# ChatML. The {% generation %} markers let transformers return an assistant-token mask
# (`return_assistant_tokens_mask=True`), which SFT uses to train on answers only; they render to nothing.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3). A chat answer ends at the
# first of these that the tokenizer knows and the template writes; base models only know eos.
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


_PROBE: list[dict[str, str]] = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's ids as a document starts in training: [bos] text, and no eos (the text goes on).

    Encoding without the tokenizer's own special tokens and then adding bos when it is not already first
    gives one bos whether the tokenizer adds it itself (Llama), does not (Seshu's), or the text starts with it
    already (a chat template that writes bos).
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    if not ids:
        raise UserError("the prompt is empty and the tokenizer has no bos token to start from; give a prompt")
    return ids


def _template_source(tokenizer: PreTrainedTokenizerBase) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
        return "\n".join(template.values())
    return template or DEFAULT_CHAT_TEMPLATE


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """`messages` rendered by the tokenizer's chat template (Seshu's ChatML template when it has none), ending
    with the cue for the assistant's next answer."""
    fallback = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=fallback
        )
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"the tokenizer's chat template cannot render this conversation: {exc}") from None
    if not isinstance(text, str):
        raise UserError(f"the tokenizer's chat template rendered a {type(text).__name__}, not text")
    return text


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos plus the end-of-turn tokens that the tokenizer knows and its chat template writes."""
    vocab = tokenizer.get_vocab()
    source = _template_source(tokenizer)
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in source and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Make sure `tokenizer` has a chat template that renders; True when tokens had to be added.

    A tokenizer's own template is kept: the model was trained with it. Without one, Seshu's ChatML template
    (`DEFAULT_CHAT_TEMPLATE`) is set, and `<|im_start|>`/`<|im_end|>` are added as special tokens when the
    tokenizer does not already encode each as a single token. The template is an attribute of the tokenizer,
    so `save_pretrained` writes it and `apply_chat_template` works wherever the tokenizer is loaded. When
    this returns True the vocabulary grew: the caller must resize the model's embeddings
    (`model.resize_token_embeddings(len(tokenizer))`) before training.
    """
    added = False
    if not tokenizer.chat_template:
        missing = [token for token in CHAT_TOKENS if not _is_single_token(tokenizer, token)]
        if missing:
            before = len(tokenizer)
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            # A token already in the vocabulary (but split by the pre-tokenizer) keeps its id: no growth.
            added = len(tokenizer) > before
            if added:
                logger.warning(
                    "added the chat tokens %s to the tokenizer (now %d tokens); resize the model's embeddings",
                    ", ".join(missing),
                    len(tokenizer),
                )
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    try:
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception as exc:  # any failure of a user-supplied Jinja template is a mistake in that template
        reason = first_line(exc)
        raise UserError(f"chat template does not render: {reason}; fix the tokenizer's chat template") from None
    if not isinstance(rendered, str) or _PROBE[-1]["content"] not in rendered:
        raise UserError("chat template does not render: the assistant's answer is missing from its output")
    return added


def _is_single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    return len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
