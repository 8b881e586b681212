"""Talking to a VLM: `seshu generate` and `seshu chat` with an image and spoken words.

The user turn is laid out as the seed system laid it out: the image's positions first, then the transcript of the
audio (its first 10 s, through Whisper), then the instruction, rendered with the VLM's chat template (LLaVA's
`<image>` on a line of its own, as the template's image parts give). Generation and the REPL are `seshu.generate`'s,
with an encoder that runs the processor, so `<image>` expands to the vision tower's positions and the pixels go
with it; the answer streams the same way a text model's does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase

from seshu.chat import chat_prompt, end_of_turn_ids
from seshu.errors import UserError, first_line
from seshu.generate import Encoder, SamplingOptions, chat_loop, generate_text
from seshu.models.loading import default_device
from seshu.multimodal.audio import load_audio
from seshu.multimodal.images import load_image
from seshu.multimodal.loading import is_vlm
from seshu.multimodal.speech import Transcriber, bundled_model
from seshu.train.common import silent

if TYPE_CHECKING:
    from peft import PeftModel  # seconds to import: `seshu generate` on a bare VLM never needs it


def check_media(model: str, image: str | None, audio: str | None) -> bool:
    """True when `model` is a VLM; for a text-only model, a `UserError` if an image or audio was given."""
    if is_vlm(model):
        return True
    for flag, given in (("--image", image), ("--audio", audio)):
        if given is not None:
            raise UserError(f"{model} is a text-only model; {flag} needs a VLM made by `seshu vlm build`")
    return False


@dataclass(frozen=True)
class Media:
    """What the first user turn carries besides its words: a picture and the transcript of a recording."""

    image: Image.Image | None = None
    transcript: str | None = None


def load_transcriber(whisper: str | None = None, device: str | None = None) -> Transcriber:
    """The Whisper `whisper` (a folder or Hub id; by default the bundled tiny.en of `seshu[speech]`)."""
    try:
        model = bundled_model() if whisper is None else whisper
        return Transcriber(model, device=device)
    except UserError as exc:
        if whisper is not None:
            raise
        raise UserError(f"no Whisper model for --audio: {first_line(exc)}, or name one with --whisper") from None


def read_media(
    image: str | None = None,
    audio: str | None = None,
    *,
    whisper: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = silent,
) -> Media:
    """The image read and the audio transcribed (its first 10 s). Both files are read before Whisper loads, so a
    bad file is reported without waiting for a model."""
    picture = None if image is None else load_image(image)
    if audio is None:
        return Media(picture)
    samples = load_audio(audio)
    transcript = load_transcriber(whisper, device)(samples)
    log(f"heard: {transcript}")
    return Media(picture, transcript)


def user_turn(instruction: str, media: Media, image_token: str) -> str:
    """The user's message: the image token on a line of its own, the transcript, then the instruction."""
    image = f"{image_token}\n" if media.image is not None else ""
    spoken = f"{media.transcript}\n" if media.transcript else ""
    return f"{image}{spoken}{instruction}"


def vlm_inputs(processor: LlavaProcessor, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The VLM's inputs for rendered `prompts`: each `<image>` expanded to the vision tower's positions, `images`
    in the order of the prompts' `<image>` tokens, several prompts left-padded (generation continues every row
    from the same last column)."""
    # No special tokens added: the chat template writes them, as in training (`apply_chat_template`). One prompt
    # is not padded, so a tokenizer without a pad token (Phi-2's) still encodes it.
    inputs = processor(
        text=prompts,
        images=images or None,
        return_tensors="pt",
        add_special_tokens=False,
        padding=len(prompts) > 1,
        padding_side="left",
    )
    return dict(inputs)


def vlm_encoder(processor: LlavaProcessor, image: Image.Image | None) -> Encoder:
    """Prompt -> the VLM's inputs: `<image>` expanded to the vision tower's positions, with the image's pixels
    when the prompt still holds its token (a long chat may have dropped the turn that had it)."""
    token = str(processor.image_token)

    def encode(prompt: str) -> dict[str, torch.Tensor]:
        count = prompt.count(token)
        if count > (image is not None):
            given = "one image was" if image is not None else "no image was"
            raise UserError(f"the prompt holds {token} {count} times, and {given} given; remove the extra {token}")
        inputs = vlm_inputs(processor, [prompt], [image] if count and image is not None else [])
        return {name: value for name, value in inputs.items() if name != "attention_mask"}

    return encode


@dataclass
class LoadedVLM:
    model: LlavaForConditionalGeneration | PeftModel
    processor: LlavaProcessor

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for the assistant's next answer: `messages` through the chat template, or the last
        message's text as it is when the VLM has no template."""
        if not self.tokenizer.chat_template:
            return messages[-1]["content"]
        return chat_prompt(self.tokenizer, messages)


def load_vlm_for_generation(model: str, device: str | None = None, adapter: str | None = None) -> LoadedVLM:
    """The VLM folder `model` (safetensors only) and its processor, on `device`, in eval mode; with the adapter
    folder `adapter` (from `seshu sft` on the VLM) applied unmerged, and its processor, when given."""
    from seshu.multimodal.loading import load_vlm

    vlm: LlavaForConditionalGeneration | PeftModel
    if adapter is None:
        vlm, processor = load_vlm(model)
    else:
        from seshu.merge.adapters import load_with_adapter  # peft is slow to import: only when asked for

        loaded = load_with_adapter(model, adapter, dtype="float32", device=device)
        assert loaded.processor is not None  # a VLM base always comes with its processor
        vlm, processor = loaded.model, loaded.processor
    tokenizer = processor.tokenizer
    if not tokenizer.chat_template and processor.chat_template:  # saved with the processor only
        tokenizer.chat_template = processor.chat_template
    vlm.to(torch.device(device or default_device())).eval()  # type: ignore[arg-type]  # typed as dtype-only
    return LoadedVLM(vlm, processor)


@dataclass(frozen=True)
class VLMAnswer:
    prompt: str  # what the model read, before `<image>` is expanded
    text: str


def generate_vlm(
    loaded: LoadedVLM,
    instruction: str,
    media: Media,
    options: SamplingOptions,
    on_text: Callable[[str], None] | None = None,
) -> VLMAnswer:
    """The VLM's answer to one user turn (the image, the transcript, the instruction), streamed to `on_text`."""
    turn = user_turn(instruction, media, str(loaded.processor.image_token))
    prompt = loaded.render([{"role": "user", "content": turn}])
    text = generate_text(
        loaded.model,
        loaded.tokenizer,
        prompt,
        options,
        on_text,
        stop_token_ids=end_of_turn_ids(loaded.tokenizer),
        encode=vlm_encoder(loaded.processor, media.image),
    )
    return VLMAnswer(prompt, text)


def chat_vlm(
    loaded: LoadedVLM,
    media: Media,
    options: SamplingOptions,
    read_line: Callable[[], str | None],
    write: Callable[[str], None],
    system: str | None = None,
) -> list[dict[str, str]]:
    """`seshu.generate.chat_loop` with a VLM: the image and transcript go into the first user turn of each
    conversation (again after `/reset`)."""
    image_token = str(loaded.processor.image_token)
    return chat_loop(
        loaded.model,
        loaded.tokenizer,
        options,
        read_line,
        write,
        system,
        encode=vlm_encoder(loaded.processor, media.image),
        first_turn=lambda line: user_turn(line, media, image_token),
    )
