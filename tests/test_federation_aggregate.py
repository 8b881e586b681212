"""The release merge and what feeds it: exact similarity of LoRA updates, near-duplicate groups, release weights
(caps and groups), the merge config, and a fedavg release checked against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from federation_helpers import lora_delta, save_lora_adapter, save_tiny_base
from safetensors.torch import load_file

from seshu.errors import UserError
from seshu.federation.aggregate import Contribution, merge_release, release_merge_config, release_weights
from seshu.federation.policy import Policy
from seshu.federation.similarity import (
    cosine,
    cross_client_groups,
    module_norms,
    near_duplicate_groups,
    pair_inner,
    update_inner,
)
from seshu.merge.lora import LoraPair

CAP = 1000


def random_pair(gen: torch.Generator, weight: str, shape: tuple[int, int], rank: int, transposed: bool) -> LoraPair:
    rows, cols = shape
    out, inner = (cols, rows) if transposed else (rows, cols)
    a = torch.randn(rank, inner, generator=gen, dtype=torch.float64)
    b = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    scale = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 4 + 0.5
    return LoraPair(weight, a, b, scale, transposed, embedding=transposed)


def dense(pair: LoraPair) -> torch.Tensor:
    """The full delta, the brute-force way."""
    delta = pair.b.double() @ pair.a.double() * pair.scale
    return delta.T if pair.transposed else delta


def flat(update: dict[str, LoraPair], names: list[str], shapes: dict[str, tuple[int, int]]) -> torch.Tensor:
    """The update as one vector over `names` (zeros where it does not adapt a weight)."""
    parts = [dense(update[n]) if n in update else torch.zeros(shapes[n], dtype=torch.float64) for n in names]
    return torch.cat([p.reshape(-1) for p in parts])


SHAPES = {"q.weight": (6, 5), "emb.weight": (9, 4), "sq.weight": (5, 5), "down.weight": (4, 7)}


def random_update(seed: int, names: list[str], transposed: tuple[str, ...] = ("emb.weight",)) -> dict[str, LoraPair]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: random_pair(gen, n, SHAPES[n], int(torch.randint(1, 5, (1,), generator=gen)), n in transposed) for n in names
    }


# --------------------------------------------------------------------------------------------------
# Similarity


def test_inner_products_from_factors_equal_the_full_deltas() -> None:
    for seed in range(5):
        x = random_update(seed, list(SHAPES))
        y = random_update(100 + seed, list(SHAPES), transposed=("emb.weight", "sq.weight"))  # sq: mixed layouts
        for name in SHAPES:
            brute = float((dense(x[name]) * dense(y[name])).sum())
            assert pair_inner(x[name], y[name]) == pytest.approx(brute, rel=1e-9, abs=1e-12)
        for name, norm in module_norms(x).items():
            assert norm == pytest.approx(float(torch.linalg.norm(dense(x[name]))), rel=1e-9)


def test_cosine_of_whole_updates_equals_brute_force() -> None:
    names = sorted(SHAPES)
    x = random_update(1, ["q.weight", "emb.weight", "sq.weight"])
    y = random_update(2, ["q.weight", "down.weight", "sq.weight"])  # adapts partly other weights
    vx, vy = flat(x, names, SHAPES), flat(y, names, SHAPES)
    assert update_inner(x, y) == pytest.approx(float(vx @ vy), rel=1e-9)
    brute = float(vx @ vy / (vx.norm() * vy.norm()))
    assert cosine(x, y) == pytest.approx(brute, rel=1e-9, abs=1e-12)
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-12)


def reparametrized(update: dict[str, LoraPair], b_factor: float, scale_factor: float = 1.0) -> dict[str, LoraPair]:
    """The same (or a scaled) update with other factors: B * f, A / f."""
    return {
        n: LoraPair(p.weight, p.a / b_factor, p.b * b_factor, p.scale * scale_factor, p.transposed, p.embedding)
        for n, p in update.items()
    }


def test_cosine_sees_through_factorisation_and_scale() -> None:
    x = random_update(3, list(SHAPES))
    assert cosine(x, reparametrized(x, 3.0, scale_factor=0.25)) == pytest.approx(1.0, abs=1e-12)
    assert cosine(x, reparametrized(x, 1.0, scale_factor=-1.0)) == pytest.approx(-1.0, abs=1e-12)
    zero = reparametrized(x, 1.0, scale_factor=0.0)
    assert cosine(x, zero) == 0.0


def test_near_duplicate_groups_count_copies_whoever_sent_them() -> None:
    base = random_update(10, list(SHAPES))
    gen = torch.Generator().manual_seed(11)
    nudged = {
        n: LoraPair(p.weight, p.a + 1e-3 * torch.randn(p.a.shape, generator=gen, dtype=torch.float64), p.b, p.scale,
                    p.transposed, p.embedding)
        for n, p in base.items()
    }  # fmt: skip
    other = random_update(12, list(SHAPES))
    updates = [base, nudged, other, reparametrized(base, 2.0), random_update(13, list(SHAPES)), other]
    clients = ["ana", "bo", "cy", "di", "ed", "cy"]
    assert cosine(base, nudged) > 0.99
    assert abs(cosine(base, other)) < 0.5
    groups = near_duplicate_groups(updates, clients, 0.95)
    assert groups == [[0, 1, 3], [2, 5]]
    # cy's resubmission counts once but is no collusion; ana, bo and di sent one update between them.
    assert cross_client_groups(groups, clients) == [[0, 1, 3]]
    assert near_duplicate_groups(updates, clients, 1.0 - 1e-12) == [[0, 3], [2, 5]]
    with pytest.raises(UserError, match="a cosine in"):
        near_duplicate_groups(updates, clients, 0.0)


# --------------------------------------------------------------------------------------------------
# Weights


def policy(**release: object) -> Policy:
    return Policy.model_validate({"limits": {"max_claimed_examples": CAP}, "release": release})


def test_fedavg_weights_are_capped_claims() -> None:
    contributions = [Contribution(Path("a"), 100), Contribution(Path("b"), 300), Contribution(Path("c"), 10**9)]
    assert release_weights(contributions, policy()) == [100.0, 300.0, 1000.0]
    assert release_weights(contributions, policy(), "ties") == [1.0, 1.0, 1.0]
    assert release_weights(contributions, policy(method="ties", weighting="examples")) == [100.0, 300.0, 1000.0]
    with pytest.raises(UserError, match="claims 0 training examples"):
        release_weights([Contribution(Path("z"), 0)], policy())
    with pytest.raises(UserError, match="unknown release method 'mean'"):
        release_weights(contributions, policy(), "mean")


def test_five_clients_with_one_adapter_weigh_as_one_capped_submission() -> None:
    copies = [Contribution(Path("same"), 10**9, group=7) for _ in range(5)]
    weights = release_weights([*copies, Contribution(Path("honest"), 500)], policy())
    assert weights == [200.0] * 5 + [500.0]
    assert sum(weights[:5]) == CAP
    # Copying neither adds to nor, by claiming less, takes from the largest claim in the group.
    group = [Contribution(Path("x"), 800, group=1), Contribution(Path("y"), 1, group=1)]
    assert release_weights(group, policy()) == [400.0, 400.0]
    assert release_weights(group, policy(), "task_arithmetic") == [0.5, 0.5]


# --------------------------------------------------------------------------------------------------
# The merge


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("federation")
    base = save_tiny_base(root / "v1", seed=0)
    adapters = [
        save_lora_adapter(base, root / "r2", seed=1, r=2, alpha=4, targets=["q_proj", "v_proj"], b_std=0.1),
        save_lora_adapter(base, root / "r4", seed=2, r=4, alpha=16, targets=["q_proj", "down_proj"], b_std=0.1),
        save_lora_adapter(base, root / "r8", seed=3, r=8, alpha=8, targets=["q_proj", "o_proj", "up_proj"], b_std=0.1),
    ]
    return base, adapters


def adapted_weights(adapter: Path) -> set[str]:
    return {
        k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        for k in load_file(str(adapter / "adapter_model.safetensors"))
        if ".lora_A." in k
    }


def test_release_merge_config(release: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = release
    contributions = [Contribution(a, 10) for a in adapters]
    fedavg = release_merge_config(base, contributions, [1.0, 2.0, 3.0], "fedavg", 0)
    assert fedavg.merge_method == "task_arithmetic"
    assert fedavg.parameters == {"lambda": 1.0, "seed": 0, "normalize": True}
    assert [m.parameters for m in fedavg.models] == [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]
    assert (fedavg.dtype, fedavg.out_dtype, fedavg.tokenizer_source, fedavg.output.kind) == (
        "float32", "float32", "base", "model",
    )  # fmt: skip
    ties = release_merge_config(base, contributions, [1.0] * 3, "ties", 5, policy(density=0.3, **{"lambda": 0.7}))
    assert ties.merge_method == "ties"
    assert ties.parameters == {"lambda": 0.7, "seed": 5}
    assert ties.models[0].parameters == {"weight": 1.0, "density": 0.3}
    dare = release_merge_config(base, contributions, [1.0] * 3, policy=policy(method="dare_ties", seed=9))
    assert (dare.merge_method, dare.parameters["seed"]) == ("dare_ties", 9)
    from transformers import AutoModelForCausalLM

    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(base)).bfloat16().save_pretrained(str(half))
    assert release_merge_config(half, contributions, [1.0] * 3).out_dtype == "bfloat16"
    with pytest.raises(UserError, match="no accepted submissions"):
        release_merge_config(base, [], [])


def test_fedavg_release_equals_the_hand_computed_average(release: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = release
    contributions = [Contribution(adapters[0], 100), Contribution(adapters[1], 300), Contribution(adapters[2], 10**9)]
    report = merge_release(base, contributions, policy(), None, tmp_path / "v2")
    weights = [100.0, 300.0, float(CAP)]
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(report.out / "model.safetensors"))
    assert set(after) == set(before)
    adapted = set().union(*(adapted_weights(a) for a in adapters))
    assert len(adapted) == 2 * 5  # q, v, down, o, up in two layers
    for name in sorted(before):
        if name not in adapted:
            assert torch.equal(after[name], before[name]), name  # bit for bit
            continue
        total = torch.zeros_like(before[name])
        for adapter, w in zip(adapters, weights, strict=True):
            if name in adapted_weights(adapter):
                total += w * lora_delta(adapter, name)
        expected = before[name] + total / sum(weights)
        assert after[name].dtype == torch.float32
        assert torch.allclose(after[name], expected, rtol=0, atol=1e-6), name
        assert float((after[name] - before[name]).abs().max()) > 1e-3  # the update is there, not rounded away


def test_copies_of_one_adapter_merge_as_that_adapter(release: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = release
    copies = [Contribution(adapters[1], 10**9, group=0) for _ in range(5)]
    report = merge_release(base, copies, policy(), "fedavg", tmp_path / "v2")
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(report.out / "model.safetensors"))
    for name in adapted_weights(adapters[1]):
        expected = before[name] + lora_delta(adapters[1], name)
        assert torch.allclose(after[name], expected, rtol=0, atol=1e-6), name
    assert math.isclose(sum(release_weights(copies, policy())), CAP)
