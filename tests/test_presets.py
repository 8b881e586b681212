"""Every preset can be trained by every method: MLP widths are multiples of 64, and QLoRA on a CPU trains (and
evaluates, which runs bitsandbytes' inference path) on a model that `seshu pretrain` made at each preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from seshu.cli import _register, app
from seshu.models.registry import ARCHS, build_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_PRESETS = [(arch, preset) for arch in sorted(ARCHS) for preset in ARCHS[arch].presets]
CPU_PRESETS = [(arch, preset) for arch, preset in ALL_PRESETS if preset in ("tiny", "small")]


@pytest.mark.parametrize(("arch", "preset"), ALL_PRESETS)
def test_every_mlp_width_is_a_multiple_of_64(arch: str, preset: str) -> None:
    config = build_config(arch, preset, vocab_size=8000, context_length=128, special_token_ids={})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mlp = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in name]
    assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for _, m in mlp), mlp
    assert config.hidden_size % 64 == 0
    assert getattr(config, "intermediate_size", 0) % 64 == 0  # a Mixtral's experts are fused, not nn.Linear


# Base and 1b run on the meta device (shapes checked without memory), except Mixtral's, whose routing needs real
# values; its attention and expert shapes are those of the llama presets and of its own smaller presets.
FORWARD_PRESETS = [(a, p) for a, p in ALL_PRESETS if (a, p) in CPU_PRESETS or a != "mixtral"]


@pytest.mark.parametrize(("arch", "preset"), FORWARD_PRESETS)
def test_every_preset_runs_a_forward_pass(arch: str, preset: str) -> None:
    config = build_config(arch, preset, vocab_size=320, context_length=64, special_token_ids={})
    with torch.device("cpu" if (arch, preset) in CPU_PRESETS else "meta"):
        model = AutoModelForCausalLM.from_config(config)
        logits = model(input_ids=torch.zeros(1, 16, dtype=torch.long)).logits
    assert logits.shape == (1, 16, 320)


def seshu(*args: str) -> None:
    _register()
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("arch", "preset"), CPU_PRESETS)
def test_qlora_on_a_cpu_trains_a_model_seshu_pretrained(arch: str, preset: str, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    seshu(
        "pretrain", "--config", str(RECIPES / "tiny" / "quickstart.yaml"), "--out", str(base),
        "--set", f"model.arch={arch}", "--set", f"model.preset={preset}", "--set", "model.overrides={}",
        "--set", "train.max_steps=1", "--set", "train.seq_len=64", "--set", "train.batch_size=2",
    )  # fmt: skip
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(
        json.dumps({
            "model": {"init_from": str(base)},
            "data": {"train": "seshu:instructions/instruct.jsonl", "validation": 0.2},
            "train": {"seq_len": 64, "batch_size": 2, "max_steps": 2, "warmup_steps": 0, "lr": 1e-2,
                      "eval_every": 2, "save_every": 2, "log_every": 1, "precision": "fp32"},
            "sft": {"method": "qlora", "lora": {"r": 4, "alpha": 8}},
        }),
        encoding="utf-8",
    )  # fmt: skip
    out = tmp_path / "adapter"
    seshu("sft", "--config", str(recipe), "--out", str(out))  # evaluation runs the 4-bit inference kernels too
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(torch.isfinite(torch.tensor(entry["eval_loss"])) for entry in log if "eval_loss" in entry)
    trained = [w for name, w in load_file(out / "adapter_model.safetensors").items() if "lora_B" in name]
    assert trained and all(w.abs().sum() > 0 for w in trained)
