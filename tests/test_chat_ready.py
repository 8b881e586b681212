"""`write_chat_ready_model`: a base whose tokenizer lacks chat tokens gains them (mean rows), loads with plain
transformers, and fine-tunes into a plain LoRA adapter that `seshu merge` folds exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from seshu.chat import CHAT_TOKENS
from seshu.config import SFTRecipe, validate
from seshu.errors import UserError
from seshu.hub.card import read_card_metadata
from seshu.merge.config import MergeConfig
from seshu.merge.engine import merge
from seshu.models.chat_ready import write_chat_ready_model
from seshu.train import sft

TOPICS = ["river", "market", "school", "train", "festival", "garden", "library", "kitchen"]
CORPUS = [f"We met at the {t} today. Name the place in sentence {i}." for i, t in enumerate(TOPICS)] * 4
IDS = torch.tensor([[1, 40, 41, 42, 43, 60, 70, 80, 90, 100, 120, 130]])  # old tokens only


def save_base(out: Path, tied: bool) -> Path:
    """A tiny llama whose tokenizer has no chat tokens and no chat template."""
    return save_tiny_model(out, CORPUS, tied=tied)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("tied", [True, False])
def test_new_chat_tokens_get_mean_rows_and_the_old_tokens_keep_theirs(tmp_path: Path, tied: bool) -> None:
    base = save_base(tmp_path / "base", tied)
    out = tmp_path / "ready"
    assert write_chat_ready_model(str(base), out) is True

    before = AutoModelForCausalLM.from_pretrained(str(base))
    after = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, safetensors
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert tokenizer.chat_template
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) == 1 for t in CHAT_TOKENS)
    known = before.get_input_embeddings().weight.shape[0]
    assert after.get_input_embeddings().weight.shape[0] == len(tokenizer) == known + 2
    assert after.config.vocab_size == len(tokenizer)
    pairs = [(before.get_input_embeddings().weight, after.get_input_embeddings().weight)]
    if not tied:
        pairs.append((before.get_output_embeddings().weight, after.get_output_embeddings().weight))
    for old, new in pairs:
        assert torch.equal(new[:known], old)
        for row in new[known:]:
            torch.testing.assert_close(row, old.mean(dim=0))
    # The old tokens' predictions are unchanged; a new token's logit is the mean of the old ones (untied head).
    torch.testing.assert_close(logits(after)[..., :known], logits(before), atol=1e-6, rtol=1e-6)
    if not tied:
        new_logits = logits(after)
        torch.testing.assert_close(new_logits[..., known], new_logits[..., :known].mean(dim=-1), atol=1e-5, rtol=1e-5)

    seshu = read_card_metadata(out / "README.md")["seshu"]
    assert seshu["command"] == "chat-ready" and seshu["tokens_added"] == list(CHAT_TOKENS)
    # Rewriting its own output is allowed; a model that is chat-ready already gains no tokens.
    assert write_chat_ready_model(str(base), out) is True
    assert write_chat_ready_model(str(out), tmp_path / "again") is False
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "again"))) == len(tokenizer)


def test_an_output_folder_of_something_else_is_refused(tmp_path: Path) -> None:
    base = save_base(tmp_path / "base", tied=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a chat-ready model"):
        write_chat_ready_model(str(base), tmp_path / "mine")
    with pytest.raises(UserError, match="--out is the input"):
        write_chat_ready_model(str(base), base)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_a_fine_tune_of_a_chat_ready_base_is_a_plain_lora_delta_that_merges(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    write_chat_ready_model(str(save_base(tmp_path / "base", tied=False)), ready)
    records = [
        {"instruction": f"Name the place in sentence {i}.", "input": f"We met at the {t} today.", "output": t}
        for i, t in enumerate(TOPICS * 4)
    ]
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    adapter = tmp_path / "adapter"
    recipe = validate(
        SFTRecipe,
        {
            "model": {"init_from": str(ready)},
            "data": {"train": str(tmp_path / "data.json"), "validation": 0.2},
            "train": {"seq_len": 64, "batch_size": 8, "max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "eval_every": 3},
            "output_dir": str(adapter),
        },
        "test recipe",
    )
    sft.run(recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("trainable_token_indices") and not config.get("modules_to_save")
    assert len(AutoTokenizer.from_pretrained(str(adapter))) == len(AutoTokenizer.from_pretrained(str(ready)))

    merged = tmp_path / "merged"
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": str(ready),
        "models": [{"model": str(adapter)}],
        "output": {"kind": "model"},
    }
    merge(MergeConfig.model_validate(spec), merged)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(ready)), str(adapter))
    base_logits = logits(AutoModelForCausalLM.from_pretrained(str(ready)))
    expected = logits(reference)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter trained: the equality below is not trivial
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(str(merged))), expected, atol=1e-5, rtol=0)
