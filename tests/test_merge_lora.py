"""LoRA adapters merged as exact weight deltas: against peft, by hand, and re-factored by SVD or from the factors."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from seshu.errors import UserError
from seshu.merge.adapters import read_adapter
from seshu.merge.config import MergeConfig
from seshu.merge.engine import merge
from seshu.merge.lora import LoraPair, adapter_pairs, refactor, refactor_sum
from seshu.merge.methods import METHODS

LLAMA = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=False,
)  # fmt: skip


def save_adapter(base_dir: Path, out: Path, seed: int, **settings: object) -> Path:
    """A LoRA adapter of the base with random (non-zero) factors, saved by peft."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(
        r=int(settings.pop("r", 4)),  # type: ignore[call-overload]
        lora_alpha=8,
        target_modules=list(settings.pop("targets", ["q_proj", "v_proj", "down_proj"])),  # type: ignore[call-overload]
        **settings,  # type: ignore[arg-type]
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)  # the factors only, also for embeddings
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(LLAMA).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        save_adapter(base_dir, root / "a", 1),
        save_adapter(base_dir, root / "b", 2, r=2, targets=["q_proj", "k_proj"], use_rslora=True),
    ]


def folded_delta(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft's own merge adds to each weight."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return {k: v - before[k] for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}


def test_deltas_equal_what_peft_folds(base_dir: Path, adapters: list[Path]) -> None:
    for adapter in adapters:
        expected = folded_delta(base_dir, adapter)
        pairs = adapter_pairs(read_adapter(adapter))
        assert set(pairs) == set(expected)
        for name, pair in pairs.items():
            assert torch.allclose(pair.delta_rows(0, pair.shape[0]), expected[name], atol=1e-6), name


def _config(method: str, base_dir: Path, adapters: list[Path], **extra: object) -> MergeConfig:
    return MergeConfig.model_validate(
        {
            "merge_method": method,
            "base_model": str(base_dir),
            "models": [
                {"model": str(adapters[0]), "parameters": {"weight": 0.7}},
                {"model": str(adapters[1]), "parameters": {"weight": 0.3}},
            ],
            **extra,
        }
    )


def test_merged_adapters_fold_to_base_plus_the_weighted_deltas(
    base_dir: Path, adapters: list[Path], tmp_path: Path
) -> None:
    merge(_config("task_arithmetic", base_dir, adapters), tmp_path / "model")
    merged = load_file(str(tmp_path / "model" / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    deltas = [folded_delta(base_dir, a) for a in adapters]
    for name, tensor in merged.items():
        expected = base[name] + 0.7 * deltas[0].get(name, 0) + 0.3 * deltas[1].get(name, 0)
        assert torch.allclose(tensor, expected, atol=1e-6), name
        if name not in deltas[0] and name not in deltas[1]:
            assert torch.equal(tensor, base[name])  # untouched weights are the base's, bit for bit
    # a linear soup of adapters is the soup of the folded models
    merge(_config("linear", base_dir, adapters), tmp_path / "soup")
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base[name] + (0.7 * deltas[0][name] + 0.3 * deltas[1][name]) / 1.0
    assert torch.allclose(soup[name], expected, atol=1e-6)


def test_averaging_the_factors_is_not_averaging_the_deltas(base_dir: Path, tmp_path: Path) -> None:
    one = adapter_pairs(read_adapter(save_adapter(base_dir, tmp_path / "one", 3)))
    two = adapter_pairs(read_adapter(save_adapter(base_dir, tmp_path / "two", 4)))
    name = "model.layers.0.self_attn.q_proj.weight"
    p, q = one[name], two[name]
    rows = p.shape[0]
    mean_of_deltas = (p.delta_rows(0, rows) + q.delta_rows(0, rows)) / 2
    delta_of_means = ((p.b + q.b) / 2) @ ((p.a + q.a) / 2) * p.scale
    gap = (delta_of_means - mean_of_deltas).norm() / mean_of_deltas.norm()
    assert gap > 0.5  # not a rounding difference: a different update


def test_adapter_output_refactors_exactly_at_full_rank_and_reports_the_loss_below(
    base_dir: Path, adapters: list[Path], tmp_path: Path
) -> None:
    # q_proj is adapted by both (ranks 4 and 2): its weighted sum has rank <= 6, so rank 6 is exact.
    report = merge(
        _config("task_arithmetic", base_dir, adapters, output={"kind": "adapter", "rank": 6}), tmp_path / "a"
    )
    assert report.refactor_error is not None and report.refactor_error < 1e-6
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 6 and saved["lora_alpha"] == 6
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    folded = PeftModel.from_pretrained(base, str(tmp_path / "a")).merge_and_unload().state_dict()
    deltas = [folded_delta(base_dir, a) for a in adapters]
    for name in deltas[0].keys() | deltas[1].keys():
        expected = 0.7 * deltas[0].get(name, 0) + 0.3 * deltas[1].get(name, 0)
        assert torch.allclose(folded[name] - before[name], expected, atol=1e-5), name

    low = merge(_config("task_arithmetic", base_dir, adapters, output={"kind": "adapter", "rank": 1}), tmp_path / "b")
    assert low.refactor_error is not None and 0.05 < low.refactor_error < 1


def test_refactor_error_is_the_dropped_singular_values() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    result = refactor(delta, 3)
    s = torch.linalg.svdvals(delta)
    assert abs(result.relative_error - float((s[3:] ** 2).sum().sqrt() / s.norm())) < 1e-9
    approx = (result.b.double() @ result.a.double()).float()
    assert abs(float((delta.float() - approx).norm() / delta.norm()) - result.relative_error) < 1e-5


def test_adapters_that_are_not_plain_deltas_or_of_another_base_are_refused(base_dir: Path, tmp_path: Path) -> None:
    dora = save_adapter(base_dir, tmp_path / "dora", 5, use_dora=True)
    plain = save_adapter(base_dir, tmp_path / "plain", 6)
    with pytest.raises(UserError, match="use_dora"):
        merge(_config("linear", base_dir, [dora, plain]), tmp_path / "out")
    other_base = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(**{**LLAMA.to_dict(), "hidden_size": 48})).save_pretrained(str(other_base))
    foreign = save_adapter(other_base, tmp_path / "foreign", 7)
    with pytest.raises(UserError, match=r"foreign: model\.layers\.0\.\S+\.weight has shape \[\d+, \d+\] in the base"):
        merge(_config("linear", base_dir, [plain, foreign]), tmp_path / "out")
    with pytest.raises(UserError, match="mix LoRA adapters and models"):
        merge(_config("task_arithmetic", base_dir, [plain, other_base]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def random_pair(generator: torch.Generator, shape: tuple[int, int], rank: int, transposed: bool) -> LoraPair:
    rows, cols = shape[::-1] if transposed else shape
    a, b = torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator)
    return LoraPair("w.weight", a, b, scale=0.5, transposed=transposed, embedding=transposed)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rank", [3, 8, 40])  # below, at, and above the summed ranks (8)
def test_refactoring_from_the_factors_is_the_svd_of_the_summed_delta(transposed: bool, rank: int) -> None:
    generator = torch.Generator().manual_seed(2)
    pairs = [random_pair(generator, (30, 20), r, transposed) for r in (4, 3, 1)]
    weights = [0.7, -0.2, 1.5]
    delta = sum(c * p.delta_rows(0, 30).double() for p, c in zip(pairs, weights, strict=True))
    assert isinstance(delta, torch.Tensor)
    by_svd, by_qr = refactor(delta, rank), refactor_sum(list(zip(pairs, weights, strict=True)), rank)
    assert by_qr.a.shape == by_svd.a.shape and by_qr.b.shape == by_svd.b.shape
    assert by_qr.energy == pytest.approx(by_svd.energy, rel=1e-6)  # the delta here is summed from float32 rows
    assert by_qr.relative_error == pytest.approx(by_svd.relative_error, rel=1e-6, abs=1e-7)
    # The factors are float32 (as saved): the products agree to float32 rounding.
    product = by_svd.b.double() @ by_svd.a.double()
    torch.testing.assert_close(by_qr.b.double() @ by_qr.a.double(), product, atol=1e-5, rtol=1e-5)
    if rank >= 8:  # the whole sum fits: exact
        torch.testing.assert_close(by_qr.b.double() @ by_qr.a.double(), delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_adapter_merges_refactor_from_the_factors_to_what_the_svd_gives(
    base_dir: Path, adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # An embedding adapter (transposed factors) besides the two of the fixture; the inputs adapt different weights.
    embed = save_adapter(base_dir, tmp_path / "embed", 8, targets=["embed_tokens", "q_proj"])
    inputs = [*adapters, embed]
    models = [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(inputs, (0.7, 0.3, 0.5), strict=True)]
    raw = {
        "merge_method": method,
        "base_model": str(base_dir),
        "models": models,
        "output": {"kind": "adapter", "rank": 3},
    }
    if method == "task_arithmetic":
        raw["parameters"] = {"lambda": 0.9, "normalize": True, "weight": [0.4, 1.0]}  # a gradient over the layers
    config = MergeConfig.model_validate(raw)
    by_qr = merge(config, tmp_path / "qr")
    monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], task_vector_weights=None))
    by_svd = merge(config, tmp_path / "svd")
    assert by_qr.refactor_error == pytest.approx(by_svd.refactor_error, rel=1e-4)
    assert by_qr.worst_refactor_error == pytest.approx(by_svd.worst_refactor_error, rel=1e-4)
    assert (tmp_path / "qr" / "adapter_config.json").read_text() == (
        tmp_path / "svd" / "adapter_config.json"
    ).read_text()
    ours, theirs = (adapter_pairs(read_adapter(tmp_path / f)) for f in ("qr", "svd"))
    assert set(ours) == set(theirs) and any(p.transposed for p in ours.values())
    for name, pair in ours.items():
        rows = pair.shape[0]
        torch.testing.assert_close(pair.delta_rows(0, rows), theirs[name].delta_rows(0, rows), atol=1e-5, rtol=1e-4)


def test_refactoring_from_the_factors_is_faster_than_an_svd_of_the_delta() -> None:
    """The speed-up on a 1024 x 1024 weight, 4 adapters of rank 16 (at 4096 x 4096 it is larger still: the SVD
    grows as n^3, the QR path as n)."""
    generator = torch.Generator().manual_seed(3)
    pairs = [random_pair(generator, (1024, 1024), 16, False) for _ in range(4)]
    terms = [(p, 0.25) for p in pairs]
    began = time.perf_counter()
    delta = sum(c * p.delta_rows(0, 1024) for p, c in terms)
    assert isinstance(delta, torch.Tensor)
    by_svd = refactor(delta, 16)
    svd_seconds = time.perf_counter() - began
    began = time.perf_counter()
    by_qr = refactor_sum(terms, 16)
    qr_seconds = time.perf_counter() - began
    print(f"1024 x 1024, 4 x rank 16: SVD of the delta {svd_seconds:.3f} s, from the factors {qr_seconds:.4f} s")
    assert by_qr.relative_error == pytest.approx(by_svd.relative_error, rel=1e-4, abs=1e-6)
    assert qr_seconds < svd_seconds / 5
