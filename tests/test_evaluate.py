"""Perplexity and bits per byte (windows, batching, scripts, every arch), the run plot, `seshu eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from matplotlib import image as mpimg
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from typer.testing import CliRunner

from seshu.cli.evaluate import app
from seshu.errors import UserError
from seshu.evaluate.perplexity import (
    NLLTotals,
    document_windows,
    evaluate_perplexity,
    perplexity_from_paths,
    perplexity_report,
)
from seshu.evaluate.plot import plot_run, read_run_log
from seshu.models.registry import ARCHS, build_config, build_model

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A small language model can still be a useful one, if it is trained on the right text.",
    "Rain fell.",
    "Every village has its own stories and its own songs, and the river carries them to the sea "
    "where the boats come home at night and the fishermen sing the old songs again.",
]
HINDI = [
    "नमस्ते दुनिया, आज मौसम बहुत अच्छा है।",
    "गाँव के लोग नदी के किनारे गीत गाते हैं।",
]
CONTEXT = 128  # the tiny models' context: every test document fits, and windows are set smaller
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of ~300 tokens: any text encodes, Devanagari in several tokens per letter."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(ENGLISH + HINDI, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    config = build_config(
        arch,
        "tiny",
        vocab_size=len(tokenizer),
        context_length=CONTEXT,
        special_token_ids={
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
        },
    )
    return build_model(config, seed=0).eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request: pytest.FixtureRequest, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_model(request.param, tokenizer)


@pytest.fixture(scope="module")
def llama(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_model("llama", tokenizer)


def overall(totals: dict[str, NLLTotals]) -> NLLTotals:
    result = NLLTotals()
    for t in totals.values():
        result.add(t)
    return result


def doc_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def reference_nll(model: PreTrainedModel, ids: list[int]) -> float:
    """Summed NLL of ids[1:] from one forward pass over the whole document, no padding, no batching."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()


# --- document_windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "max_length", "stride"),
    [
        (1, 4, 2),  # a lone start token: nothing to score
        (2, 4, 2),
        (5, 8, 4),  # shorter than one window
        (8, 8, 4),  # exactly one window
        (9, 8, 4),
        (100, 16, 8),
        (100, 16, 15),
        (100, 16, 16),  # "no overlap" still keeps the one token a window needs as context
        (37, 5, 3),
        (50, 10, 25),  # a stride past the window cannot skip tokens
        (30, 2, 1),
    ],
)
def test_windows_score_every_token_after_the_first_exactly_once(n: int, max_length: int, stride: int) -> None:
    ids = list(range(n))  # ids are their own positions, so a window says where it lies
    windows = document_windows(ids, max_length, stride)
    scored = [t for window, n_context in windows for t in window[n_context:]]
    assert sorted(scored) == list(range(1, n))
    assert len(scored) == len(set(scored))
    effective = min(stride, max_length - 1)
    for k, (window, n_context) in enumerate(windows):
        assert 2 <= len(window) <= max_length
        assert window == list(range(window[0], window[0] + len(window)))  # contiguous slices
        assert window[0] == k * effective
        # After the first window, every scored token sees max_length - stride tokens of context at least.
        assert n_context == (1 if k == 0 else max_length - effective)
        assert n_context < len(window)


def test_windows_reject_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="max_length"):
        document_windows([1, 2, 3], 1, 1)
    with pytest.raises(ValueError, match="stride"):
        document_windows([1, 2, 3], 4, 0)


# --- evaluate_perplexity ------------------------------------------------------------------------------


