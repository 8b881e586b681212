"""`seshu moe build`: forced routing reproduces each dense expert (one MLP, and the whole model), the gate modes
give the router rows they promise, the output loads and generates in plain transformers with the base's config
fields, and bad input fails with one line and no output. Router training is in test_moe_train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import save_bpe_tokenizer
from moe_helpers import CORPUS, DENSE, ENGLISH, NAMES, PROMPTS, config_for, dense, make_family, save_dense
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, MixtralForCausalLM, PhiConfig
from typer.testing import CliRunner

from seshu.cli.moe import app
from seshu.errors import UserError
from seshu.hub.card import read_card_metadata
from seshu.io import sha256_file
from seshu.moe.build import BuildReport, MoEAssemblyError, build_moe, fuse_expert_mlp
from seshu.moe.config import MoEConfig, load_moe_config, mixtral_config
from seshu.moe.layerwise import mlp_inputs_by_layer
from seshu.moe.router import normalise_rows, random_gates


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer"), vocab_size=300, chat_tokens=False)


@pytest.fixture(scope="module")
def family(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tokenizer_dir, tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def built(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MoEConfig]:
    config = config_for(family)
    config.experts[2].negative_prompts = ENGLISH[:2]
    out = tmp_path_factory.mktemp("moe") / "moe"
    build_moe(config, out)
    return out, config


def assembled(config: MoEConfig, folder: Path) -> tuple[Any, BuildReport]:
    """Build the MoE into `folder` and load it back (float32, eval mode)."""
    report = build_moe(config, folder / "moe")
    return dense(folder / "moe"), report


def biased_router(router: Any, expert: int, bias: float) -> Callable[[torch.Tensor], Any]:
    """Mixtral's router forward with `bias` added to one expert's logit."""

    def forward(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        logits = logits + bias * F.one_hot(torch.tensor(expert), router.num_experts)
        top, index = logits.float().softmax(dim=-1).topk(router.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    return forward


def force(model: Any, expert: int, bias: float, monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in model.model.layers:
        monkeypatch.setattr(layer.mlp.gate, "forward", biased_router(layer.mlp.gate, expert, bias))


# --- the tensor layout and forced routing ------------------------------------------------------------------


def test_fuse_expert_mlp_puts_the_gate_rows_first() -> None:
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    gate_up, fused_down = fuse_expert_mlp(gate, up, down)
    assert gate_up.shape == (12, 4) and torch.equal(gate_up[:6], gate) and torch.equal(gate_up[6:], up)
    assert fused_down is down


@pytest.mark.parametrize(("experts_per_token", "bias"), [(1, 1e4), (2, 60.0)], ids=["top1", "top2-large-bias"])
def test_a_block_routed_to_one_expert_is_that_experts_dense_mlp(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch, experts_per_token: int, bias: float, tmp_path: Path
) -> None:
    moe, _ = assembled(config_for(family, gate_mode="random", experts_per_token=experts_per_token), tmp_path)
    generator = torch.Generator().manual_seed(0)
    for layer_index, layer in enumerate(moe.model.layers):
        block, router = layer.mlp, layer.mlp.gate
        x = torch.randn(2, 5, 32, generator=generator)
        with torch.no_grad():
            plain = block(x)
            monkeypatch.setattr(router, "forward", biased_router(router, 0, 0.0))
            assert torch.equal(block(x), plain)  # the patched router is Mixtral's own, bias aside
            for i, name in enumerate(NAMES):
                monkeypatch.setattr(router, "forward", biased_router(router, i, bias))
                reference = dense(family[name]).model.layers[layer_index].mlp(x)
                torch.testing.assert_close(block(x), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config_class", [LlamaConfig, MistralConfig], ids=["llama", "mistral"])
def test_the_whole_moe_is_the_expert_whose_attention_it_has_when_only_that_expert_is_picked(
    config_class: type, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"sliding_window": 8} if config_class is MistralConfig else {}  # shorter than the input: it matters
    paths = [save_dense(tmp_path / n, tokenizer_dir, s, config_class, **extra) for s, n in enumerate(NAMES)]
    experts = [{"source_model": str(p)} for p in paths]
    config = MoEConfig(base_model=str(paths[1]), experts=experts, gate_mode="random", experts_per_token=1)
    moe, _ = assembled(config, tmp_path)
    assert moe.config.sliding_window == extra.get("sliding_window")
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = moe(ids).logits
        force(moe, 1, 1e4, monkeypatch)
        torch.testing.assert_close(moe(ids).logits, dense(paths[1])(ids).logits, atol=1e-5, rtol=1e-5)
    assert (mixed - moe(ids).logits).abs().max() > 1e-2  # random routing does mix experts in


def test_unforced_routing_mixes_the_top_experts_by_the_gate_rows(built: tuple[Path, MoEConfig]) -> None:
    out, _ = built
    moe = dense(out)
    experts = [dense(Path(e)) for e in (moe_source(out, i) for i in range(3))]
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(2))
    for index, layer in enumerate(moe.model.layers):
        probs = (x[0] @ layer.mlp.gate.weight.T).softmax(dim=-1)
        top, chosen = probs.topk(2, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        with torch.no_grad():
            outputs = torch.stack([e.model.layers[index].mlp(x[0]) for e in experts])  # [experts, tokens, hidden]
            expected = sum(top[:, k, None] * outputs[chosen[:, k], torch.arange(6)] for k in range(2))
            torch.testing.assert_close(layer.mlp(x)[0], expected, atol=1e-5, rtol=1e-5)


def moe_source(out: Path, expert: int) -> str:
    meta = read_card_metadata(out / "README.md")["seshu"]
    return str(meta["experts"][expert]["source_model"])


def assembled_in_memory(config: MoEConfig) -> Any:
    """The MoE built the plain way (what `seshu moe build` did before it streamed): a whole MixtralForCausalLM in
    float32 filled from whole dense models, random gates, then cast to the output dtype."""
    base = dense(Path(config.base_model))
    experts = [dense(Path(e.source_model)) for e in config.experts]
    moe = MixtralForCausalLM(
        mixtral_config(base.config, len(experts), config.experts_per_token, config.router_aux_loss_coef)
    ).eval()
    gates = random_gates(base.config.num_hidden_layers, len(experts), base.config.hidden_size, config.seed)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            if ".mlp." in name:
                continue
            if config.shared_weights == "base":
                param.copy_(dict(base.named_parameters())[name])
                continue
            param.zero_()
            for expert in experts:
                param.add_(dict(expert.named_parameters())[name], alpha=1.0 / len(experts))
        for e, expert in enumerate(experts):
            for layer, dense_layer in zip(moe.model.layers, expert.model.layers, strict=True):
                mlp = dense_layer.mlp
                gate_up, down = fuse_expert_mlp(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
                layer.mlp.experts.gate_up_proj[e].copy_(gate_up)
                layer.mlp.experts.down_proj[e].copy_(down)
        for layer, rows in zip(moe.model.layers, gates, strict=True):
            layer.mlp.gate.weight.copy_(rows)
    return moe.to(getattr(torch, config.dtype or "float32"))


@pytest.mark.parametrize("shared_weights", ["base", "average"])
def test_the_streamed_build_writes_what_saving_the_whole_assembled_model_writes(
    family: dict[str, Path], tmp_path: Path, shared_weights: str
) -> None:
    config = config_for(family, gate_mode="random", shared_weights=shared_weights, dtype="bfloat16", seed=5)
    build_moe(config, tmp_path / "streamed")
    assembled_in_memory(config).save_pretrained(str(tmp_path / "whole"))
    ours, theirs = (load_file(str(tmp_path / f / "model.safetensors")) for f in ("streamed", "whole"))
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype == torch.bfloat16 and torch.equal(tensor, theirs[name]), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads(
            (tmp_path / "whole" / name).read_text()
        )


def test_an_expert_that_does_not_survive_the_move_stops_the_build(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swapped = lambda gate, up, down: (torch.cat([up, gate]), down)  # noqa: E731 (up rows first: not Mixtral's order)
    monkeypatch.setattr("seshu.moe.build.fuse_expert_mlp", swapped)
    with pytest.raises(MoEAssemblyError, match="expert 0's MLP of layer 0 inside the MoE is off from its dense MLP"):
        build_moe(config_for(family, gate_mode="random"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("config_class", [LlamaConfig, MistralConfig], ids=["llama", "mistral"])
def test_the_layer_by_layer_forward_gives_the_whole_models_mlp_inputs_to_the_bit(
    config_class: type, tokenizer_dir: Path, tmp_path: Path
) -> None:
    extra = {"sliding_window": 4} if config_class is MistralConfig else {}  # shorter than the prompts: it matters
    model = dense(save_dense(tmp_path / "m", tokenizer_dir, 3, config_class, **extra))
    sequences = [[1, 5, 9, 20, 7, 3, 11], [1, 40, 2], [8]]
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    streamed = list(mlp_inputs_by_layer(model.config, lambda name: tensors[name].float(), sequences))
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0][0])) for layer in model.model.layers]
    for ids in sequences:
        with torch.no_grad():
            model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    layers = len(model.model.layers)
    assert len(streamed) == layers
    for s, _ in enumerate(sequences):
        for layer in range(layers):
            assert torch.equal(streamed[layer][s], captured[s * layers + layer]), (s, layer)


# Dense models ~14x their largest tensor (an MLP weight, 4096 x 512 floats: 8 MB), a MoE of three of them ~37x it.
WIDE = dict(hidden_size=512, intermediate_size=4096, num_hidden_layers=4)
# In a fresh process: a small build first (imports, torch's and the allocator's first use), then the peak RSS
# (VmHWM, reset through /proc/self/clear_refs) of the wide build, above the RSS it started from.
MEMORY_PROBE = """
import json, sys
from pathlib import Path
from seshu.moe.build import build_moe
from seshu.moe.config import MoEConfig

