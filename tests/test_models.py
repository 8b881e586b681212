import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seshu.errors import UserError
from seshu.models.loading import load_causal_lm
from seshu.models.registry import ARCHS, build_config, build_model, count_parameters

IDS = {"bos": 1, "eos": 2, "pad": 0}


def config(arch: str, preset: str = "tiny", vocab: int = 1000, **overrides: object):
    return build_config(arch, preset, vocab_size=vocab, context_length=64, special_token_ids=IDS, overrides=overrides)


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters one token goes through: for a Mixtral, only top-k of the experts."""
    total = count_parameters(model)
    cfg = model.config
    if cfg.model_type != "mixtral":
        return total
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - experts + experts * cfg.num_experts_per_tok // cfg.num_local_experts


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_builds_trains_a_step_and_round_trips(arch: str, tmp_path: Path) -> None:
    model = build_model(config(arch), seed=0)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_presets_hit_their_sizes(arch: str) -> None:
    # tiny is for tests (~1M), small is what a CPU can pretrain (5-10M active), with an 8k vocabulary.
    with torch.device("meta"):
        tiny = AutoModelForCausalLM.from_config(config(arch, "tiny", vocab=8000))
        small = AutoModelForCausalLM.from_config(config(arch, "small", vocab=8000))
    assert 0.3e6 < active_parameters(tiny) < 1.5e6
    assert 4e6 < active_parameters(small) < 10e6


def test_big_presets_are_about_their_names() -> None:
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config("llama", "base", vocab=32000))
        one_b = AutoModelForCausalLM.from_config(config("llama", "1b", vocab=32000))
    assert 80e6 < count_parameters(base) < 160e6
    assert 0.8e9 < count_parameters(one_b) < 1.5e9


def test_arch_specific_settings() -> None:
    mixtral = config("mixtral")
    assert mixtral.output_router_logits is True
    assert mixtral.num_key_value_heads == 2
    assert config("mamba").use_mambapy is True
    llama = config("llama", vocab=777)
    assert (llama.vocab_size, llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (777, 1, 2, 0)
    assert llama.max_position_embeddings == 64


def test_mixtral_loss_includes_the_router_balancing_term() -> None:
    model = build_model(config("mixtral"), seed=0)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    lm_only = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 1000), ids[:, 1:].reshape(-1))
    assert out.aux_loss is not None
    assert out.loss.item() == pytest.approx(
        lm_only.item() + model.config.router_aux_loss_coef * out.aux_loss.item(), rel=1e-5
    )


def test_bad_arch_preset_and_overrides() -> None:
    with pytest.raises(UserError, match=r"unknown model arch 'gpt5'.*llama"):
        config("gpt5")
    with pytest.raises(UserError, match="unknown preset 'huge' for arch 'llama'"):
        config("llama", "huge")
    with pytest.raises(UserError, match="'hidden_sise' is not a field"):
        config("llama", hidden_sise=3)


def test_loading_refuses_pickles_missing_dirs_and_mismatched_tokenizers(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    with pytest.raises(UserError, match="model directory not found"):
        load_causal_lm(str(tmp_path / "missing"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config("llama").to_dict()))
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match=r"only pickle files: pytorch_model\.bin"):
        load_causal_lm(str(pickled))

    small_vocab = tmp_path / "small-vocab"
    build_model(config("llama", vocab=100)).save_pretrained(small_vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small_vocab / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    with pytest.raises(UserError, match="the tokenizer has 400 tokens but the model's vocabulary has 100"):
        load_causal_lm(str(small_vocab))
