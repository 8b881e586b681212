"""Reading audio for speech recognition: any file libsndfile decodes (wav, flac, ogg, and mp3 since libsndfile 1.1),
without ffmpeg, as the 16 kHz mono float32 samples Whisper expects, cut to the first N seconds (10 by default, as
the seed transcribed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from seshu.errors import UserError

WHISPER_RATE = 16_000
DEFAULT_SECONDS = 10.0
# Extra source audio read past the cut, so the resampling filter's tail sees real samples rather than zeros at the
# last kept samples; scipy's default filter reaches 10 output samples (under 1 ms) either side, far under this.
_MARGIN_SECONDS = 0.05


def mix_to_mono(frames: np.ndarray) -> np.ndarray:
    """The mean of the channels of (frames, channels) audio; one-dimensional input is already mono."""
    return frames if frames.ndim == 1 else frames.mean(axis=1)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono `samples` at `rate` Hz resampled to `target` Hz with a polyphase anti-aliasing filter at the exact
    rational ratio (44.1 kHz -> 16 kHz is 160/441), as float32."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    common = math.gcd(rate, target)
    return resample_poly(samples, target // common, rate // common).astype(np.float32, copy=False)


def prepare_audio(
    frames: np.ndarray, rate: int, *, seconds: float | None = DEFAULT_SECONDS, sampling_rate: int = WHISPER_RATE
) -> np.ndarray:
    """Decoded audio (frames, or frames x channels, at `rate` Hz) as mono float32 at `sampling_rate`, cut to the
    first `seconds` (None keeps it whole)."""
    samples = resample(mix_to_mono(frames), rate, sampling_rate)
    if seconds is not None:
        samples = samples[: round(seconds * sampling_rate)]
    return np.ascontiguousarray(samples, dtype=np.float32)


def load_audio(
    path: str | Path, *, seconds: float | None = DEFAULT_SECONDS, sampling_rate: int = WHISPER_RATE
) -> np.ndarray:
    """The first `seconds` of an audio file (None: all of it) as mono float32 samples at `sampling_rate` Hz.

    A missing file, one libsndfile cannot decode, or one without samples is a `UserError` naming the file."""
    if seconds is not None and seconds <= 0:
        raise UserError(f"audio length must be above 0 seconds (or None for the whole file), not {seconds}")
    source = Path(path).expanduser()
    if not source.is_file():
        raise UserError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(source)) as audio:
            # Decode only what is kept: a long recording cut to 10 s costs 10 s of decoding.
            wanted = -1 if seconds is None else math.ceil((seconds + _MARGIN_SECONDS) * audio.samplerate)
            frames = audio.read(wanted, dtype="float32", always_2d=True)
            rate = audio.samplerate
    except sf.LibsndfileError as exc:
        reason = exc.error_string.rstrip(".")
        raise UserError(f"{path}: not an audio file Seshu can read ({reason}); use wav, flac, mp3 or ogg") from None
    if frames.shape[0] == 0:
        raise UserError(f"{path}: the audio file holds no samples")
    return prepare_audio(frames, rate, seconds=seconds, sampling_rate=sampling_rate)
