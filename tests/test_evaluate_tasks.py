"""Generation tasks: scorers against known values, records and their errors, prompts, batched greedy generation,
answer-only perplexity, and `seshu eval generate` (translation on the shared Hindi-English pairs when present)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import save_bpe_tokenizer
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from seshu.cli.evaluate import app
from seshu.errors import UserError
from seshu.evaluate.generation_eval import (
    answer_nll,
    build_prompts,
    evaluate_generation,
    finish_prediction,
    generate_all,
    generation_eval_from_paths,
)
from seshu.evaluate.tasks import (
    TASKS,
    TaskRecord,
    check_template,
    normalize_answer,
    qa_scores,
    read_line_pairs,
    render_prompt,
    translation_scores,
)
from seshu.models.registry import build_config, build_model

CORPUS = [
    "Translate to Hindi: the river carries songs to the sea.",
    "Question: what is the capital of France? Answer: Paris",
    "नमस्ते दुनिया, आज मौसम बहुत अच्छा है। गाँव के लोग नदी के किनारे गीत गाते हैं।",
] * 4
HINDI_ENGLISH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hindi-english"


# --- scorers ------------------------------------------------------------------------------------------------


def test_translation_scores_known_values() -> None:
    same = translation_scores(["the cat sat on the mat", "नमस्ते दुनिया"], ["the cat sat on the mat", "नमस्ते दुनिया"])
    assert same["chrf"] == pytest.approx(100) and same["bleu"] == pytest.approx(100)
    disjoint = translation_scores(["xyz"], ["abc"])
    assert disjoint == {"chrf": 0.0, "bleu": 0.0}
    # One word wrong of five, same length: precisions 4/5, 3/4, 2/3, 1/2 and no brevity penalty.
    partial = translation_scores(["a b c d e"], [["a b c d f"]])
    assert partial["bleu"] == pytest.approx(100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    assert 0 < partial["chrf"] < 100
    # Hypotheses may have different numbers of references (COCO's images have 5 to 7 captions); the best counts.
    varied = translation_scores(["a b c d e", "w x y z"], [["a b c d e"], ["q", "w x y z"]])
    assert varied == pytest.approx({"chrf": 100, "bleu": 100})
    with pytest.raises(ValueError, match="at least one reference"):
        translation_scores(["a", "b"], [["a"], []])


def test_qa_scores_hand_computed() -> None:
    predictions = ["The Eiffel Tower!", "in Paris France", "blue", "दिल्ली।"]
    answers = [["Eiffel Tower"], ["Paris", "Paris, France"], ["red"], ["दिल्ली"]]
    scores = qa_scores(predictions, answers)
    # EM: 1, 0, 0, 1 (the danda is punctuation). F1: 1; best of 0.5 (paris) and 0.8 (paris france); 0; 1.
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 1) / 4)
    assert normalize_answer("  The  Cat, a DOG. ") == "cat dog"
    assert qa_scores([""], [["the"]]) == {"exact_match": 100.0, "f1": 100.0}  # both normalise to nothing


def test_finish_prediction() -> None:
    assert finish_prediction("\n  Paris\nQuestion: next", first_line=True) == "Paris"
    assert finish_prediction(" line one\nline two \n", first_line=False) == "line one\nline two"


# --- records and prompts ------------------------------------------------------------------------------------


def test_records_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "Who?", "answers": {"text": ["Ada", "Ada Lovelace"], "answer_start": [0, 0]}, "context": "Ada."},
    ]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = list(TASKS["qa"].read(str(good)))
    assert [r.references for r in records] == [["Paris"], ["Ada", "Ada Lovelace"]]
    assert records[1].fields["context"] == "Ada." and records[0].fields["context"] == ""

    bad = tmp_path / "mt.jsonl"
    bad.write_text('{"source": "hi", "target": "नमस्ते"}\n\n{"source": "bye"}\n')
    with pytest.raises(UserError, match=r"mt\.jsonl, record 2 \(line 3\): no 'target' field"):
        list(TASKS["translation"].read(str(bad)))
    bad.write_text('{"source": "hi", "target": "नमस्ते"}\n{"source": \n')
    with pytest.raises(UserError, match=r"mt\.jsonl, line 2: malformed JSON"):
        list(TASKS["translation"].read(str(bad)))
    bad.write_text('{"question": "q", "answers": []}\n')
    with pytest.raises(UserError, match=r"record 1 \(line 1\): 'answers' must be a non-empty list"):
        list(TASKS["qa"].read(str(bad)))


def test_line_pairs(tmp_path: Path) -> None:
    src, tgt = tmp_path / "a.en", tmp_path / "a.hi"
    src.write_text("one\ntwo\n\nthree")  # no final newline, a blank line on both sides
    tgt.write_text("एक\nदो\n\nतीन\n")
    records = read_line_pairs(src, tgt)
    assert [(r.fields["source"], r.references) for r in records] == [
        ("one", ["एक"]),
        ("two", ["दो"]),
        ("three", ["तीन"]),
    ]
    assert records[2].where == f"{src}, line 4"
    tgt.write_text("एक\nदो\n")
    with pytest.raises(UserError, match=r"a\.en has 4 lines but .*a\.hi has 2"):
        read_line_pairs(src, tgt)
    tgt.write_text("एक\n\n\nतीन\n")
    with pytest.raises(UserError, match=r"a\.hi, line 2: empty line"):
        read_line_pairs(src, tgt)


def test_prompt_templates() -> None:
    mt = TaskRecord("x", ["नमस्ते"], {"source": "hello"})
    assert render_prompt(TASKS["translation"], mt, None, {"target_lang": "Hindi"}) == "Translate to Hindi: hello\n"
    with pytest.raises(UserError, match=r"uses \{target_lang\}; give --target-lang"):
        render_prompt(TASKS["translation"], mt, None, {})
    qa = TaskRecord("x", ["Paris"], {"question": "Capital?", "context": ""})
    assert render_prompt(TASKS["qa"], qa, None, {}) == "Question: Capital?\nAnswer:"
    with_context = TaskRecord("x", ["Paris"], {"question": "Capital?", "context": "France..."})
    assert render_prompt(TASKS["qa"], with_context, None, {}).startswith("France...\n\nQuestion: Capital?")
    assert render_prompt(TASKS["qa"], qa, "Q: {question} A:", {}) == "Q: Capital? A:"
    check_template(TASKS["qa"], "{{literal}} {question}")
    with pytest.raises(UserError, match=r"uses \{source\}; the qa task knows \{context\}, \{question\}"):
        check_template(TASKS["qa"], "{source}")


# --- with a model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE of 320 tokens with the ChatML tokens but no chat template."""
    return save_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer"), vocab_size=320, chat_tokens=True)


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    # Untied embeddings: a random tied model just repeats the prompt's last token, whatever came before it, which
    # would hide padding mistakes from the batched-generation test.
    config = build_config(
        "llama",
        "tiny",
        vocab_size=len(tokenizer),
        context_length=256,
        special_token_ids=ids,
        overrides={"tie_word_embeddings": False},
    )
    out = tmp_path_factory.mktemp("llama")
    build_model(config, seed=0).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, PreTrainedTokenizerFast]:
    from seshu.generate import load_for_generation

    return load_for_generation(str(model_dir), device="cpu")