def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024

small, wide, out = sys.argv[1:4]
build_moe(MoEConfig.model_validate_json(small), Path(out) / "small")
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS:")
build_moe(MoEConfig.model_validate_json(wide), Path(out) / "wide")
print(json.dumps({"increase": status("VmHWM:") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to reset the peak RSS")
def test_the_build_streams_in_memory_bounded_by_the_largest_tensor(
    family: dict[str, Path], tokenizer_dir: Path, tmp_path: Path
) -> None:
    wide = {n: save_dense(tmp_path / n, tokenizer_dir, s, **WIDE) for s, n in enumerate(("base", *NAMES))}
    configs = [config_for(f).model_dump_json() for f in (family, wide)]
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *configs, str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    increase = json.loads(done.stdout.splitlines()[-1])["increase"]
    largest = 4 * WIDE["intermediate_size"] * WIDE["hidden_size"]
    written = (tmp_path / "out" / "wide" / "model.safetensors").stat().st_size
    # What the build holds at once: the `hidden` gates' forward one decoder layer (~3.4 largest), then each expert's
    # three weights, their fused copy for the check (2) and the tensor being written (1): ~6 largest. glibc keeps
    # freed blocks for reuse, which can double that: 12. The fixed 32 MB: torch's and transformers' per-call
    # scratch and the meta-device model skeletons. Holding the model would be the MoE itself, 306 MB.
    assert increase < 12 * largest + (32 << 20), (increase / largest, written / largest)
    assert increase < written / 2


# --- gate modes ---------------------------------------------------------------------------------------------


def reference_mean_mlp_input(model: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Mean over the prompts' text tokens of each layer's post-attention norm output: [layers, hidden]."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.append(o[0].detach()))
        for layer in model.model.layers
    ]
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    for prompt in prompts:
        captured.clear()
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            model(torch.tensor([ids]))
        for layer, state in enumerate(captured):
            per_layer[layer].append(state[1:])  # the text tokens, not bos
    for hook in hooks:
        hook.remove()
    return torch.stack([torch.cat(states).mean(dim=0) for states in per_layer])


def test_hidden_gates_are_the_normalised_mean_mlp_input_of_the_prompts(
    built: tuple[Path, MoEConfig], family: dict[str, Path]
) -> None:
    out, config = built
    base, tokenizer = dense(family["base"]), AutoTokenizer.from_pretrained(str(family["base"]))
    moe = dense(out)
    for i, expert in enumerate(config.experts):
        mean = reference_mean_mlp_input(base, tokenizer, expert.positive_prompts)
        if expert.negative_prompts:
            mean = mean - reference_mean_mlp_input(base, tokenizer, expert.negative_prompts)
        expected = mean / mean.norm(dim=-1, keepdim=True)
        for layer, row in zip(moe.model.layers, expected, strict=True):
            torch.testing.assert_close(layer.mlp.gate.weight[i], row, atol=1e-5, rtol=1e-5)


def test_cheap_embed_gates_are_the_normalised_mean_token_embedding(family: dict[str, Path], tmp_path: Path) -> None:
    config = config_for(family, gate_mode="cheap_embed")
    moe, _ = assembled(config, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(family["base"]))
    embed = dense(family["base"]).model.embed_tokens.weight.detach()
    for i, expert in enumerate(config.experts):
        ids = [t for p in expert.positive_prompts for t in tokenizer(p, add_special_tokens=False)["input_ids"]]
        mean = embed[ids].mean(dim=0)
        for layer in moe.model.layers:  # the same row in every layer
            torch.testing.assert_close(layer.mlp.gate.weight[i], mean / mean.norm(), atol=1e-6, rtol=1e-6)


def test_random_gates_are_seeded_unit_directions(family: dict[str, Path], tmp_path: Path) -> None:
    moe, report = assembled(config_for(family, gate_mode="random", seed=7), tmp_path)
    rows = torch.stack([layer.mlp.gate.weight.detach() for layer in moe.model.layers])
    torch.testing.assert_close(rows, random_gates(2, 3, 32, seed=7))
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(2, 3))
    assert not torch.equal(random_gates(2, 3, 32, seed=8), rows) and not torch.equal(rows[0], rows[1])
    assert report.warnings == [] and len(report.gate_max_cosine) == 2


def test_experts_that_are_all_one_model_are_built_with_a_warning(family: dict[str, Path], tmp_path: Path) -> None:
    experts = [{"source_model": str(family["alpha"]), "positive_prompts": PROMPTS[n][:2]} for n in NAMES]
    experts = [{**e, "name": n} for e, n in zip(experts, NAMES, strict=True)]
    _, report = assembled(config_for(family, experts=experts), tmp_path)
    assert any("every expert is the same model" in w for w in report.warnings), report.warnings


def test_normalise_rows_leaves_a_zero_vector_zero() -> None:
    rows = normalise_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.equal(rows, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_shared_weights_average_takes_the_mean_of_the_experts(family: dict[str, Path], tmp_path: Path) -> None:
    moe, _ = assembled(config_for(family, shared_weights="average", gate_mode="random"), tmp_path)
    experts = [dense(family[n]) for n in NAMES]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        expected = torch.stack([dict(e.named_parameters())[name] for e in experts]).mean(dim=0)
        torch.testing.assert_close(dict(moe.named_parameters())[name], expected, atol=1e-6, rtol=1e-6)


# --- the output ---------------------------------------------------------------------------------------------


def test_config_fields_come_from_the_base(built: tuple[Path, MoEConfig], family: dict[str, Path]) -> None:
    out, _ = built
    moe = json.loads((out / "config.json").read_text())
    base = json.loads((family["base"] / "config.json").read_text())
    assert moe["model_type"] == "mixtral" and moe["architectures"] == ["MixtralForCausalLM"]
    # Mixtral's defaults differ from Llama's in every one of these (rope theta 1e6, eps 1e-5, 131072 positions).
    assert moe["rope_parameters"] == base["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    copied = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    copied += ("head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    copied += ("bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
    assert {k: moe[k] for k in copied} == {k: base[k] for k in copied}
    assert moe["num_local_experts"] == 3 and moe["num_experts_per_tok"] == 2 and moe["sliding_window"] is None
    assert moe["router_aux_loss_coef"] == 0.001 and moe["output_router_logits"] is True


def test_the_output_loads_in_plain_transformers_generates_and_has_a_card(
    built: tuple[Path, MoEConfig], family: dict[str, Path]
) -> None:
    out, config = built
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt"))] and not list(out.parent.glob(".*partial"))
    assert any(".experts.0.w1.weight" in key for key in load_file(str(out / "model.safetensors")))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer("the cat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    meta = read_card_metadata(out / "README.md")["seshu"]
    assert meta["command"] == "moe build" and meta["gate_mode"] == "hidden" and meta["experts_per_token"] == 2
    assert [e["name"] for e in meta["experts"]] == list(NAMES) and meta["config"]["base_model"] == config.base_model
    assert meta["expert_check_error"] < 1e-6 and meta["active_parameters"] < meta["parameters"]
    hashes = {entry["path"]: entry["sha256"] for entry in meta["inputs"]}
    for name in ("base", *NAMES):
        weights = family[name] / "model.safetensors"
        assert hashes[str(weights)] == sha256_file(weights)


def test_cli_build_end_to_end(family: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config_for(family).model_dump(mode="json")), encoding="utf-8")
    out = tmp_path / "out"
    args = ["build", "--config", str(path), "--out", str(out), "--set", "experts_per_token=1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_experts"] == 3 and report["experts_per_token"] == 1 and report["out"] == str(out)
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    result = CliRunner().invoke(app, ["build", "--config", str(path), "--out", str(out)])  # replaces its own output
    assert result.exit_code == 0 and "wrote" in result.stdout and "3 experts, 2 per token" in result.stdout


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def misfits(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("misfits")
    found = {
        "mistral": save_dense(root / "mistral", tokenizer_dir, 5, MistralConfig),
        "wider": save_dense(root / "wider", tokenizer_dir, 6, intermediate_size=64),
        "attention_bias": save_dense(root / "attention_bias", tokenizer_dir, 7, attention_bias=True),
        "mlp_bias": save_dense(root / "mlp_bias", tokenizer_dir, 8, mlp_bias=True),
    }
    phi = PhiConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    AutoModelForCausalLM.from_config(phi).save_pretrained(str(root / "phi"))
    found["phi"] = root / "phi"
    pickle = root / "pickle"
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=300, **DENSE))
    model.config.save_pretrained(str(pickle))
    torch.save(model.state_dict(), pickle / "pytorch_model.bin")
    found["pickle"] = pickle
    incomplete = save_dense(root / "incomplete", tokenizer_dir, 9)
    tensors = load_file(str(incomplete / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(incomplete / "model.safetensors"), metadata={"format": "pt"})
    found["incomplete"] = incomplete
    return found


def expert_swapped(family: dict[str, Path], index: int, path: Path) -> dict[str, Any]:
    experts = config_for(family).model_dump()["experts"]
    experts[index]["source_model"] = str(path)
    return {"experts": experts}


BAD_INPUTS: dict[str, tuple[Callable[[dict[str, Path], dict[str, Path]], dict[str, Any]], str]] = {
    "another architecture": (
        lambda f, m: expert_swapped(f, 1, m["mistral"]),
        "is a mistral model but base_model is a llama model",
    ),
    "another shape": (lambda f, m: expert_swapped(f, 2, m["wider"]), "intermediate_size is 64 but base_model's is 48"),
    "not llama or mistral": (lambda f, m: expert_swapped(f, 0, m["phi"]), "is a 'phi' model"),
    "pickle only": (lambda f, m: expert_swapped(f, 0, m["pickle"]), "only pickle files: pytorch_model.bin"),
    "incomplete checkpoint": (
        lambda f, m: expert_swapped(f, 2, m["incomplete"]),
        "the checkpoint lacks model.layers.1.mlp.up_proj.weight",
    ),
    "attention bias": (lambda f, m: expert_swapped(f, 1, m["attention_bias"]), "has attention_bias: true"),
    "mlp bias": (lambda f, m: {"base_model": str(m["mlp_bias"])}, "has mlp_bias: true"),
    "missing base": (lambda f, m: {"base_model": str(f["base"].parent / "nope")}, "model directory not found"),
    "no prompts (hidden)": (
        lambda f, m: {"experts": [{**e, "positive_prompts": []} if i == 1 else e for i, e in enumerate(_experts(f))]},
        "has no positive_prompts, which gate_mode 'hidden' needs",
    ),
    "no prompts (cheap_embed)": (
        lambda f, m: {"gate_mode": "cheap_embed", "experts": [{"source_model": str(f[n])} for n in NAMES]},
        "which gate_mode 'cheap_embed' needs",
    ),
    "blank prompt": (
        lambda f, m: {
            "experts": [{**e, "positive_prompts": ["  "]} if i == 2 else e for i, e in enumerate(_experts(f))]
        },
        "experts[2].positive_prompts[0] is blank",
    ),
    "the same prompts everywhere": (
        lambda f, m: {"experts": [{"source_model": str(f[n]), "positive_prompts": ["x"]} for n in NAMES]},
        "every expert has the same prompts",
    ),
    "experts_per_token 0": (lambda f, m: {"experts_per_token": 0}, "experts_per_token is 0, but with 3 experts it"),
    "experts_per_token 4": (lambda f, m: {"experts_per_token": 4}, "it must be 1 to 3"),
    "one expert": (lambda f, m: {"experts": _experts(f)[:1], "experts_per_token": 1}, "a mixture needs at least two"),
    "duplicate names": (
        lambda f, m: {"experts": [{**e, "name": "same"} for e in _experts(f)]},
        "experts[0] and experts[1] are both named 'same'",
    ),
}


def _experts(family: dict[str, Path]) -> list[dict[str, Any]]:
    return list(config_for(family).model_dump()["experts"])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(
    case: str, family: dict[str, Path], misfits: dict[str, Path], tmp_path: Path
) -> None:
    make, message = BAD_INPUTS[case]
    config = config_for(family).model_dump() | make(family, misfits)
    out = tmp_path / "sub" / "out"
    with pytest.raises(UserError) as error:
        build_moe(MoEConfig.model_validate(config), out, source="moe.yaml")
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not out.exists() and not list(tmp_path.rglob("*partial*"))


def test_bad_yaml_keys_and_out_folders(family: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "moe.yaml"
    raw = config_for(family).model_dump(mode="json")
    path.write_text(yaml.safe_dump({**raw, "shared_experts": []}), encoding="utf-8")
    with pytest.raises(UserError, match="unknown key 'shared_experts'"):
        load_moe_config(path)
    path.write_text(yaml.safe_dump({**raw, "gate_mode": "uniform_random"}), encoding="utf-8")
    with pytest.raises(UserError, match="'gate_mode': Input should be 'hidden', 'cheap_embed' or 'random'"):
        load_moe_config(path)
    with pytest.raises(UserError, match="--out is the input"):
        build_moe(config_for(family), family["alpha"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a MoE Seshu built"):
        build_moe(config_for(family), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_entry_point_prints_one_line_and_exits_2(
    family: dict[str, Path], misfits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from seshu.cli import main

    path = tmp_path / "moe.yaml"
    raw = config_for(family).model_dump(mode="json") | expert_swapped(family, 2, misfits["wider"])
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setattr("sys.argv", ["seshu", "moe", "build", "--config", str(path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "intermediate_size" in lines[0], lines
    assert not (tmp_path / "o").exists()
