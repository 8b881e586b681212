"""seshu.train.lora: LoRA targets from the registry, each checked to exist and to train."""

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from seshu.config import LoraSection
from seshu.errors import UserError
from seshu.models.registry import ARCHS, build_config, build_model
from seshu.train.lora import apply_lora, lora_config, what_it_has

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])
TARGET = re.compile(r"\.(\w+)\.lora_")


def targets(model: torch.nn.Module) -> set[str]:
    """The layers whose LoRA weights train."""
    return {m.group(1) for n, p in model.named_parameters() if p.requires_grad and (m := TARGET.search(n))}


def tiny(arch: str) -> PreTrainedModel:
    return build_model(build_config(arch, "tiny", vocab_size=64, context_length=16, special_token_ids={}), seed=0)


def test_defaults_come_from_the_registry() -> None:
    llama = lora_config(LoraSection(r=4), tiny("llama"), "sft.lora")
    assert set(llama.target_modules) == set(ARCHS["llama"].lora_modules)
    assert (llama.r, llama.lora_alpha, llama.lora_dropout, llama.target_parameters) == (4, 32, 0.05, None)
    mixtral = lora_config(LoraSection(), tiny("mixtral"), "sft.lora")
    assert list(mixtral.target_parameters) == list(ARCHS["mixtral"].lora_parameters)
    assert mixtral.lora_dropout == 0.0  # peft refuses dropout on fused parameters
    chosen = lora_config(LoraSection(target_modules=["q_proj"], dropout=0.1), tiny("llama"), "lora")
    assert set(chosen.target_modules) == {"q_proj"} and chosen.lora_dropout == 0.1


def test_a_model_seshu_has_no_defaults_for_must_name_its_targets() -> None:
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(
        UserError,
        match=r"sft\.lora\.target_modules: Seshu has no default targets for model type "
        r"'gpt2'; name the modules to adapt \(its layers: c_attn, c_fc, c_proj, lm_head, wpe, wte\)",
    ):
        lora_config(LoraSection(), gpt2, "sft.lora")
    wrapped = apply_lora(gpt2, LoraSection(target_modules=["c_attn"], r=2), "sft.lora")
    assert targets(wrapped) == {"c_attn"}


def test_a_fresh_adapter_leaves_the_output_unchanged_and_trains_only_itself() -> None:
    model = tiny("llama")
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    wrapped = apply_lora(model, LoraSection(r=4), "sft.lora")
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=IDS).logits, before)  # B starts at zero
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert targets(wrapped) == set(ARCHS["llama"].lora_modules)
    assert wrapped.training is model.training  # the check's forward pass leaves the mode as it was

    loss = wrapped(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_B" in n)


def test_new_token_rows_train_and_no_other_row() -> None:
    wrapped = apply_lora(tiny("llama"), LoraSection(r=2), "sft.lora", new_token_ids=[60, 61])
    token_params = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n]
    assert token_params and all(p.shape[0] == 2 for _, p in token_params)


def test_a_target_that_matches_nothing_names_what_the_model_has() -> None:
    with pytest.raises(
        UserError,
        match=r"sft\.lora\.target_modules: 'no_such_proj' matches nothing in the model "
        r"\(its layers: .*q_proj.*; Seshu's default targets: q_proj, k_proj",
    ):
        apply_lora(tiny("llama"), LoraSection(target_modules=["q_proj", "no_such_proj"]), "sft.lora")
    with pytest.raises(UserError, match=r"lora\.target_parameters: 'mlp\.experts\.nothing' matches nothing"):
        apply_lora(tiny("mixtral"), LoraSection(target_parameters=["mlp.experts.nothing"]), "lora")


def test_mamba_targets_lora_cannot_train_are_one_line() -> None:
    # Mamba multiplies by dt_proj's weight without calling the layer: a LoRA there would never see an input.
    with pytest.raises(UserError) as caught:
        apply_lora(tiny("mamba"), LoraSection(target_modules=["dt_proj"]), "sft.lora")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("sft.lora.target_modules: the model computes with the weights of dt_proj without")
    assert message.endswith(
        "(its layers: conv1d, dt_proj, embeddings, in_proj, lm_head, out_proj, x_proj; "
        "Seshu's default targets: in_proj, x_proj)"
    )
    # peft itself refuses out_proj and conv1d on Mamba: its reason, and what the model has, in one line.
    with pytest.raises(UserError, match=r"^sft\.lora: peft cannot apply LoRA here: .*out_proj.*\(its layers: conv1d"):
        apply_lora(tiny("mamba"), LoraSection(target_modules=["in_proj", "out_proj"]), "sft.lora")
    wrapped = apply_lora(tiny("mamba"), LoraSection(), "sft.lora")  # the defaults train
    wrapped(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_what_it_has_lists_adaptable_layers_once_each() -> None:
    assert what_it_has(tiny("llama")).startswith("its layers: down_proj, embed_tokens, gate_proj, k_proj, lm_head")
