"""seshu.train.precision, seshu.models.experts and loss_without_logits: mixed precision by default where it pays."""

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.integrations import moe

from seshu.config import PretrainRecipe, SFTRecipe, TrackSection, TrainSection, validate
from seshu.errors import UserError
from seshu.models.experts import AUTOCAST_GROUPED_MM
from seshu.models.registry import build_config, build_model
from seshu.train import precision
from seshu.train.common import training_arguments
from seshu.train.pretrain import CausalLMTrainer

SPECIAL = {"bos": 1, "eos": 2, "pad": 0}


def capabilities(**flags: bool) -> dict[str, Any]:
    return {"avx512_f": True, "avx512_bf16": False, "amx_bf16": False, **flags}


@pytest.mark.parametrize(
    ("flags", "resolved"),
    [({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16"), ({}, "fp32")],
)
def test_auto_is_bf16_on_a_cpu_that_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, flags: dict[str, bool], resolved: str
) -> None:
    monkeypatch.setattr(precision, "on_cpu", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities(**flags))
    assert precision.resolve_precision("auto") == resolved
    for explicit in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(explicit) == explicit
    reason = "computes bf16 natively" if resolved == "bf16" else "has no native bf16"
    expected = "bf16 mixed precision" if resolved == "bf16" else "float32"
    assert precision.describe_precision("auto") == f"{expected} (auto: this CPU {reason})"
    assert precision.describe_precision("fp32") == "float32"
    kwargs = training_arguments(TrainSection(), TrackSection(), Path("run"), has_eval=False)
    assert (kwargs["bf16"], kwargs["fp16"]) == (resolved == "bf16", False)


def test_auto_on_a_gpu_without_bf16_is_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert precision.resolve_precision("auto") == "fp32"
    assert precision.describe_precision("auto") == "float32 (auto: this GPU has no native bf16)"


def test_pretraining_defaults_to_auto_and_fine_tuning_to_float32() -> None:
    pretrain = validate(PretrainRecipe, {"data": {"train": "a.txt"}}, "recipe")
    sft = validate(SFTRecipe, {"model": {"init_from": "m"}, "data": {"train": "a.jsonl"}}, "recipe")
    assert (pretrain.train.precision, sft.train.precision) == ("auto", "fp32")
    with pytest.raises(UserError, match="precision"):
        validate(PretrainRecipe, {"data": {"train": "a.txt"}, "train": {"precision": "fp8"}}, "recipe")


# ------------------------------------------------------------------------------------------------
# A mixture of experts under autocast


def tiny_mixtral() -> Any:
    config = build_config("mixtral", "tiny", vocab_size=300, context_length=32, special_token_ids=SPECIAL)
    return build_model(config, seed=0)


def record_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of the expert weights each grouped matmul of a forward runs with."""
    dtypes: list[torch.dtype] = []
    real = moe._grouped_mm

    def recording(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        dtypes.append(weight.dtype)
        return real(input, weight, offs)

    monkeypatch.setattr(moe, "_grouped_mm", recording)
    return dtypes


def test_experts_run_in_the_autocast_dtype_and_train_float32_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    seshu = tiny_mixtral()
    plain = tiny_mixtral()
    plain.set_experts_implementation("grouped_mm")  # transformers' own
    assert seshu.config._experts_implementation == AUTOCAST_GROUPED_MM
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    dtypes = record_grouped_mm(monkeypatch)

    # Without autocast it is transformers' forward itself: the same numbers, float32 experts.
    torch.testing.assert_close(seshu(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert set(dtypes) == {torch.float32}

    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(input_ids=ids)
    assert set(dtypes) == {torch.float32}  # what transformers does: the experts escape autocast
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = seshu(input_ids=ids, labels=ids).loss
    assert dtypes and set(dtypes) == {torch.bfloat16}
    loss.backward()
    experts = seshu.model.layers[0].mlp.experts
    for weight in (experts.gate_up_proj, experts.down_proj):
        assert weight.dtype == torch.float32 and weight.grad is not None and weight.grad.dtype == torch.float32
        assert weight.grad.abs().sum() > 0

    # The same update as the eager experts (a loop of Linear calls, which autocast does cover), to bf16 rounding.
    eager = tiny_mixtral()
    eager.set_experts_implementation("eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager(input_ids=ids, labels=ids).loss.backward()
    reference = eager.model.layers[0].mlp.experts.gate_up_proj.grad
    torch.testing.assert_close(experts.gate_up_proj.grad, reference, rtol=0.05, atol=1e-4)


def test_lora_on_the_expert_parameters_runs_in_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    config = LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(tiny_mixtral(), config)
    dtypes = record_grouped_mm(monkeypatch)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the weight with its LoRA delta, cast for the matmul
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())


def test_a_saved_mixture_names_no_seshu_implementation(tmp_path: Path) -> None:
    model = tiny_mixtral()
    model.save_pretrained(tmp_path)
    assert "seshu" not in (tmp_path / "config.json").read_text()
    assert "experts_implementation" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._experts_implementation == "grouped_mm"


def test_a_model_without_experts_keeps_its_implementation() -> None:
    config = build_config("llama", "tiny", vocab_size=300, context_length=32, special_token_ids=SPECIAL)
    assert build_model(config).config._experts_implementation != AUTOCAST_GROUPED_MM


# ------------------------------------------------------------------------------------------------
# The training loss without the logits


def test_pretraining_returns_the_loss_without_logits_under_bf16(tmp_path: Path) -> None:
    config = build_config("llama", "tiny", vocab_size=300, context_length=32, special_token_ids=SPECIAL)
    model = build_model(config, seed=0)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids, labels=ids).loss
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
    trainer = CausalLMTrainer(model=model, args=args)
    # What Trainer does when it starts training: accelerate wraps the forward in autocast and a cast to float32.
    prepared = trainer.accelerator.prepare_model(trainer.model)
    prepared.train()
    out = prepared(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected.float(), rtol=0, atol=0)
    assert prepared(input_ids=ids).logits is not None  # no labels: the logits are what was asked for
    prepared.eval()
    assert prepared(input_ids=ids, labels=ids).logits.dtype == torch.float32  # evaluation keeps them
    assert "labels" in inspect.signature(model.forward).parameters  # Trainer's signature checks see through it
