"""Tokenizer training, saving, statistics and the `seshu tokenizer` commands."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from typer.testing import CliRunner

from seshu.chat import CHAT_TOKENS, DEFAULT_CHAT_TEMPLATE
from seshu.cli.tokenizer import app
from seshu.data.scripts import detect_script
from seshu.errors import UserError
from seshu.tokenizer import (
    ALL_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    ScriptStats,
    balanced_sample,
    load_tokenizer,
    save_tokenizer,
    select_documents,
    stats_report,
    tokenizer_stats,
    train_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A small language model can still be a useful one.",
    "Every village has its own stories and its own songs.",
    "Rain fell on the river while the boats came home.",
]
HINDI = [
    "नमस्ते दुनिया, आज मौसम बहुत अच्छा है।",
    "छोटी भाषाएँ भी बड़ी कहानियाँ कहती हैं।",
    "गाँव के लोग नदी के किनारे गीत गाते हैं।",
]
TELUGU = [
    "నమస్కారం ప్రపంచం, ఈ రోజు వాతావరణం బాగుంది.",
    "చిన్న భాషలు కూడా పెద్ద కథలు చెబుతాయి.",
]
CORPUS = [s for _ in range(20) for s in ENGLISH + HINDI + TELUGU]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return train_tokenizer(CORPUS, 400, request.param)


# --- training -----------------------------------------------------------------------------------------


def test_round_trip_is_exact_even_for_unseen_text(trained: PreTrainedTokenizerBase) -> None:
    # Unseen characters (✓, Tamil, a newline, double spaces) must survive: BPE is byte-level and Unigram
    # falls back to byte pieces, so neither ever needs <unk>.
    for text in [*ENGLISH, *HINDI, *TELUGU, "Hello  नमस्ते\nవర్షం ✓ தமிழ் 42"]:
        ids = trained.encode(text, add_special_tokens=False)
        assert trained.unk_token_id not in ids
        assert trained.decode(ids) == text


def test_special_tokens_come_first_and_stay_whole(trained: PreTrainedTokenizerBase) -> None:
    assert trained.convert_tokens_to_ids(list(ALL_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert (trained.pad_token, trained.bos_token, trained.eos_token, trained.unk_token) == (
        SPECIAL_TOKENS["pad"],
        SPECIAL_TOKENS["bos"],
        SPECIAL_TOKENS["eos"],
        SPECIAL_TOKENS["unk"],
    )
    ids = trained.encode("<s>hello</s><|im_start|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-2:] == [2, 4]
    # Packing adds bos/eos itself, so encoding must not.
    assert trained.encode("hello")[0] not in (trained.bos_token_id, trained.eos_token_id)
    assert len(trained) <= 400


def test_training_is_deterministic() -> None:
    first = train_tokenizer(CORPUS, 300, "bpe").get_vocab()
    assert train_tokenizer(CORPUS, 300, "bpe").get_vocab() == first


def test_split_keeps_indic_words_whole() -> None:
    # With GPT-2's regex a vowel sign would start a new pre-token and "है" could never be one token.
    tok = train_tokenizer(CORPUS, 1000, "bpe")
    assert len(tok.tokenize(" है")) == 1


# --- saving, loading, chat --------------------------------------------------------------------------


def test_saved_folder_loads_with_plain_transformers(trained: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    save_tokenizer(trained, out, card={"kind": "test"})
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    loaded = AutoTokenizer.from_pretrained(str(out))
    text = "Hello नमस्ते వర్షం ✓"
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert load_tokenizer(str(out)).get_vocab() == trained.get_vocab()
    assert "kind: test" in (out / "README.md").read_text(encoding="utf-8")

    messages = [{"role": "user", "content": "नमस्ते"}, {"role": "assistant", "content": "Hello!"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nनमस्ते<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = loaded.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert str(prompt).endswith("<|im_start|>assistant\n")
    encoded: Any = loaded.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids: list[int] = encoded["input_ids"]
    mask: list[int] = encoded["assistant_masks"]
    assert loaded.convert_tokens_to_ids(list(CHAT_TOKENS)) == [4, 5]
    assert ids.count(4) == 2
    assert loaded.decode(ids) == rendered
    answer = [i for i, m in zip(ids, mask, strict=True) if m]
    assert loaded.decode(answer) == "Hello!<|im_end|>"


def test_save_replaces_a_tokenizer_but_not_other_folders(trained: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    save_tokenizer(trained, tmp_path / "tok")
    save_tokenizer(trained, tmp_path / "tok")  # an earlier tokenizer is replaced
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a tokenizer folder"):
        save_tokenizer(trained, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    (precious / "tokenizer.json").write_text("{}")  # a model folder holds a tokenizer too
    with pytest.raises(UserError, match="not a tokenizer folder"):
        save_tokenizer(trained, precious)
    assert (precious / "notes.txt").exists()


# --- document selection ----------------------------------------------------------------------------


def _char_share(docs: list[str], script: str) -> float:
    chars = Counter[str]()
    for doc in docs:
        chars[detect_script(doc)] += len(doc)
    return chars[script] / sum(chars.values())


def test_balanced_sample_raises_the_share_of_a_small_script() -> None:
    docs = ["english words in a long line of text"] * 950 + ["हिन्दी की एक पंक्ति यहाँ है"] * 50 + ["1234"] * 5
    before = _char_share(docs, "Devanagari")
    balanced = list(balanced_sample(docs, alpha=0.3, seed=0))
    after = _char_share(balanced, "Devanagari")
    assert before < 0.05 and after > 0.25
    # Total size stays about the same; letterless lines keep their rate; the seed fixes the outcome.
    assert abs(sum(map(len, balanced)) - sum(map(len, docs))) < 0.05 * sum(map(len, docs))
    assert balanced.count("1234") == 5
    assert list(balanced_sample(docs, alpha=0.3, seed=0)) == balanced
    assert list(balanced_sample(docs, alpha=0.3, seed=1)) != balanced
    # alpha = 1 keeps the corpus' own mix: every document exactly once.
    assert sorted(balanced_sample(docs, alpha=1.0, seed=0)) == sorted(docs)
    # alpha = 0 gives every script the same share.
    assert _char_share(list(balanced_sample(docs, alpha=0.0, seed=0)), "Devanagari") == pytest.approx(0.5, 0.1)


def test_select_documents_skips_blanks_and_samples() -> None:
    docs = [f"doc {i}" for i in range(100)] + ["", "   "]
    assert len(select_documents(docs)) == 100
    sample = select_documents(docs, max_docs=10, seed=3)
    assert len(sample) == 10 and len(set(sample)) == 10
    assert sample == select_documents(docs, max_docs=10, seed=3)


# --- statistics ------------------------------------------------------------------------------------


def test_stats_on_a_hand_checkable_example() -> None:
    # 262 = special tokens + 256 bytes: no merges at all, so every UTF-8 byte is exactly one token.
    tok = train_tokenizer(["ab cd", "नमस्ते"], 262, "bpe")
    stats = tokenizer_stats(tok, ["ab cd", "ef", "नमस्ते दुनिया", "  "])
    # Latin: "ab cd" + "ef" = 3 words, 7 bytes, 7 tokens. Devanagari: 2 words, 6*3 + 1 + 6*3 = 37 bytes.
    assert stats == {
        "Latin": ScriptStats(documents=2, words=3, tokens=7, bytes=7),
        "Devanagari": ScriptStats(documents=1, words=2, tokens=37, bytes=37),
    }
    assert stats["Latin"].fertility == pytest.approx(7 / 3)
    assert stats["Devanagari"].bytes_per_token == 1.0
    report = stats_report(stats)
    assert list(report) == ["by_script"]
    assert report["by_script"]["Devanagari"]["fertility"] == 18.5
    assert report["by_script"]["Latin"]["bytes_per_token"] == 1.0
    assert ScriptStats().fertility == 0.0


def _sample_lines(path: Path, n: int, held_out: int) -> tuple[list[str], list[str]]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    return lines[:n], lines[n : n + held_out]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared corpora not present")
def test_indic_data_lowers_devanagari_fertility() -> None:
    english, _ = _sample_lines(SHARED_DATA / "english-text" / "tinyshakespeare.txt", 2000, 0)
    indic, held_out = [], []
    for name in ("hi_premchand_sevasadan", "mr_dnyaneshwari", "te_wikisource_classical"):
        train, test = _sample_lines(SHARED_DATA / "indic-text" / f"{name}.txt", 2000, 300)
        indic += train
        held_out += test
    english_only = tokenizer_stats(train_tokenizer(english, 2000), held_out)["Devanagari"]
    with_indic = tokenizer_stats(train_tokenizer(english + indic, 2000), held_out)["Devanagari"]
    print(f"Devanagari fertility: English-only {english_only.fertility:.2f}, +Indic {with_indic.fertility:.2f}")
    assert with_indic.fertility < english_only.fertility / 3


# --- errors -----------------------------------------------------------------------------------------


def test_bad_input_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no text to train a tokenizer on"):
        train_tokenizer(["", "  \n"], 1000)
    with pytest.raises(UserError, match="no text to train a tokenizer on"):
        train_tokenizer([], 1000)
    with pytest.raises(UserError, match="vocab size 100 is too small"):
        train_tokenizer(CORPUS, 100)
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        train_tokenizer(CORPUS, 1000, "wordpiece")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="cannot hold every distinct character"):
        train_tokenizer(CORPUS, 263, "unigram")
    with pytest.raises(UserError, match="between 0 and 1"):
        train_tokenizer(CORPUS, 1000, balance_alpha=2.0)
    with pytest.raises(UserError, match="tokenizer folder not found"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


# --- command line -----------------------------------------------------------------------------------


def test_cli_train_then_stats_json(tmp_path: Path) -> None:
    english, hindi = tmp_path / "en.txt", tmp_path / "hi.jsonl"
    english.write_text("\n".join(ENGLISH * 10), encoding="utf-8")
    hindi.write_text("\n".join(json.dumps({"body": s}, ensure_ascii=False) for s in HINDI * 10), encoding="utf-8")
    (tmp_path / "hi").mkdir()
    (tmp_path / "hi" / "hi.txt").write_text("\n".join(HINDI * 10), encoding="utf-8")
    out = tmp_path / "tok"
    runner = CliRunner()

    args = ["train", "--data", str(english), "--data", str(tmp_path / "hi"), "--vocab-size", "300"]
    result = runner.invoke(app, [*args, "--out", str(out), "--balance-alpha", "0.5"])
    assert result.exit_code == 0, result.output
    assert "70 documents" in result.output and str(out) in result.output
    assert AutoTokenizer.from_pretrained(str(out)).bos_token == "<s>"
    assert "sha256:" in (out / "README.md").read_text(encoding="utf-8")

    result = runner.invoke(
        app,
        ["stats", "--tokenizer", str(out), "--data", str(hindi), "--text-field", "body", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["by_script"]) == ["Devanagari"]
    assert report["by_script"]["Devanagari"]["documents"] == 30
    assert report["by_script"]["Devanagari"]["fertility"] > 0

    result = runner.invoke(app, ["stats", "--tokenizer", str(out), "--data", str(english)])
    assert result.exit_code == 0 and "Latin" in result.output


def test_cli_user_errors_leave_nothing_behind(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "tok"
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nope.txt"), "--out", str(out)])
    assert isinstance(result.exception, UserError)
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "blank.txt"), "--out", str(out)])
    assert isinstance(result.exception, UserError)
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path / "blank.txt"), "--out", str(out), "--vocab-size", "9"]
    )
    assert isinstance(result.exception, UserError) and "too small" in str(result.exception)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["blank.txt"]
    result = runner.invoke(app, ["stats", "--tokenizer", str(out), "--data", str(tmp_path / "blank.txt")])
    assert isinstance(result.exception, UserError) and "not found" in str(result.exception)