def test_equals_the_models_own_loss_on_a_document_in_one_window(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    text = ENGLISH[0]
    ids = doc_ids(tokenizer, text)
    assert len(ids) <= CONTEXT
    with torch.no_grad():
        own = llama(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    totals = evaluate_perplexity(llama, tokenizer, [text])
    assert list(totals) == ["Latin"]
    t = totals["Latin"]
    assert (t.documents, t.tokens, t.bytes) == (1, len(ids) - 1, len(text.encode("utf-8")))
    assert t.perplexity == pytest.approx(math.exp(own), rel=1e-4)


def test_sliding_windows_give_each_token_its_strided_context(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """An independent reference: one forward pass per token, over exactly the context the scheme promises
    (window k starts at k * stride, and a token is scored by the first window that reaches it)."""
    text = ENGLISH[3]
    ids = doc_ids(tokenizer, text)[:30]
    max_length, stride = 8, 3
    expected = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = 0 if t < max_length else ((t - max_length) // stride + 1) * stride
            logits = llama(input_ids=torch.tensor([ids[begin:t]]), use_cache=False).logits[0, -1].float()
            expected -= torch.log_softmax(logits, -1)[ids[t]].item()
    decoded: str = tokenizer.decode(ids[1:])  # type: ignore[assignment]  # one sequence in, one string out
    assert tokenizer(decoded, add_special_tokens=False)["input_ids"] == ids[1:]
    got = overall(evaluate_perplexity(llama, tokenizer, [decoded], max_length=max_length, stride=stride))
    assert got.tokens == len(ids) - 1
    assert got.nll == pytest.approx(expected, rel=1e-5)


def test_every_arch_full_context_windows_and_batching(
    arch_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    docs = ENGLISH + HINDI
    lengths = [len(doc_ids(tokenizer, d)) for d in docs]
    assert max(lengths) > 2 * 16  # the small windows below really slide
    # Windows at least as long as every document: one per document, the same as scoring it whole.
    whole = overall(evaluate_perplexity(arch_model, tokenizer, docs, max_length=max(lengths), batch_size=3))
    expected = sum(reference_nll(arch_model, doc_ids(tokenizer, d)) for d in docs)
    assert whole.nll == pytest.approx(expected, rel=1e-4)
    assert whole.tokens == sum(lengths) - len(docs)
    assert math.isfinite(whole.perplexity) and whole.perplexity > 1
    # Batching (right padding, windows of several documents together) does not change the figures.
    one = overall(evaluate_perplexity(arch_model, tokenizer, docs, max_length=16, stride=8, batch_size=1))
    four = overall(evaluate_perplexity(arch_model, tokenizer, docs, max_length=16, stride=8, batch_size=4))
    assert (one.tokens, one.bytes, one.documents) == (four.tokens, four.bytes, four.documents)
    assert one.tokens == whole.tokens
    assert one.nll == pytest.approx(four.nll, rel=1e-4)


def test_per_script_totals_sum_to_the_overall_figure(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    docs = [d for pair in zip(ENGLISH, HINDI * 2, strict=True) for d in pair]  # interleaved scripts
    totals = evaluate_perplexity(llama, tokenizer, iter(docs), max_length=16, stride=8, batch_size=3)
    assert set(totals) == {"Latin", "Devanagari"}
    for script, group in (("Latin", ENGLISH), ("Devanagari", HINDI * 2)):
        t = totals[script]
        assert t.documents == len(group)
        assert t.bytes == sum(len(d.encode("utf-8")) for d in group)
        assert t.tokens == sum(len(doc_ids(tokenizer, d)) - 1 for d in group)
        assert t.bits_per_byte == pytest.approx(t.nll / math.log(2) / t.bytes)
    alone = overall(evaluate_perplexity(llama, tokenizer, docs, max_length=16, stride=8, batch_size=3))
    summed = overall(totals)
    assert (summed.tokens, summed.bytes, summed.documents) == (alone.tokens, alone.bytes, alone.documents)
    assert summed.nll == pytest.approx(alone.nll, rel=1e-6)

    report = perplexity_report(totals)
    assert set(report) == {"perplexity", "bits_per_byte", "tokens", "bytes", "documents", "by_script"}
    assert report["tokens"] == summed.tokens and report["documents"] == len(docs)
    assert report["perplexity"] == pytest.approx(math.exp(summed.nll / summed.tokens))
    assert report["bits_per_byte"] == pytest.approx(summed.nll / math.log(2) / summed.bytes)
    assert sum(row["bytes"] for row in report["by_script"].values()) == report["bytes"]
    tokens = [row["tokens"] for row in report["by_script"].values()]
    assert tokens == sorted(tokens, reverse=True)  # the biggest share first


def test_leaves_the_model_as_it_found_it_and_rejects_bad_sizes(
    llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    llama.train()
    try:
        evaluate_perplexity(llama, tokenizer, ["Rain fell."])
        assert llama.training
    finally:
        llama.eval()
    bad_sizes: list[dict[str, Any]] = [
        {"max_length": CONTEXT + 1},
        {"max_length": 1},
        {"stride": CONTEXT + 1},
        {"batch_size": 0},
    ]
    for kwargs in bad_sizes:
        with pytest.raises(UserError):
            evaluate_perplexity(llama, tokenizer, ["Rain fell."], **kwargs)
    with pytest.raises(UserError, match="no document"):
        perplexity_report(evaluate_perplexity(llama, tokenizer, []))


def test_totals_arithmetic() -> None:
    t = NLLTotals(nll=10 * math.log(2), tokens=10, bytes=20, documents=1)
    assert t.perplexity == pytest.approx(2.0)
    assert t.bits_per_byte == pytest.approx(0.5)
    t.add(NLLTotals(nll=0.0, tokens=10, bytes=20, documents=2))
    assert (t.tokens, t.bytes, t.documents) == (20, 40, 3)
    assert t.perplexity == pytest.approx(math.sqrt(2))
    assert math.isnan(NLLTotals().perplexity) and math.isnan(NLLTotals().bits_per_byte)
    assert NLLTotals(nll=1e6, tokens=1).perplexity == math.inf


# --- plot ---------------------------------------------------------------------------------------------


def write_log(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, object]] = []
    for step in range(10, 210, 10):
        entries.append(
            {
                "step": step,
                "loss": 6.0 - step / 50,
                "lr": 3e-4,
                "tokens_per_second": 4500.0,
                "epoch": step / 100,
            }
        )
        if step % 50 == 0:
            entries.append({"step": step, "eval_loss": 5.0 - step / 100, "eval_perplexity": math.exp(5 - step / 100)})
    entries.append({"step": 200, "eval_loss": 3.0})  # no eval_perplexity: computed from the loss
    entries.append({"step": 200, "train_runtime": 12.5, "train_loss": 4.0})  # the trainer's summary
    text = "\n".join(json.dumps(e) for e in entries)
    (run_dir / "train_log.jsonl").write_text(text + "\n\n", encoding="utf-8")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 0 and pixels.shape[1] > 0


def test_plot_writes_a_png_of_loss_and_perplexity(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_log(run)
    curves = read_run_log(run / "train_log.jsonl")
    assert len(curves.loss) == 20 and len(curves.perplexity) == 5
    assert curves.perplexity[-1] == (200, pytest.approx(math.exp(3.0)))
    out = plot_run(run)
    assert out == run / "training.png"
    assert_png(out)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    custom = plot_run(run, tmp_path / "figs" / "curves.png")
    assert_png(custom)


def test_plot_errors_are_for_people(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        plot_run(tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="no training log"):
        plot_run(tmp_path / "run")
    (tmp_path / "run" / "train_log.jsonl").write_text('{"step": 0, "train_runtime": 1.0}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no training or evaluation entries"):
        plot_run(tmp_path / "run")
    (tmp_path / "run" / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2,\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        plot_run(tmp_path / "run")


# --- the command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(
    tmp_path_factory: pytest.TempPathFactory, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> Path:
    path = tmp_path_factory.mktemp("model")
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_perplexity_json_and_table(
    tmp_path: Path, model_dir: Path, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    data = tmp_path / "eval.txt"
    data.write_text("\n".join(ENGLISH + HINDI) + "\n", encoding="utf-8")
    runner = CliRunner()
    args = ["perplexity", "--model", str(model_dir), "--data", str(data), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"perplexity", "bits_per_byte", "tokens", "bytes", "documents", "by_script"}
    assert set(report["by_script"]) == {"Latin", "Devanagari"}
    assert report["documents"] == len(ENGLISH + HINDI)
    # The saved model scores as the one in memory did.
    expected = perplexity_report(evaluate_perplexity(llama, tokenizer, ENGLISH + HINDI))
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)

    limited = runner.invoke(app, [*args, "--json", "--max-docs", "2", "--max-length", "16", "--stride", "4"])
    assert limited.exit_code == 0, limited.output
    assert json.loads(limited.stdout)["documents"] == 2

    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "bits/byte" in table.stdout and "Devanagari" in table.stdout


def save_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter of the model folder `base` with random (non-zero) B factors, so that it changes the logits."""
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    peft_model.save_pretrained(str(out))
    return out


def test_cli_perplexity_with_an_adapter_is_that_of_base_plus_adapter(
    tmp_path: Path, model_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    data = tmp_path / "eval.txt"
    data.write_text("\n".join(ENGLISH + HINDI) + "\n", encoding="utf-8")
    args = ["perplexity", "--model", str(model_dir), "--data", str(data), "--device", "cpu", "--json"]
    base = CliRunner().invoke(app, args)
    adapted = CliRunner().invoke(app, [*args, "--adapter", str(adapter)])
    assert base.exit_code == 0 and adapted.exit_code == 0, (base.output, adapted.output)
    with_adapter = json.loads(adapted.stdout)["perplexity"]
    assert abs(with_adapter / json.loads(base.stdout)["perplexity"] - 1) > 0.01
    # The same figure as the adapter applied by plain peft.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()
    expected = perplexity_report(evaluate_perplexity(reference, tokenizer, ENGLISH + HINDI))
    assert with_adapter == pytest.approx(expected["perplexity"], rel=1e-5)


def test_cli_perplexity_with_an_adapter_for_another_base_exits_2_with_one_line(
    tmp_path: Path, model_dir: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from seshu.cli import main

    narrow = tmp_path / "narrow"
    config = build_config(
        "llama",
        "tiny",
        vocab_size=len(tokenizer),
        context_length=CONTEXT,
        special_token_ids={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        overrides={"hidden_size": 32, "intermediate_size": 86},
    )
    build_model(config, seed=0).save_pretrained(str(narrow))
    tokenizer.save_pretrained(str(narrow))
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    data = tmp_path / "eval.txt"
    data.write_text("Rain fell.\n", encoding="utf-8")
    argv = ["seshu", "eval", "perplexity", "--model", str(narrow), "--data", str(data), "--adapter", str(adapter)]
    monkeypatch.setattr("sys.argv", [*argv, "--device", "cpu"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "q_proj.lora_A.weight has shape [4, 64] but the base model needs [4, 32]" in lines[0]


def test_cli_errors(tmp_path: Path) -> None:
    data = tmp_path / "eval.txt"
    data.write_text("hello\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["perplexity", "--model", str(tmp_path / "missing"), "--data", str(data)])
    assert isinstance(result.exception, UserError) and "model directory not found" in str(result.exception)
    with pytest.raises(UserError):
        perplexity_from_paths(str(tmp_path / "missing"), [str(data)], max_docs=0)
    result = runner.invoke(app, ["plot", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "no training log" in str(result.exception)


def test_cli_plot(tmp_path: Path) -> None:
    write_log(tmp_path / "run")
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "p.png") in result.stdout
    assert_png(tmp_path / "p.png")


def test_cli_perplexity_of_a_text_file_scores_it_as_one_stream(
    tmp_path: Path, model_dir: Path, llama: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """A book or a play (blank lines between paragraphs) is one document scored with sliding windows, newlines
    included; `--text-unit line` scores it line by line from each line's first token."""
    text = "\n\n".join(ENGLISH) + "\n"
    data = tmp_path / "book.txt"
    data.write_text(text, encoding="utf-8")
    args = ["perplexity", "--model", str(model_dir), "--data", str(data), "--device", "cpu", "--json"]
    whole = CliRunner().invoke(app, args)
    assert whole.exit_code == 0, whole.output
    report = json.loads(whole.stdout)
    assert report["documents"] == 1 and report["bytes"] == len(text.strip().encode())
    expected = perplexity_report(evaluate_perplexity(llama, tokenizer, [text.strip()]))
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    by_line = CliRunner().invoke(app, [*args, "--text-unit", "line"])
    assert by_line.exit_code == 0, by_line.output
    assert json.loads(by_line.stdout)["documents"] == len(ENGLISH)
