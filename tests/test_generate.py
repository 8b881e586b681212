"""Generation, streaming, chat and the `seshu generate` / `seshu chat` commands, on every registered arch."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from helpers import save_bpe_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

import seshu.generate as gen
from seshu.chat import DEFAULT_CHAT_TEMPLATE, chat_prompt, encode_prompt, end_of_turn_ids
from seshu.cli.generate import register
from seshu.errors import UserError
from seshu.generate import (
    SamplingOptions,
    chat_loop,
    generate_text,
    load_for_generation,
)
from seshu.models.registry import ARCHS, build_config, build_model

CORPUS = [
    "hello world, the cat sat on the mat.",
    "a small model can still be a useful one.",
    "नमस्ते दुनिया, आज मौसम अच्छा है।",  # multi-byte characters, so streaming must hold back partial ones
] * 5
# Few tokens keep the state-space models (whose CPU scans are reference code) quick.
NEW_TOKENS = 10
SAMPLED = SamplingOptions(max_new_tokens=NEW_TOKENS, seed=0)
GREEDY = SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~300-token byte-level BPE tokenizer with ChatML tokens but no chat template of its own."""
    return save_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer"), vocab_size=300, chat_tokens=True)


def _save_model(arch: str, tokenizer_dir: Path, out: Path, **overrides: Any) -> Path:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    config = build_config(
        arch, "tiny", vocab_size=len(tokenizer), context_length=128, special_token_ids=ids, overrides=overrides
    )
    build_model(config, seed=0).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(
    request: pytest.FixtureRequest, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any, PreTrainedTokenizerBase]:
    path = _save_model(request.param, tokenizer_dir, tmp_path_factory.mktemp(request.param))
    model, tokenizer = load_for_generation(str(path), device="cpu")
    return path, model, tokenizer