def test_batched_generation_equals_one_at_a_time(loaded: tuple[Any, PreTrainedTokenizerFast]) -> None:
    model, tokenizer = loaded
    prompts = ["Question: what is the capital?", "नमस्ते", "Translate to Hindi: the river carries songs.", "a"]
    batched, cut = generate_all(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single, _ = generate_all(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single and cut == 0
    assert len(set(batched)) == len(prompts)  # each continuation depends on its own prompt


def test_chat_prompts(loaded: tuple[Any, PreTrainedTokenizerFast]) -> None:
    _, tokenizer = loaded
    record = TaskRecord("x", ["नमस्ते"], {"source": "hello"})
    plain = build_prompts(TASKS["translation"], [record], tokenizer, values={"target_lang": "Hindi"})
    chat = build_prompts(TASKS["translation"], [record], tokenizer, values={"target_lang": "Hindi"}, chat=True)
    assert plain == ["Translate to Hindi: hello\n"]
    assert chat[0].startswith("<|im_start|>user\nTranslate to Hindi: hello<|im_end|>")
    assert chat[0].endswith("<|im_start|>assistant\n")


def test_answer_only_perplexity_matches_a_direct_computation(loaded: tuple[Any, PreTrainedTokenizerFast]) -> None:
    from seshu.chat import ensure_chat_template
    from seshu.data.instructions import tokenize_conversation

    model, tokenizer = loaded
    assert not ensure_chat_template(tokenizer)  # the ChatML tokens exist, so the vocabulary stays
    conversations = [
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "नमस्ते दुनिया"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ],
    ]
    totals = answer_nll(model, tokenizer, conversations, batch_size=2)  # padded together
    nll, tokens = 0.0, 0
    for messages in conversations:
        encoded = tokenize_conversation(tokenizer, messages)
        ids, mask = torch.tensor([encoded["input_ids"]]), torch.tensor(encoded["assistant_masks"])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        picked = -logprobs.gather(1, ids[0, 1:, None])[:, 0]
        nll += float(picked[mask[1:] == 1].sum())
        tokens += int(mask[1:].sum())
    assert totals.tokens == tokens > 0
    assert totals.nll == pytest.approx(nll, rel=1e-5)
    assert math.isfinite(totals.perplexity) and totals.perplexity > 1


def test_evaluate_generation_qa(loaded: tuple[Any, PreTrainedTokenizerFast]) -> None:
    model, tokenizer = loaded
    records = [TaskRecord("x", ["Paris"], {"question": "Capital of France?", "context": ""})] * 3
    result = evaluate_generation(model, tokenizer, TASKS["qa"], records, max_new_tokens=6, chat=False)
    assert set(result.scores) == {"exact_match", "f1"}
    assert all("\n" not in p for p in result.predictions)  # one-line answers
    assert next(result.rows()) == {
        "prompt": "Question: Capital of France?\nAnswer:",
        "prediction": result.predictions[0],
        "references": ["Paris"],
    }


# --- the command --------------------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["generate", *args])


@pytest.mark.skipif(not (HINDI_ENGLISH / "samanantar_sample.en").is_file(), reason="shared Hindi-English data absent")
def test_cli_translation_on_the_shared_pairs(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "outputs.jsonl"
    result = invoke(
        "--model", str(model_dir), "--task", "translation", "--device", "cpu",
        "--src-file", str(HINDI_ENGLISH / "samanantar_sample.en"),
        "--tgt-file", str(HINDI_ENGLISH / "samanantar_sample.hi"),
        "--target-lang", "Hindi", "--max-records", "4", "--max-new-tokens", "8", "--json", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "translation" and report["records"] == 4
    assert set(report["scores"]) == {"chrf", "bleu"}
    assert all(0 <= v <= 100 for v in report["scores"].values())
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    hindi = (HINDI_ENGLISH / "samanantar_sample.hi").read_text(encoding="utf-8").splitlines()
    assert [r["reference"] for r in rows] == hindi[:4]
    assert all(set(r) == {"prompt", "prediction", "reference"} for r in rows)
    assert rows[0]["prompt"].startswith("Translate to Hindi: ")


def test_cli_qa_and_instruct(model_dir: Path, tmp_path: Path) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Capital of France?", "answers": ["Paris", "paris"]}) + "\n")
    out = tmp_path / "qa-out.jsonl"
    result = invoke("--model", str(model_dir), "--task", "qa", "--data", str(qa), "--max-new-tokens", "4", "--json",
                    "--out", str(out), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["scores"]) == {"exact_match", "f1"}
    assert json.loads(out.read_text())["references"] == ["Paris", "paris"]

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        json.dumps({"instruction": "Say hello in Hindi.", "input": "", "output": "नमस्ते"}) + "\n"
        + json.dumps({"instruction": "Name a river.", "input": "", "output": "The Ganga."}) + "\n"
    )  # fmt: skip
    result = invoke("--model", str(model_dir), "--task", "instruct", "--data", str(alpaca), "--max-new-tokens", "4",
                    "--json", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["records"] == 2 and report["scores"]["perplexity"] > 1 and report["scores"]["answer_tokens"] > 2


def test_an_adapter_is_evaluated_on_top_of_the_model(model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    common: dict[str, Any] = {"data": str(data), "max_new_tokens": 6, "device": "cpu", "first_line": False}
    plain = generation_eval_from_paths(str(model_dir), "qa", **common)
    adapted = generation_eval_from_paths(str(model_dir), "qa", adapter=str(tmp_path / "adapter"), **common)
    assert plain.predictions != adapted.predictions


def test_cli_input_errors(model_dir: Path, tmp_path: Path) -> None:
    src, tgt = tmp_path / "a.en", tmp_path / "a.hi"
    src.write_text("one\ntwo\nthree\n")
    tgt.write_text("एक\n")
    base = ["--model", str(model_dir), "--device", "cpu"]
    result = invoke(
        *base, "--task", "translation", "--src-file", str(src), "--tgt-file", str(tgt), "--target-lang", "hi"
    )
    assert isinstance(result.exception, UserError) and "has 3 lines but" in str(result.exception)
    assert "has 1 line;" in str(result.exception)
    for args, message in [
        (["--task", "summarise", "--data", str(src)], "unknown task 'summarise'"),
        (["--task", "qa"], "give the evaluation records with --data"),
        (["--task", "qa", "--src-file", str(src), "--tgt-file", str(tgt)], "make translation records"),
        (["--task", "translation", "--src-file", str(src)], "go together"),
        (["--task", "instruct", "--data", str(src), "--prompt-template", "{x}"], "drop --prompt-template"),
    ]:
        result = invoke(*base, *args)
        assert isinstance(result.exception, UserError) and message in str(result.exception), (args, result.output)


def test_missing_target_language_fails_before_the_model_loads(tmp_path: Path) -> None:
    data = tmp_path / "mt.jsonl"
    data.write_text(json.dumps({"source": "hello", "target": "नमस्ते"}) + "\n")
    with pytest.raises(UserError, match="give --target-lang"):
        generation_eval_from_paths(str(tmp_path / "no-model-here"), "translation", data=str(data))


def test_defaults_fit_a_short_context_and_a_pretrained_model_is_prompted_without_chat(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """128 new tokens would leave no room for a prompt in a 128-token context; a model whose card says it was
    only pretrained is prompted with plain text even though its tokenizer carries a chat template."""
    from seshu.chat import DEFAULT_CHAT_TEMPLATE
    from seshu.evaluate.generation_eval import default_max_new_tokens, instruction_tuned
    from seshu.hub.card import render_card

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    config = build_config("llama", "tiny", vocab_size=len(tokenizer), context_length=128, special_token_ids=ids)
    out = tmp_path / "pretrained"
    model = build_model(config, seed=0)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(render_card("m", {"seshu": {"command": "pretrain"}}, "x"), encoding="utf-8")

    assert default_max_new_tokens(model) == 64
    assert instruction_tuned(str(out), None) is False
    assert instruction_tuned(str(out), "some-adapter") is None
    records = tmp_path / "qa.jsonl"
    records.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n", encoding="utf-8")
    log = tmp_path / "out.jsonl"
    result = invoke("--model", str(out), "--task", "qa", "--data", str(records), "--device", "cpu", "--out", str(log))
    assert result.exit_code == 0, result.output
    prompt = json.loads(log.read_text(encoding="utf-8"))["prompt"]
    assert "<|im_start|>" not in prompt and prompt.startswith("Question: Capital of France?")
    chat = invoke("--model", str(out), "--task", "qa", "--data", str(records), "--device", "cpu", "--chat",
                  "--max-new-tokens", "4", "--out", str(log))  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert json.loads(log.read_text(encoding="utf-8"))["prompt"].startswith("<|im_start|>user")
