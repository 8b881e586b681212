"""`seshu merge`: the streaming engine against the pure methods, mergekit, transformers, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from seshu.cli import _register, app
from seshu.errors import UserError
from seshu.hub.card import read_card_metadata
from seshu.io import sha256_file
from seshu.merge.config import MergeConfig, tensor_parameters
from seshu.merge.engine import merge, merge_file, resolve_reference
from seshu.merge.methods import METHODS, merge_tensors
from seshu.merge.spec import Chunk, MergeMethod, Param, TensorParameters

LLAMA = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
}  # fmt: skip


def save_variants(folder: Path, config: dict[str, Any], count: int, seed: int = 0) -> list[Path]:
    """A base llama and `count` variants (base + seeded noise), each saved as a model folder."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**config))
    paths = [folder / "base"]
    base.save_pretrained(str(paths[0]))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(count):
        generator = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for name, param in base.named_parameters():
                param.copy_(state[name] + torch.randn(param.shape, generator=generator) * 0.02)
        paths.append(folder / f"variant{i + 1}")
        base.save_pretrained(str(paths[-1]))
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_variants(tmp_path_factory.mktemp("models"), LLAMA, 2)


def config_for(method: str, models: list[Path], **extra: Any) -> MergeConfig:
    base, one, two = (str(p) for p in models)
    inputs = {
        "linear": [{"model": one, "parameters": {"weight": 0.3}}, {"model": two, "parameters": {"weight": 0.7}}],
        "task_arithmetic": [
            {"model": one, "parameters": {"weight": [0.3, 1.0]}},
            {"model": two, "parameters": {"weight": 0.7}},
        ],
        "ties": [
            {"model": one, "parameters": {"weight": 0.6, "density": 0.4}},
            {"model": two, "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}], "density": 0.7}},
        ],
        "dare_ties": [
            {"model": one, "parameters": {"weight": 0.6, "density": 0.4}},
            {"model": two, "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "breadcrumbs": [
            {"model": one, "parameters": {"weight": 0.6, "density": 0.4, "gamma": 0.05}},
            {"model": two, "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.02}},
        ],
        "slerp": [{"model": base}, {"model": one}],
    }[method]
    raw: dict[str, Any] = {"merge_method": method, "models": inputs, "dtype": "float32"}
    if method != "linear":
        raw["base_model"] = base
    if method == "task_arithmetic":
        raw["parameters"] = {"lambda": 0.9}
    if method == "slerp":
        raw["parameters"] = {"t": [0.0, 0.3, 1.0]}
    raw.update(extra)
    return MergeConfig.model_validate(raw)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "slerp"])
def test_streamed_merge_equals_the_pure_method_tensor_by_tensor(
    models: list[Path], tmp_path: Path, method: str
) -> None:
    config = config_for(method, models)
    report = merge(config, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    states = [load_file(str(p / "model.safetensors")) for p in models]
    inputs = [states[i] for i in ((1, 2) if method != "slerp" else (1,))]
    for name, tensor in merged.items():
        params = tensor_parameters(config, name, LLAMA["num_hidden_layers"])
        base = None if method == "linear" else states[0][name]
        expected = merge_tensors(method, base, [s[name] for s in inputs], params, name=name)
        assert torch.allclose(tensor, expected, atol=1e-6, rtol=0), name
    assert report.tensors == len(states[0]) and report.out_dtype == "float32"


def test_output_loads_in_transformers_generates_and_has_a_card(models: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    merge(config_for("ties", models, out_dtype="bfloat16"), out)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.bfloat16
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    card = read_card_metadata(out / "README.md")["seshu"]
    assert card["method"] == "ties" and card["dtype"] == "bfloat16"
    hashes = {entry["path"]: entry["sha256"] for entry in card["inputs"] if "path" in entry}
    weights = models[1] / "model.safetensors"
    assert hashes[str(weights)] == sha256_file(weights)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_small_shards_write_an_index_and_load_the_same(models: list[Path], tmp_path: Path) -> None:
    merge(config_for("linear", models), tmp_path / "whole")
    merge(config_for("linear", models, output={"shard_size": 20_000}), tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    whole = AutoModelForCausalLM.from_pretrained(str(tmp_path / "whole"))
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    for (name, a), (_, b) in zip(whole.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _mergekit() -> str | None:
    found = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    return found if found and Path(found).exists() else None


@pytest.mark.skipif(_mergekit() is None, reason="mergekit is not installed (set MERGEKIT_YAML to its mergekit-yaml)")
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs", "slerp"])
def test_matches_mergekit(models: list[Path], tmp_path: Path, method: str) -> None:
    config = config_for(method, models)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(_mergekit()), str(path), str(tmp_path / "mk")], check=True, env=env, capture_output=True)
    merge(config, tmp_path / "seshu")
    ours = load_file(str(tmp_path / "seshu" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6, rtol=0), name


def _largest(chunk: Chunk, params: TensorParameters, statistics: None) -> torch.Tensor:
    """At every entry, the task vector of largest magnitude (the first on a tie), times `scale`."""
    stacked = torch.stack(chunk.inputs)
    return stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0] * params.extra["scale"]


def test_a_method_added_as_one_registry_entry_merges_end_to_end(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scale = Param("scale", 1.0, low=0)
    entry = MergeMethod("largest", "the largest task vector at every entry", _largest, parameters=(scale,))
    monkeypatch.setitem(METHODS, entry.name, entry)
    base, one, two = (str(p) for p in models)
    raw = {"merge_method": "largest", "base_model": base, "models": [{"model": base}, {"model": one}, {"model": two}]}
    path = tmp_path / "largest.yaml"
    path.write_text(yaml.safe_dump({**raw, "parameters": {"scale": 0.5}, "dtype": "float32"}), encoding="utf-8")
    report = merge_file(path, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    states = [load_file(str(p / "model.safetensors")) for p in models]
    for name, tensor in merged.items():
        d1, d2 = states[1][name] - states[0][name], states[2][name] - states[0][name]
        expected = states[0][name] + 0.5 * torch.where(d2.abs() > d1.abs(), d2, d1)
        assert torch.allclose(tensor, expected, atol=1e-6, rtol=0), name
    assert report.method == "largest" and report.tensors == len(states[0])
    assert read_card_metadata(tmp_path / "out" / "README.md")["seshu"]["method"] == "largest"
    with pytest.raises(ValueError, match=r"scale must be in \[0, inf\], got -1"):
        MergeConfig.model_validate({**raw, "parameters": {"scale": -1}})
    with pytest.raises(ValueError, match="largest takes no model parameter 'density'"):
        MergeConfig.model_validate({**raw, "models": [{"model": one, "parameters": {"density": 0.5}}]})


def test_merge_help_names_every_method() -> None:
    _register()
    result = CliRunner().invoke(app, ["merge", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert all(re.search(rf"\b{name}\b", result.output) for name in METHODS), result.output


# --------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def _expect_error(config: MergeConfig, out: Path, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        merge(config, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_models_of_another_shape_or_architecture_are_refused(models: list[Path], tmp_path: Path) -> None:
    wider = save_variants(tmp_path / "wide", {**LLAMA, "intermediate_size": 96}, 0)[0]
    config = config_for("task_arithmetic", [models[0], models[1], wider])
    _expect_error(config, tmp_path / "out", r"mlp\.(down|gate|up)_proj\.weight has shape")
    other = tmp_path / "other"
    shutil.copytree(models[2], other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "model_type": "mistral"}))
    _expect_error(config_for("ties", [models[0], models[1], other]), tmp_path / "out", "model_type is mistral")


def test_a_missing_tensor_is_named(models: list[Path], tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(models[2], partial)
    state = load_file(str(partial / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(partial / "model.safetensors"))
    config = config_for("ties", [models[0], models[1], partial])
    _expect_error(config, tmp_path / "out", "has no tensor model.layers.1.self_attn.k_proj.weight")


def test_pickle_only_checkpoints_are_refused(models: list[Path], tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(models[2] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    _expect_error(config_for("linear", [models[0], models[1], pickled]), tmp_path / "out", "pickle")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"merge_method": "average"}, "unknown merge_method 'average'"),
        ({"models": [{"model": "a", "parameters": {"density": 1.5}}]}, r"density must be in \(0, 1\]"),
        ({"models": [{"model": "a", "parameters": {"density": 0}}]}, r"density must be in \(0, 1\]"),
        ({"parameters": {"normalise": True}}, "has no parameter 'normalise'"),
        ({"base_model": None}, "needs a base_model"),
        ({"merge_method": "slerp", "parameters": {"t": 0.5}}, "exactly 1 model"),
        ({"merge_method": "slerp", "models": [{"model": "a"}]}, "needs parameters.t"),
        ({"output": {"kind": "adapter"}}, "needs output.rank"),
    ],
)
def test_bad_configs_are_one_clear_error(change: dict[str, Any], fragment: str) -> None:
    raw: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}],
    }
    raw.update(change)
    with pytest.raises(ValueError, match=fragment):
        MergeConfig.model_validate(raw)


def test_references_are_folders_or_hub_ids_by_the_one_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    fetched: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, **_: fetched.append(ref) or str(tmp_path))
    assert resolve_reference(str(tmp_path)) == tmp_path
    assert resolve_reference("gpt2") == tmp_path and resolve_reference("org/name") == tmp_path  # as `seshu sft`
    assert fetched == ["gpt2", "org/name"]
    for local in ("./missing", "runs/a/b", str(tmp_path / "nothing")):
        with pytest.raises(UserError, match="no such model folder"):
            resolve_reference(local)


def test_weights_summing_to_zero_with_normalize_are_refused(models: list[Path], tmp_path: Path) -> None:
    config = config_for("linear", models)
    config.models[0].parameters["weight"] = 0.7
    config.models[1].parameters["weight"] = -0.7
    _expect_error(config, tmp_path / "out", "weights sum to zero")


def test_cli_merges_and_reports_errors_in_one_line(models: list[Path], tmp_path: Path) -> None:
    _register()
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config_for("linear", models).model_dump(mode="json", exclude_defaults=True)))
    runner = CliRunner()
    done = runner.invoke(app, ["merge", "--config", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and (tmp_path / "o" / "model.safetensors").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [{model: a}]\n")
    result = subprocess.run(
        ["python", "-m", "seshu", "merge", "--config", str(bad), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "base_model" in result.stderr
    assert not (tmp_path / "x").exists()