@pytest.fixture(scope="module")
def llama_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_model("llama", tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture()
def generate_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Records the id tensors every `model.generate` call returns."""
    outputs: list[torch.Tensor] = []
    real = GenerationMixin.generate

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        outputs.append(torch.as_tensor(out))
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    yield outputs


def _reference_greedy(model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    ids = encode_prompt(tokenizer, prompt)
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return str(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))


# --- generation on every arch -------------------------------------------------------------------------


def test_sampling_streams_and_is_seeded(arch_model: tuple[Path, Any, Any], generate_spy: list[torch.Tensor]) -> None:
    _, model, tokenizer = arch_model
    pieces: list[str] = []
    text = generate_text(model, tokenizer, "hello world", SAMPLED, pieces.append)
    assert text  # a random model writes random bytes, but it writes something
    assert "".join(pieces) == text
    assert generate_text(model, tokenizer, "hello world", SAMPLED) == text  # same seed, same text
    assert torch.equal(generate_spy[0], generate_spy[1])
    generate_text(model, tokenizer, "hello world", SamplingOptions(max_new_tokens=NEW_TOKENS, seed=1))
    # Ids, not text: random bytes from a random model can all decode to the same U+FFFD characters.
    assert not torch.equal(generate_spy[0], generate_spy[2])


def test_greedy_equals_plain_generate_within_max_new_tokens(
    arch_model: tuple[Path, Any, Any], generate_spy: list[torch.Tensor]
) -> None:
    _, model, tokenizer = arch_model
    prompt_len = len(encode_prompt(tokenizer, "hello"))
    pieces: list[str] = []
    text = generate_text(model, tokenizer, "hello", GREEDY, pieces.append)
    new = generate_spy[-1][0, prompt_len:].tolist()
    assert text == _reference_greedy(model, tokenizer, "hello") == "".join(pieces)
    assert len(new) == NEW_TOKENS or (len(new) < NEW_TOKENS and new[-1] == tokenizer.eos_token_id)
    generate_text(model, tokenizer, "hello", SamplingOptions(max_new_tokens=1))
    assert generate_spy[-1].shape[1] == prompt_len + 1


def test_chat_two_turns_and_reset(arch_model: tuple[Path, Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, tokenizer = arch_model
    prompts: list[str] = []
    real = gen.generate_text

    def recording(model: Any, tokenizer: Any, prompt: str, *args: Any, **kwargs: Any) -> str:
        prompts.append(prompt)
        return real(model, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_text", recording)
    lines = iter(["hello", "  ", "and the cat?", "/reset", "again", "/exit", "never read"])
    written: list[str] = []
    options = SamplingOptions(max_new_tokens=4)
    history = chat_loop(model, tokenizer, options, lambda: next(lines), written.append, system="Be brief.")

    assert len(prompts) == 3
    assert prompts[0] == chat_prompt(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    )
    assert "<|im_start|>user\nhello<|im_end|>" in prompts[1]  # the first turn is remembered...
    assert "and the cat?" in prompts[1]
    assert "hello" not in prompts[2]  # ...until /reset
    assert "Be brief." in prompts[2]  # which keeps the system message
    assert "(conversation cleared)\n" in written
    assert next(lines) == "never read"  # /exit stopped reading
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "again"
    output = "".join(written)
    assert history[2]["content"] in output


def test_streaming_holds_back_partial_characters(tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    text = "hi नमस्ते, the cat."
    # One byte per token: each Devanagari letter (3 bytes) arrives in pieces that do not decode alone.
    words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    vocab = tokenizer.get_vocab()
    ids = [vocab[byte] for word, _ in words for byte in word]
    assert tokenizer.decode(ids) == text
    pieces: list[str] = []
    streamer = gen._TextPieces(tokenizer, pieces.append)
    streamer.put(torch.tensor([[tokenizer.bos_token_id]]))  # the prompt, which is not streamed
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == text
    assert len(pieces) > 5 and not any("\ufffd" in piece for piece in pieces)


# --- chat details ---------------------------------------------------------------------------------------


def _tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))


def test_chat_prompt_falls_back_to_chatml(tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    assert not tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt(tokenizer, messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # the fallback is exactly Seshu's default template
    assert chat_prompt(tokenizer, messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompt_uses_the_tokenizers_own_template(tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>"
    assert chat_prompt(tokenizer, [{"role": "user", "content": "hi"}]) == "[user] hi\n>"


def test_a_template_that_fails_is_a_user_error(tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match="roles must alternate"):
        chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])


def test_chat_stops_at_the_end_of_turn_token(
    tokenizer_dir: Path, tmp_path: Path, generate_spy: list[torch.Tensor]
) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id, im_end]
    # Phi's output layer has a bias: raising <|im_end|>'s makes it the answer's first token.
    model, tokenizer = load_for_generation(str(_save_model("phi", tokenizer_dir, tmp_path)), device="cpu")
    with torch.no_grad():
        model.lm_head.bias[im_end] = 100.0
    lines = iter(["hi"])
    history = chat_loop(model, tokenizer, GREEDY, lambda: next(lines, None), lambda _: None)
    assert generate_spy[-1][0, -1].item() == im_end
    prompt_len = len(encode_prompt(tokenizer, chat_prompt(tokenizer, history[:1])))
    assert generate_spy[-1].shape[1] == prompt_len + 1  # stopped right there, not at max_new_tokens
    assert history[-1] == {"role": "assistant", "content": ""}


def test_chat_drops_old_turns_to_fit_the_context(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = load_for_generation(str(llama_dir), device="cpu")
    monkeypatch.setattr(model.config, "max_position_embeddings", 60)
    lines = iter(["hello world " * 3, "the cat sat on the mat " * 2, "a small model"])
    written: list[str] = []
    history = chat_loop(model, tokenizer, SamplingOptions(max_new_tokens=8), lambda: next(lines, None), written.append)
    assert "(older turns dropped to fit the model's context)\n" in written
    assert history[0]["role"] == "user"
    assert history[-2]["content"] == "a small model"
    assert len(encode_prompt(tokenizer, chat_prompt(tokenizer, history[:-1]))) <= 60 - 8


def test_generation_ends_at_the_models_context(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch, generate_spy: list[torch.Tensor]
) -> None:
    model, tokenizer = load_for_generation(str(llama_dir), device="cpu")
    monkeypatch.setattr(model.config, "max_position_embeddings", 24)
    options = SamplingOptions(max_new_tokens=128, seed=0)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[tokenizer.eos_token_id] = -100.0  # never stops early
    generate_text(model, tokenizer, "hello world", options)
    assert generate_spy[-1].shape[1] == 24  # prompt and answer fill the context, no more
    with pytest.raises(UserError, match="no room for an answer"):
        generate_text(model, tokenizer, "hello world " * 20, options)


def test_prompt_starts_with_one_bos(tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    bos = tokenizer.bos_token_id
    ids = encode_prompt(tokenizer, "hello")
    assert ids[0] == bos and ids.count(bos) == 1
    assert encode_prompt(tokenizer, "<s>hello") == ids  # a template that writes bos itself: not doubled
    assert encode_prompt(tokenizer, "") == [bos]
    assert tokenizer.eos_token_id not in ids


# --- adapters ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # LoRA starts as a no-op (B = 0); random B makes the adapter change the output.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(out))
    return out


def test_adapter_is_applied(llama_dir: Path, adapter_dir: Path) -> None:
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    model, tokenizer = load_for_generation(str(llama_dir), str(adapter_dir), device="cpu")
    assert isinstance(model, PeftModel)
    text = generate_text(model, tokenizer, "hello", GREEDY)

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir)), str(adapter_dir))
    reference.eval()
    assert text == _reference_greedy(reference, tokenizer, "hello")
    base, _ = load_for_generation(str(llama_dir), device="cpu")
    assert generate_text(base, tokenizer, "hello", GREEDY) != text


def test_load_adapter_on_a_loaded_base_equals_plain_peft(llama_dir: Path, adapter_dir: Path) -> None:
    from seshu.merge.adapters import load_adapter

    ids = torch.tensor([[1, 20, 30, 40, 50]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir)), str(adapter_dir))
    model = load_adapter(AutoModelForCausalLM.from_pretrained(str(llama_dir)), adapter_dir, str(llama_dir))
    assert not model.training
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
        assert not torch.allclose(model.unload()(ids).logits, expected)  # the base again, without the adapter


def test_an_adapter_with_its_own_tokenizer_brings_its_chat_template(
    llama_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(llama_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(str(tmp_path / "adapter"))
    _, loaded = load_for_generation(str(llama_dir), str(tmp_path / "adapter"), device="cpu")
    assert chat_prompt(loaded, [{"role": "user", "content": "hi"}]) == "hi"


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model directory not found"):
        load_for_generation(str(tmp_path / "nope"))


def test_bad_adapter_dirs(llama_dir: Path, adapter_dir: Path, tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(UserError, match="adapter directory not found"):
        load_for_generation(str(llama_dir), str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no adapter_config\.json"):
        load_for_generation(str(llama_dir), str(empty))
    (empty / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (empty / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"no adapter_model.safetensors \(only adapter_model.bin"):
        load_for_generation(str(llama_dir), str(empty))
    # A llama adapter on a Mamba model: refused by the base class it records.
    mamba = _save_model("mamba", tokenizer_dir, tmp_path / "mamba")
    with pytest.raises(UserError, match=r"trained on a LlamaForCausalLM, but \S+ is a MambaForCausalLM"):
        load_for_generation(str(mamba), str(adapter_dir), device="cpu")


def test_an_adapter_for_a_base_of_another_width_is_one_line_naming_the_tensor(
    adapter_dir: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    narrow = _save_model("llama", tokenizer_dir, tmp_path / "narrow", hidden_size=32, intermediate_size=86)
    with pytest.raises(UserError) as info:
        load_for_generation(str(narrow), str(adapter_dir), device="cpu")
    message = str(info.value)
    assert "q_proj.lora_A.weight has shape [4, 64] but the base model needs [4, 32]" in message, message
    assert "\n" not in message


def test_oversized_adapter_files_are_refused_before_they_are_read(
    llama_dir: Path, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seshu.merge import adapters

    monkeypatch.setattr(adapters, "load_file", lambda *a, **k: pytest.fail("read the weights"))
    monkeypatch.setattr(adapters, "_read_config_json", lambda *a, **k: pytest.fail("read the config"))
    monkeypatch.setattr("seshu.models.loading.load_causal_lm", lambda *a, **k: pytest.fail("loaded the model first"))
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    monkeypatch.setattr(adapters, "MAX_WEIGHTS_BYTES", size - 1)
    expected = rf"adapter_model\.safetensors: is {size:,} bytes, over the limit of {size - 1:,} bytes"
    with pytest.raises(UserError, match=expected):
        load_for_generation(str(llama_dir), str(adapter_dir), device="cpu")
    # A caller's own, smaller limit (the federation's policy), and the config's limit.
    with pytest.raises(UserError, match=r"over the limit of 1,000 bytes"):
        adapters.read_adapter(adapter_dir, max_bytes=1000)
    monkeypatch.setattr(adapters, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(UserError, match=r"adapter_config\.json: is [\d,]+ bytes, over the limit of 10 bytes"):
        adapters.read_adapter(adapter_dir, max_bytes=size)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_new_tokens", 0, "max new tokens"),
        ("temperature", -0.1, "temperature"),
        ("top_p", 0.0, "top-p"),
        ("top_p", 1.5, "top-p"),
        ("top_k", -1, "top-k"),
        ("repetition_penalty", 0.0, "repetition penalty"),
    ],
)
def test_bad_sampling_options(field: str, value: Any, message: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(UserError, match=message):
        SamplingOptions(**kwargs)


def test_generation_config(tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(tokenizer_dir)
    sampled = SamplingOptions(temperature=0.7, top_p=0.9, top_k=20).generation_config(tokenizer)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, 0.7, 0.9, 20)
    assert sampled.eos_token_id == tokenizer.eos_token_id
    greedy = GREEDY.generation_config(tokenizer, [2, 5])
    assert greedy.do_sample is False and greedy.eos_token_id == [2, 5]
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert SAMPLED.generation_config(no_pad).pad_token_id == tokenizer.eos_token_id


# --- the commands -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_defaults_are_the_library_defaults() -> None:
    from seshu.cli.generate import chat_command, generate_command

    for command in (generate_command, chat_command):
        params = inspect.signature(command).parameters
        for field in dataclasses.fields(SamplingOptions):
            assert params[field.name].default.default == field.default, (command.__name__, field.name)


def test_cli_generate_streams_the_library_text(cli: typer.Typer, llama_dir: Path) -> None:
    args = ["generate", "--model", str(llama_dir), "--max-new-tokens", "8", "--device", "cpu", "--seed", "3"]
    result = CliRunner().invoke(cli, [*args, "--prompt", "hello"])
    assert result.exit_code == 0, result.output
    model, tokenizer = load_for_generation(str(llama_dir), device="cpu")
    expected = generate_text(model, tokenizer, "hello", SamplingOptions(max_new_tokens=8, seed=3))
    assert result.stdout == expected + "\n"

    from_stdin = CliRunner().invoke(cli, [*args, "--prompt", "-"], input="hello")
    assert from_stdin.exit_code == 0 and from_stdin.stdout == result.stdout


def test_cli_generate_with_adapter_greedy(cli: typer.Typer, llama_dir: Path, adapter_dir: Path) -> None:
    greedy = ["--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", str(NEW_TOKENS)]
    model_args = ["--model", str(llama_dir), "--adapter", str(adapter_dir), "--device", "cpu"]
    args = ["generate", *model_args, "--prompt", "hello", *greedy]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    model, tokenizer = load_for_generation(str(llama_dir), str(adapter_dir), device="cpu")
    assert result.stdout == generate_text(model, tokenizer, "hello", GREEDY) + "\n"


def test_cli_chat(cli: typer.Typer, llama_dir: Path) -> None:
    args = ["chat", "--model", str(llama_dir), "--system", "Be brief.", "--max-new-tokens", "5"]
    args += ["--device", "cpu"]
    result = CliRunner().invoke(cli, args, input="hi\n/reset\nhello again\n")
    assert result.exit_code == 0, result.output
    assert "(conversation cleared)" in result.stdout
    assert result.stdout.count("> ") >= 3  # one prompt per line read, plus the one that met end of input


def test_cli_bad_input_is_a_user_error(cli: typer.Typer, llama_dir: Path, tmp_path: Path) -> None:
    missing = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert isinstance(missing.exception, UserError)
    bad = CliRunner().invoke(cli, ["chat", "--model", str(llama_dir), "--temperature", "-1"])
    assert isinstance(bad.exception, UserError) and "temperature" in str(bad.exception)
    no_adapter = CliRunner().invoke(
        cli, ["generate", "--model", str(llama_dir), "--adapter", str(tmp_path / "nope"), "--prompt", "x"]
    )
    assert isinstance(no_adapter.exception, UserError)
