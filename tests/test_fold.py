"""`seshu adapters fold`: folded logits equal base + adapter (llama, Mixtral's fused experts, Mamba), the output
loads without Seshu or peft, its card records the check, and bad or hostile adapters fail before anything is
written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import save_bpe_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from seshu.cli.adapters import app
from seshu.errors import UserError
from seshu.hub.card import read_card_metadata
from seshu.io import sha256_file
from seshu.merge.adapters import check_adapter_tensors
from seshu.merge.fold import TOLERANCES, compare_logits, fold_adapter
from seshu.models.registry import ARCHS, build_config, build_model

CORPUS = ["the cat sat on the mat.", "a small model is still a model.", "नमस्ते दुनिया, आज मौसम अच्छा है।"] * 4
IDS = torch.tensor([[1, 40, 41, 42, 43, 60, 70, 80, 90, 100, 120, 130]])  # any ids below the vocabulary size
Q_LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer"), vocab_size=300, chat_tokens=False)


def save_base(arch: str, tokenizer_dir: Path, out: Path, **overrides: Any) -> Path:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    config = build_config(
        arch, "tiny", vocab_size=len(tokenizer), context_length=64, special_token_ids=ids, overrides=overrides
    )
    build_model(config, seed=0).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def save_adapter(base: Path, out: Path, config: LoraConfig) -> Path:
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
    # LoRA starts as a no-op (B = 0); a random B makes the adapter change the logits.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    )
    with torch.no_grad():
        return model.eval()(IDS).logits


def plain_logits(folder: Path) -> tuple[torch.Tensor, torch.dtype]:
    """Logits of a folded model loaded the plain way (no Seshu, no peft), computed in float32."""
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model.float().eval()(IDS).logits, dtype


@pytest.fixture(scope="module")
def llama(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = save_base("llama", tokenizer_dir, tmp_path_factory.mktemp("llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, save_adapter(base, tmp_path_factory.mktemp("llama-adapter"), config)


@pytest.fixture(scope="module")
def folded_f32(llama: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    base, adapter = llama
    out = tmp_path_factory.mktemp("folds") / "f32"
    return out, fold_adapter(str(base), str(adapter), out, dtype="float32")


# --- folding ------------------------------------------------------------------------------------------------


def test_float32_fold_equals_base_plus_adapter(llama: tuple[Path, Path], folded_f32: tuple[Path, Any]) -> None:
    base, adapter = llama
    out, report = folded_f32
    reference = peft_logits(base, adapter)
    logits, dtype = plain_logits(out)
    assert dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    # The adapter matters (so the equality above is not trivial), and the report saw the same.
    base_logits, _ = plain_logits(base)
    assert (base_logits - reference).abs().max() > 0.1
    assert report.check.max_abs_diff < 1e-5 and report.check.passed and report.check.adapter_effect > 0.01


def test_output_is_a_plain_safetensors_model_with_a_card(
    llama: tuple[Path, Path], folded_f32: tuple[Path, Any]
) -> None:
    base, adapter = llama
    out, report = folded_f32
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".partial"))] and not list(out.parent.glob(".*partial"))
    assert "adapter_config.json" not in names  # a standalone model, not an adapter
    assert not any("lora" in key for key in load_file(str(out / "model.safetensors")))
    meta = read_card_metadata(out / "README.md")["seshu"]
    assert meta["command"] == "adapters fold" and meta["dtype"] == "float32" and meta["base"] == str(base)
    sha = meta["adapter"]["sha256"]
    assert sha["adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
    assert sha["adapter_config.json"] == sha256_file(adapter / "adapter_config.json")
    assert meta["check"]["max_abs_diff"] == report.check.max_abs_diff
    assert meta["check"]["tolerance"] == TOLERANCES["float32"]
    assert "max_abs_diff" not in (out / "README.md").read_text().split("---")[-1]  # the body speaks prose


def test_bfloat16_fold_is_within_tolerance_and_replaces_an_earlier_fold(
    llama: tuple[Path, Path], folded_f32: tuple[Path, Any], tmp_path: Path
) -> None:
    base, adapter = llama
    out = tmp_path / "fold"
    shutil.copytree(folded_f32[0], out)  # an earlier fold at the same place is replaced, not refused
    report = fold_adapter(str(base), str(adapter), out, dtype="bfloat16")
    logits, dtype = plain_logits(out)
    assert dtype == torch.bfloat16
    diff = compare_logits([peft_logits(base, adapter)[0]], [logits[0]])
    assert diff.position_p90 <= TOLERANCES["bfloat16"]
    assert report.check.max_abs_diff > 0 and report.check.position_error_p90 <= TOLERANCES["bfloat16"]
    assert read_card_metadata(out / "README.md")["seshu"]["dtype"] == "bfloat16"


def test_mixtral_fused_experts_fold(tokenizer_dir: Path, tmp_path: Path) -> None:
    base = save_base("mixtral", tokenizer_dir, tmp_path / "base")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=list(ARCHS["mixtral"].lora_parameters),  # the experts' fused 3-D weights
    )
    adapter = save_adapter(base, tmp_path / "adapter", config)
    assert any("experts" in key for key in load_file(str(adapter / "adapter_model.safetensors")))
    fold_adapter(str(base), str(adapter), tmp_path / "out", dtype="float32")
    logits, _ = plain_logits(tmp_path / "out")
    torch.testing.assert_close(logits, peft_logits(base, adapter), atol=1e-5, rtol=1e-5)


def test_mamba_fold_and_a_dt_proj_adapter_that_cannot_fold(tokenizer_dir: Path, tmp_path: Path) -> None:
    base = save_base("mamba", tokenizer_dir, tmp_path / "base")
    good = save_adapter(base, tmp_path / "good", LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj"]))
    fold_adapter(str(base), str(good), tmp_path / "out", dtype="float32")
    logits, _ = plain_logits(tmp_path / "out")
    torch.testing.assert_close(logits, peft_logits(base, good), atol=1e-5, rtol=1e-5)

    # The CPU forward pass skips a LoRA on dt_proj, merge_and_unload folds it: the check must refuse it (exit 1).
    bad = save_adapter(base, tmp_path / "bad", LoraConfig(r=4, lora_alpha=8, target_modules=["dt_proj"]))
    args = [
        "fold",
        "--base",
        str(base),
        "--adapter",
        str(bad),
        "--out",
        str(tmp_path / "bad-out"),
        "--dtype",
        "float32",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "does not reproduce" in result.output and "nothing was written" in result.output
    assert not (tmp_path / "bad-out").exists()


def test_cli_fold_json(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    args = ["fold", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--dtype", "float16"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtype"] == "float16" and report["position_error_p90"] <= TOLERANCES["float16"]
    assert (tmp_path / "o" / "model.safetensors").is_file()


# --- bad input ----------------------------------------------------------------------------------------------


def test_adapter_for_another_base_names_the_tensor(
    llama: tuple[Path, Path], tokenizer_dir: Path, tmp_path: Path
) -> None:
    _, adapter = llama
    narrow = save_base("llama", tokenizer_dir, tmp_path / "narrow", hidden_size=32, intermediate_size=86)
    out = tmp_path / "sub" / "out"
    result = CliRunner().invoke(app, ["fold", "--base", str(narrow), "--adapter", str(adapter), "--out", str(out)])
    assert isinstance(result.exception, UserError)  # the entry point prints it as one line and exits with 2
    message = str(result.exception)
    assert Q_LORA_A in message and "[4, 64]" in message and "[4, 32]" in message and "\n" not in message
    assert not out.exists() and not out.parent.exists()


def test_entry_point_prints_one_line_and_exits_2(
    llama: tuple[Path, Path], tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from seshu.cli import main

    _, adapter = llama
    narrow = save_base("llama", tokenizer_dir, tmp_path / "narrow", hidden_size=32, intermediate_size=86)
    out = tmp_path / "out"
    argv = ["seshu", "adapters", "fold", "--base", str(narrow), "--adapter", str(adapter), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    capsys.readouterr()  # the progress bars of saving the narrow base
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and Q_LORA_A in lines[0]
    assert not out.exists()


def test_adapter_for_another_architecture(llama: tuple[Path, Path], tokenizer_dir: Path, tmp_path: Path) -> None:
    _, adapter = llama
    mixtral = save_base("mixtral", tokenizer_dir, tmp_path / "mixtral")
    with pytest.raises(UserError, match="trained on a LlamaForCausalLM"):
        fold_adapter(str(mixtral), str(adapter), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _corrupt(adapter: Path, dest: Path, how: str) -> Path:
    shutil.copytree(adapter, dest)
    weights, config = dest / "adapter_model.safetensors", dest / "adapter_config.json"
    tensors = load_file(str(weights))
    if how == "pickle only":
        weights.rename(dest / "adapter_model.bin")
    elif how == "no config":
        config.unlink()
    elif how == "bad json":
        config.write_text('{"peft_type": "LORA", ')
    elif how == "unknown field":
        config.write_text(json.dumps({**json.loads(config.read_text()), "use_magic": True}))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "nan":
        tensors[Q_LORA_A][0, 0] = float("nan")
        save_file(tensors, str(weights))
    elif how == "missing tensor":
        del tensors[Q_LORA_A]
        save_file(tensors, str(weights))
    elif how == "extra tensor":
        tensors[Q_LORA_A.replace("layers.0", "layers.7")] = tensors[Q_LORA_A].clone()
        save_file(tensors, str(weights))
    return dest


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("pickle only", r"no adapter_model\.safetensors \(only adapter_model\.bin: pickle"),
        ("no config", r"no adapter_config\.json"),
        ("bad json", r"not valid JSON \(line 1"),
        ("unknown field", "field 'use_magic' is unknown to LoraConfig"),
        ("truncated", "not a readable safetensors file"),
        ("nan", f"tensor {Q_LORA_A} holds NaN"),
        ("missing tensor", f"has no tensor {Q_LORA_A}"),
        ("extra tensor", "layers.7.self_attn.q_proj.lora_A.weight belongs to no module"),
    ],
)
def test_hostile_or_broken_adapters_are_refused(
    llama: tuple[Path, Path], tmp_path: Path, how: str, message: str
) -> None:
    base, adapter = llama
    broken = _corrupt(adapter, tmp_path / "adapter", how)
    with pytest.raises(UserError, match=message):
        fold_adapter(str(base), str(broken), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_folder_checks(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    with pytest.raises(UserError, match="adapter directory not found"):
        fold_adapter(str(base), str(tmp_path / "nope"), tmp_path / "out")
    with pytest.raises(UserError, match="--out is the input"):
        fold_adapter(str(base), str(adapter), base)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a folded model"):
        fold_adapter(str(base), str(adapter), tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        fold_adapter(str(base), str(adapter), tmp_path / "out", dtype="int8")


# --- pure parts ---------------------------------------------------------------------------------------------


def test_compare_logits() -> None:
    reference = [torch.tensor([[3.0, 4.0], [0.0, 5.0]])]
    diff = compare_logits(reference, [torch.tensor([[3.0, 4.0], [0.0, 5.5]])])
    assert diff.max_abs == pytest.approx(0.5)
    assert diff.relative == pytest.approx(0.5 / (50**0.5))
    # Per position: 0 and 0.5 / 5; the 90th percentile interpolates between them.
    assert diff.position_p90 == pytest.approx(0.09)
    assert compare_logits(reference, reference).relative == 0.0
    assert not compare_logits(reference, [torch.full((2, 2), float("nan"))]).position_p90 <= 1.0


def test_check_adapter_tensors() -> None:
    check_adapter_tensors({"a": (4, 8)}, {"a": (4, 8), "old.layout": (1,)}, "ad")  # extras are peft's call
    with pytest.raises(UserError, match=r"tensor a has shape \[4, 9\] but the base model needs \[4, 8\]"):
        check_adapter_tensors({"a": (4, 8)}, {"a": (4, 9)}, "ad")
    with pytest.raises(UserError, match="has no tensor a"):
        check_adapter_tensors({"a": (4, 8)}, {}, "ad")
