"""Text generation and a chat REPL over any model Seshu can load, with tokens streamed as they are made.

`generate_text` is the one place that turns a prompt into a continuation: it encodes the prompt the way
Seshu trains documents ([bos] text), samples with `SamplingOptions` through plain `model.generate`, and hands
decoded text to a callback piece by piece. `chat_loop` is the REPL without the terminal (lines in, text out),
so the `seshu chat` command and the tests drive the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, set_seed
from transformers.generation.streamers import BaseStreamer

from seshu.chat import chat_prompt, encode_prompt, end_of_turn_ids
from seshu.errors import UserError
from seshu.models.loading import default_device, load_causal_lm
from seshu.models.registry import model_context_length


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token. `temperature=0` is greedy decoding; `top_k=0` and `top_p=1` switch those
    filters off; `repetition_penalty=1` switches it off (>1 discourages tokens already in the text)."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top-k must be 0 (off) or more, not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition penalty must be above 0 (1 is off), not {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(
        self, tokenizer: PreTrainedTokenizerBase, eos_token_id: int | list[int] | None = None
    ) -> GenerationConfig:
        """The transformers equivalent; `eos_token_id` (default: the tokenizer's) may list several ids."""
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        first_eos = eos[0] if isinstance(eos, list) else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else first_eos
        sampling: dict[str, Any] = (
            {}  # sampling knobs left unset when greedy, or transformers warns that they are ignored
            if self.greedy
            else dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not self.greedy,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
        )


# --------------------------------------------------------------------------------------------------
# Loading


def load_for_generation(
    model: str, adapter: str | None = None, device: str | None = None, *, dtype: str | None = None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """A model (with a PEFT LoRA adapter on top when `adapter` is given) and its tokenizer, in eval mode, for
    generation and evaluation; `dtype` as `load_causal_lm` takes it (default: as saved).

    The adapter goes through `seshu.merge.adapters.load_with_adapter`, the one checked way in: it stays unmerged
    (the forward pass it was trained with; a merge can differ, e.g. on Mamba's dt_proj), and an adapter folder
    that ships its own tokenizer wins over the model's, because fine-tuning may have changed its chat template.
    """
    device = device or default_device()
    if adapter is None:
        return load_causal_lm(model, dtype=dtype, device=device)
    from seshu.merge.adapters import load_with_adapter  # pulls in peft, which is slow to import

    loaded = load_with_adapter(model, adapter, dtype=dtype, device=device)
    return loaded.model, loaded.tokenizer


# --------------------------------------------------------------------------------------------------
# Generation


class _TextPieces(BaseStreamer):
    """Decodes new tokens as they arrive and passes each newly completed piece of text to `on_text`.

    Each step decodes only a short window (the last emitted piece plus the new tokens), so the cost stays
    linear in the length of the answer, while the window's leading context keeps decoders that depend on
    neighbours (SentencePiece spaces, byte-level BPE) right. Text ending in U+FFFD is an incomplete UTF-8
    character whose remaining bytes are still to come, so it is held back. The pieces concatenate to the
    decoded continuation (the same ids decoded at once).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: the ids of the last emitted piece, kept as context
        self.read_offset = 0  # ids before this are emitted
        self.prompt_seen = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _emit(self, final: bool) -> None:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix_text) and (final or not text.endswith("\ufffd")):
            self.on_text(text[len(prefix_text) :])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first echoes the prompt
            self.prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streaming supports one sequence at a time")
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


# Turns a prompt into the model's inputs for one sequence: `input_ids` of shape (1, n) and whatever else the model
# takes (a VLM's `pixel_values`).
Encoder = Callable[[str], dict[str, torch.Tensor]]


def text_encoder(tokenizer: PreTrainedTokenizerBase) -> Encoder:
    """The inputs of a text model: the ids of `encode_prompt`."""
    return lambda prompt: {"input_ids": torch.tensor([encode_prompt(tokenizer, prompt)])}


def generate_text(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    options: SamplingOptions,
    on_text: Callable[[str], None] | None = None,
    *,
    stop_token_ids: list[int] | None = None,
    encode: Encoder | None = None,
) -> str:
    """The model's continuation of `prompt` (without the prompt), streamed to `on_text` piece by piece.

    The same seed gives the same text on the same machine. `stop_token_ids` replaces eos as the list of ids
    that end the text (chat adds the template's end-of-turn token); stop tokens are not part of the text.
    The text ends where the model's context does, if `options.max_new_tokens` would run past it: positions the
    model was never trained at give no text worth reading. `encode` turns the prompt into the model's inputs
    (default `text_encoder(tokenizer)`; a VLM's adds the image).
    """
    device = _device_of(model)
    inputs = {name: value.to(device) for name, value in (encode or text_encoder(tokenizer))(prompt).items()}
    length = int(inputs["input_ids"].shape[-1])
    context = model_context_length(model.config)
    if context is not None:
        if length >= context:
            raise UserError(
                f"the prompt is {length} tokens, and the model's context is {context}: no room for an answer; "
                "give a shorter prompt"
            )
        options = replace(options, max_new_tokens=min(options.max_new_tokens, context - length))
    config = options.generation_config(tokenizer, stop_token_ids)
    streamer = _TextPieces(tokenizer, on_text) if on_text is not None else None
    set_seed(options.seed)  # python, numpy and torch (all devices): sampling draws from torch
    output = model.generate(
        **inputs,
        attention_mask=torch.ones_like(inputs["input_ids"]),
        generation_config=config,
        streamer=streamer,
    )
    return str(tokenizer.decode(output[0, length:].tolist(), skip_special_tokens=True))


# --------------------------------------------------------------------------------------------------
# Chat


def _fit_history(
    tokenizer: PreTrainedTokenizerBase, history: list[dict[str, str]], room: int | None, encode: Encoder
) -> tuple[str, bool]:
    """The chat prompt, dropping the oldest exchanges (never the system message or the newest question)
    until it leaves `room` tokens of context for the answer. Returns the prompt and whether it dropped any."""
    dropped = False
    while True:
        prompt = chat_prompt(tokenizer, history)
        first = 1 if history and history[0]["role"] == "system" else 0
        if room is None or encode(prompt)["input_ids"].shape[-1] <= room or len(history) - first <= 1:
            return prompt, dropped
        # Drop the oldest message and any answers after it, so the history still starts with a user turn.
        del history[first]
        while len(history) - first > 1 and history[first]["role"] != "user":
            del history[first]
        dropped = True


def chat_loop(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    options: SamplingOptions,
    read_line: Callable[[], str | None],
    write: Callable[[str], None],
    system: str | None = None,
    *,
    encode: Encoder | None = None,
    first_turn: Callable[[str], str] | None = None,
) -> list[dict[str, str]]:
    """A chat REPL: each line from `read_line` is a user turn, the answer is streamed to `write`.

    `read_line` returns None at the end of input; `/reset` forgets the conversation (keeping the system
    message), `/exit` quits. When the conversation outgrows the model's context, the oldest exchanges are
    dropped. `encode` is as for `generate_text`; `first_turn` rewrites the first user line of each conversation
    (a VLM's adds its image and transcript). Returns the conversation as messages (system first, when given).
    """
    encode = encode or text_encoder(tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    stop_ids = end_of_turn_ids(tokenizer)
    context = model_context_length(model.config)
    room = None if context is None else context - options.max_new_tokens
    turn = 0
    while (line := read_line()) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            write("(conversation cleared)\n")
            continue
        if line.startswith("/") and " " not in line:
            write(f"unknown command {line}; commands: /reset, /exit\n")
            continue
        opening = first_turn is not None and not any(message["role"] == "user" for message in history)
        history.append({"role": "user", "content": first_turn(line) if first_turn and opening else line})
        prompt, dropped = _fit_history(tokenizer, history, room, encode)
        if dropped:
            write("(older turns dropped to fit the model's context)\n")
        # A seed per turn: the whole session replays from --seed, yet asking twice can give two answers.
        turn_options = replace(options, seed=options.seed + turn)
        answer = generate_text(model, tokenizer, prompt, turn_options, write, stop_token_ids=stop_ids, encode=encode)
        write("\n")
        turn += 1
        history.append({"role": "assistant", "content": answer})
    return history
