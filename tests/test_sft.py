import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from seshu.config import PretrainRecipe, SFTRecipe, load_recipe, validate
from seshu.data.instructions import read_conversations, tokenize_conversation
from seshu.data.mixing import is_validation
from seshu.errors import UserError
from seshu.hub.card import read_card_metadata
from seshu.train import pretrain, sft

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NOT_A_WORD = re.compile(r"\W+")
TOPICS = ["river", "market", "school", "train", "festival", "garden", "library", "kitchen"]


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Alpaca records whose answers follow one learnable pattern, so a few steps lower the answer loss."""
    records = [
        {"instruction": f"Name the place in sentence {i}.", "input": f"We met at the {topic} today.", "output": topic}
        for i, topic in enumerate(TOPICS * 8)
    ]
    path = tmp_path_factory.mktemp("sft-data") / "alpaca.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def base_model(root: Path, arch: str, overrides: str = "{}", context: int = 64) -> Path:
    """A tiny base pretrained for a few steps with a `context` of positions (the fine-tunes below use 64)."""
    out = root / f"base-{arch}-{re.sub(NOT_A_WORD, '_', overrides)}-{context}"
    if not out.exists():
        settings = [f"output_dir={json.dumps(str(out))}", "train.max_steps=4", f"train.seq_len={context}"]
        settings += [f"model.arch={arch}", f"model.overrides={overrides}"]
        pretrain.run(load_recipe(PretrainRecipe, RECIPES / "tiny" / "quickstart.yaml", settings))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bases")


def make_recipe(base: Path, records: Path, out: Path, **sections: Any) -> SFTRecipe:
    raw: dict[str, Any] = {
        "model": {"init_from": str(base)},
        "data": {"train": str(records), "validation": 0.2},
        "train": {
            "seq_len": 64,
            "batch_size": 8,
            "max_steps": 16,
            "lr": 1e-2,
            "warmup_steps": 1,
            "eval_every": 8,
            "save_every": 16,
            "log_every": 2,
            "weight_decay": 0.0,
        },
        "output_dir": str(out),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate(SFTRecipe, raw, "test recipe")


def eval_losses(run: Path) -> list[float]:
    entries = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [e["eval_loss"] for e in entries if "eval_loss" in e]


def test_lora_lowers_answer_loss_and_the_adapter_loads_in_plain_peft(
    tmp_path: Path, bases: Path, alpaca_file: Path
) -> None:
    base = base_model(bases, "llama")
    out = tmp_path / "adapter"
    recipe = make_recipe(base, alpaca_file, out, train={"eval_every": 4})
    initial = sft.run(make_recipe(base, alpaca_file, tmp_path / "zero", train={"max_steps": 1, "lr": 1e-9}))
    result = sft.run(recipe)
    assert result.metrics["eval_loss"] < initial.metrics["eval_loss"] - 0.2
    assert result.trainable_parameters < result.total_parameters / 2

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    card = read_card_metadata(out / "README.md")["seshu"]
    assert {Path(i["path"]).name for i in card["base_model"]} >= {"model.safetensors", "config.json"}
    assert not any("checkpoint" in i["path"] for i in card["base_model"])
    assert not list(out.glob("*.bin"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    tokenizer = AutoTokenizer.from_pretrained(out)

    # What it trained on: the conversations not held out for validation, and their answer tokens.
    conversations = list(read_conversations(str(alpaca_file)))
    train = [c for c in conversations if not is_validation(json.dumps(c, sort_keys=True), 0.2, recipe.train.seed)]
    masks = [tokenize_conversation(tokenizer, c, recipe.train.seq_len)["assistant_masks"] for c in train]
    assert 0 < result.examples == len(train) < len(TOPICS) * 8
    assert result.answer_tokens == sum(sum(m) for m in masks) > result.examples  # each answer, then <|im_end|>
    assert (card["examples"], card["answer_tokens"]) == (result.examples, result.answer_tokens)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name the place in sentence 3.\n\nWe met at the school today."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_every_default_target_of_each_arch_really_trains(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    for arch in ("llama", "mixtral", "mamba"):
        out = tmp_path / arch
        sft.run(make_recipe(base_model(bases, arch), alpaca_file, out, train={"max_steps": 4}))
        weights = load_file(out / "adapter_model.safetensors")
        config = json.loads((out / "adapter_config.json").read_text())
        layers = 2  # every tiny preset has 2 layers
        for target in config["target_modules"] or []:
            b = [w for name, w in weights.items() if f".{target}.lora_B" in name]
            assert len(b) == layers, f"{arch}: {target} has {len(b)} LoRA B matrices"
            assert all(w.abs().sum() > 0 for w in b), f"{arch}: {target} did not move from its zero start"
        # Fused expert parameters: peft wraps `experts` once per targeted parameter.
        experts = [w for name, w in weights.items() if ".experts." in name and "lora_B" in name]
        assert len(experts) == layers * len(config.get("target_parameters") or [])
        assert all(w.abs().sum() > 0 for w in experts)


QLORA_BASES = {
    "llama": "{hidden_size: 128, intermediate_size: 256, num_attention_heads: 2, num_key_value_heads: 1}",
    "mixtral": "{hidden_size: 128, num_attention_heads: 2, num_key_value_heads: 1}",
    "mamba": "{hidden_size: 128, time_step_rank: 32}",
}


@pytest.mark.parametrize("arch", sorted(QLORA_BASES))
def test_qlora_trains_on_the_cpu(tmp_path: Path, bases: Path, alpaca_file: Path, arch: str) -> None:
    pytest.importorskip("bitsandbytes")
    base = base_model(bases, arch, QLORA_BASES[arch])
    out = tmp_path / "q"
    result = sft.run(make_recipe(base, alpaca_file, out, sft={"method": "qlora"}, train={"max_steps": 4}))
    assert torch.isfinite(torch.tensor(result.metrics["eval_loss"]))
    weights = load_file(out / "adapter_model.safetensors")
    trained = [w for name, w in weights.items() if "lora_B" in name]
    assert trained and all(w.abs().sum() > 0 for w in trained)

    # 4-bit weights are packed several to a stored element; the counts are those of the model unquantized.
    unquantized = sft.run(make_recipe(base, alpaca_file, tmp_path / "l", train={"max_steps": 1}))
    counts = (result.trainable_parameters, result.total_parameters)
    assert counts == (unquantized.trainable_parameters, unquantized.total_parameters)
    card = read_card_metadata(out / "README.md")["seshu"]
    assert (card["trainable_parameters"], card["total_parameters"]) == counts


def test_full_fine_tuning_writes_a_model(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    out = tmp_path / "full"
    result = sft.run(
        make_recipe(
            base_model(bases, "llama"), alpaca_file, out, sft={"method": "full"}, train={"max_steps": 4, "lr": 1e-3}
        )
    )
    assert result.trainable_parameters == result.total_parameters
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"sft": {"lora": {"target_modules": ["no_such_proj"]}}}, "no_such_proj"),
        ({"data": {"format": "klingon"}}, "unknown instruction format"),
        ({"data": {"train": "missing.json"}}, "missing.json"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, bases: Path, alpaca_file: Path, sections: dict[str, Any], message: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        sft.run(make_recipe(base_model(bases, "llama"), alpaca_file, out, **sections))
    assert not out.exists()


def test_a_base_model_is_required(tmp_path: Path) -> None:
    recipe = validate(SFTRecipe, {"data": {"train": "a.json"}, "output_dir": str(tmp_path / "o")}, "r")
    with pytest.raises(UserError, match=r"model\.init_from"):
        sft.run(recipe)


def test_packing_keeps_samples_apart_and_trains(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    base = base_model(bases, "llama")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    first, second = torch.arange(5, 15)[None], torch.arange(40, 47)[None]
    positions = torch.cat([torch.arange(10), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions).logits[0, 10:]
        alone = model(input_ids=second).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)

    result = sft.run(make_recipe(base, alpaca_file, tmp_path / "packed", sft={"packing": True}, train={"max_steps": 4}))
    assert torch.isfinite(torch.tensor(result.metrics["eval_loss"]))


def test_packing_is_refused_for_state_space_models(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    with pytest.raises(UserError, match="carries its state"):
        sft.run(make_recipe(base_model(bases, "mamba"), alpaca_file, tmp_path / "p", sft={"packing": True}))
    assert not (tmp_path / "p").exists()


def test_answers_cut_off_by_seq_len_are_reported(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    with pytest.raises(UserError, match=r"no conversation with an answer within train\.seq_len=8"):
        sft.run(make_recipe(base_model(bases, "llama"), alpaca_file, tmp_path / "short", train={"seq_len": 8}))
    assert not (tmp_path / "short").exists()


def test_qlora_on_a_cpu_trains_at_any_width_through_evaluations(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    """bitsandbytes repacks 4-bit weights for inference at the first evaluation on some CPUs (asserting on widths
    that are not multiples of 32, and cutting the gradient from then on) unless told not to."""
    pytest.importorskip("bitsandbytes")
    base = base_model(bases, "llama", "{intermediate_size: 100}")
    out = tmp_path / "q"
    recipe = make_recipe(base, alpaca_file, out, sft={"method": "qlora"}, train={"max_steps": 4, "eval_every": 2})
    result = sft.run(recipe)
    assert len(eval_losses(out)) == 2 and torch.isfinite(torch.tensor(result.metrics["eval_loss"]))
    trained = [w for name, w in load_file(out / "adapter_model.safetensors").items() if "lora_B" in name]
    assert trained and all(w.abs().sum() > 0 for w in trained)


def test_dora_and_rslora_switches_reach_the_adapter(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    out = tmp_path / "dora"
    lora = {"use_dora": True, "use_rslora": True}
    sft.run(make_recipe(base_model(bases, "llama"), alpaca_file, out, sft={"lora": lora}, train={"max_steps": 2}))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert any("lora_magnitude_vector" in name for name in load_file(out / "adapter_model.safetensors"))


def test_an_interrupted_fine_tune_resumes(tmp_path: Path, bases: Path, alpaca_file: Path) -> None:
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 6:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    recipe = make_recipe(base_model(bases, "llama"), alpaca_file, out, train={"max_steps": 8, "save_every": 4})
    with pytest.raises(KeyboardInterrupt):
        sft.run(recipe, callbacks=[Crash()])
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    assert sft.run(recipe, resume=True).steps == 8


def test_fine_tuning_keeps_its_own_defaults_when_other_train_keys_are_set() -> None:
    recipe = validate(SFTRecipe, {"data": {"train": "a.json"}, "train": {"max_steps": 5}}, "r")
    assert (recipe.train.lr, recipe.train.warmup_steps, recipe.train.weight_decay) == (2e-4, 10, 0.0)


def test_skipped_records_are_summarised_by_the_cli(
    tmp_path: Path, bases: Path, alpaca_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from seshu.cli.sft import sft as sft_command

    records = json.loads(alpaca_file.read_text(encoding="utf-8"))
    records[3:5] = [{"instruction": "No answer here."}, {"output": "No question here."}]
    data = tmp_path / "some-bad.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            make_recipe(
                base_model(bases, "llama"), data, tmp_path / "run", data={"on_error": "skip"}, train={"max_steps": 2}
            ).model_dump(mode="json")
        ),
        encoding="utf-8",
    )
    sft_command(config=recipe, overrides=[], out=None, resume=False)
    printed = capsys.readouterr().out
    summary = next(line for line in printed.splitlines() if line.startswith("data (training and held-out): "))
    assert f"{len(records)} records -> {len(records) - 2} conversations, 2 skipped" in summary
    assert "some-bad.json, record 4" in summary, summary
    assert "step 2/2" in printed and "done: 2 steps" in printed


def test_conversations_longer_than_the_base_models_context_are_refused(
    tmp_path: Path, bases: Path, alpaca_file: Path
) -> None:
    short = base_model(bases, "llama", context=48)
    assert AutoConfig.from_pretrained(short).max_position_embeddings == 48
    out = tmp_path / "long"
    with pytest.raises(
        UserError,
        match=r"train\.seq_len: \d+ conversations \(up to \d+ tokens\) are longer than .* "
        r"context of 48 tokens \(max_position_embeddings\); set train\.seq_len to 48 or less",
    ):
        sft.run(make_recipe(short, alpaca_file, out))
    assert not out.exists()
