"""Arrival checks on uploaded adapters: the folder's files, then the adapter against its release and the limits."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from federation_helpers import edit_adapter_config, edit_adapter_tensor, save_lora_adapter, save_tiny_base

from seshu.errors import UserError
from seshu.federation.policy import Policy
from seshu.federation.validation import check_files, check_name, validate_adapter
from seshu.merge.adapters import read_adapter
from seshu.merge.lora import adapter_pairs

BIG = 10**9


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("release") / "v1")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora_adapter(base_dir, tmp_path_factory.mktemp("adapters") / "a", seed=3, r=4, alpha=16)


@pytest.fixture(scope="module")
def embedding_adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    return save_lora_adapter(base_dir, root / "e", seed=4, r=2, alpha=4, targets=["embed_tokens", "o_proj"])


@pytest.fixture
def upload(adapter_dir: Path, tmp_path: Path) -> Path:
    """A copy of the adapter to tamper with."""
    return Path(shutil.copytree(adapter_dir, tmp_path / "upload"))


def policy(**limits: object) -> Policy:
    return Policy.model_validate({"limits": limits})


def brute_force_norms(folder: Path) -> dict[str, float]:
    """||scale * B @ A||_F of every weight from the full float64 delta."""
    out = {}
    for name, pair in adapter_pairs(read_adapter(folder)).items():
        delta = pair.b.double() @ pair.a.double() * pair.scale
        out[name] = float(torch.linalg.norm(delta))
    return out


# --------------------------------------------------------------------------------------------------
# Files


def test_a_saved_adapter_with_tokenizer_files_passes(upload: Path) -> None:
    (upload / "tokenizer.json").write_text('{"model": {}}', encoding="utf-8")
    (upload / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    (upload / "merges.txt").write_text("a b\n", encoding="utf-8")
    (upload / "tokenizer.model").write_bytes(b"\x0a\x09\x0a\x05<unk>\x15\x00\x00\x00\x00")
    sizes = check_files(upload, BIG)
    assert set(sizes) == {
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "merges.txt",
        "tokenizer.json", "tokenizer.model",
    }  # fmt: skip
    assert sizes["adapter_model.safetensors"] == (upload / "adapter_model.safetensors").stat().st_size


def test_renamed_pickles_and_archives_are_caught_by_their_bytes(upload: Path) -> None:
    weights = upload / "adapter_model.safetensors"
    weights.write_bytes(pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=4))
    with pytest.raises(UserError, match=r"adapter_model.safetensors: is a pickle"):
        check_files(upload, BIG)
    torch.save({"lora_A": torch.ones(2)}, weights)  # a zip holding a pickle
    with pytest.raises(UserError, match="is a zip archive"):
        check_files(upload, BIG)
    weights.write_bytes((7).to_bytes(8, "little") + b"[1, 2 ]" + b"\0" * 8)
    with pytest.raises(UserError, match="not a safetensors file"):
        check_files(upload, BIG)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("adapter_model.bin", b"\x80\x04K\x01.", "pickle weights can run code"),
        ("optimizer.pt", b"\x80\x02K\x01.", "pickle weights can run code"),
        ("adapter.zip", b"PK\x03\x04", "archives are not accepted"),
        ("setup.py", b"print(1)", "executables and code are not accepted"),
        ("train.sh", b"#!/bin/sh", "executables and code are not accepted"),
        ("notes.csv", b"a,b", "not a file an adapter folder holds"),
        (".hidden", b"", "not allowed"),
        ("tokenizer.model", b"\x80\x04K\x01.", "is a pickle"),
        ("tokenizer.model", b"\x12\x00", "not a sentencepiece model"),
        ("vocab.txt", b"\x7fELF\x02\x01", "is an executable"),
        ("vocab.txt", b"\xff\xfe\x00", "not UTF-8 text"),
        ("tokenizer_config.json", b"{oops", "not valid JSON"),
    ],
)
def test_refused_files(upload: Path, name: str, content: bytes, message: str) -> None:
    (upload / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        check_files(upload, BIG)


def test_links_subfolders_size_and_missing_files(upload: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text("{}", encoding="utf-8")
    os.symlink(outside, upload / "tokenizer.json")
    with pytest.raises(UserError, match="a link"):
        check_files(upload, BIG)
    (upload / "tokenizer.json").unlink()
    (upload / "nested").mkdir()
    with pytest.raises(UserError, match="a subfolder"):
        check_files(upload, BIG)
    (upload / "nested").rmdir()
    total = sum(p.stat().st_size for p in upload.iterdir())
    assert sum(check_files(upload, total).values()) == total
    with pytest.raises(UserError, match=f"over the size limit of {total - 1} bytes"):
        check_files(upload, total - 1)
    (upload / "adapter_config.json").unlink()
    with pytest.raises(UserError, match=r"has no adapter_config.json"):
        check_files(upload, BIG)


@pytest.mark.parametrize("name", ["..", "../x.json", "a/b.json", "a\\b.json", ".env", "x\0.json", "", "c:x.json"])
def test_names_that_leave_the_folder(name: str) -> None:
    with pytest.raises(UserError, match="not allowed"):
        check_name(name)


# --------------------------------------------------------------------------------------------------
# The adapter against the release


def test_validated_adapter_measures_exactly(adapter_dir: Path, base_dir: Path) -> None:
    found = validate_adapter(adapter_dir, base_dir, Policy())
    tensors = read_adapter(adapter_dir).tensors
    assert found.rank == 4
    assert found.target_modules == ("down_proj", "q_proj", "v_proj")
    assert found.parameters == sum(t.numel() for t in tensors.values())
    # q_proj and v_proj: A [4, 32] + B [32 or 16, 4]; down_proj: A [4, 64] + B [32, 4]; two layers.
    assert found.parameters == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4 + 4 * 64 + 32 * 4)
    assert found.sha256 == hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    expected = brute_force_norms(adapter_dir)
    assert set(found.module_norms) == set(expected)
    assert len(expected) == 6
    for name, norm in expected.items():
        assert found.module_norms[name] == pytest.approx(norm, rel=1e-9)
    assert found.total_norm == pytest.approx(sum(n * n for n in expected.values()) ** 0.5, rel=1e-9)
    assert found.total_norm > 0.05  # B is random, so the update is not trivially zero
    assert set(found.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def test_embedding_updates_are_measured_in_their_layout(embedding_adapter_dir: Path, base_dir: Path) -> None:
    found = validate_adapter(embedding_adapter_dir, base_dir, Policy())
    assert found.target_modules == ("embed_tokens", "o_proj")
    expected = brute_force_norms(embedding_adapter_dir)
    assert "model.embed_tokens.weight" in expected
    for name, norm in expected.items():
        assert found.module_norms[name] == pytest.approx(norm, rel=1e-9)


def test_limits_refuse(adapter_dir: Path, base_dir: Path) -> None:
    found = validate_adapter(adapter_dir, base_dir, Policy())
    largest = max(found.module_norms.values())
    cases: list[tuple[dict[str, object], str]] = [
        ({"max_rank": 2}, "rank 4 is over the limit of 2"),
        ({"max_module_norm": largest * 0.99}, "has norm .* over the limit"),
        ({"max_total_norm": found.total_norm * 0.99}, "the whole update has norm"),
        ({"allowed_target_modules": ["q_proj", "v_proj"]}, "adapts down_proj, which this federation does not allow"),
        ({"required_target_modules": ["o_proj"]}, "does not adapt o_proj"),
        ({"max_adapter_bytes": 1000}, "over the size limit of 1000 bytes"),
    ]
    for limits, message in cases:
        with pytest.raises(UserError, match=message):
            validate_adapter(adapter_dir, base_dir, policy(**limits))
    exact = policy(max_rank=4, max_module_norm=largest * 1.0001, max_total_norm=found.total_norm * 1.0001)
    assert validate_adapter(adapter_dir, base_dir, exact).rank == 4


def test_an_adapter_of_another_base_is_refused(base_dir: Path, tmp_path: Path) -> None:
    wider = save_tiny_base(tmp_path / "wider", hidden_size=64, intermediate_size=128)
    foreign = save_lora_adapter(wider, tmp_path / "foreign", seed=5)
    with pytest.raises(UserError, match=r"has shape .* the adapter was trained on another base model"):
        validate_adapter(foreign, base_dir, Policy())


def test_architecture_named_by_peft_must_match(upload: Path, base_dir: Path) -> None:
    edit_adapter_config(upload, auto_mapping={"base_model_class": "MistralForCausalLM", "parent_library": "x"})
    with pytest.raises(UserError, match="trained on a MistralForCausalLM but the release is a LlamaForCausalLM"):
        validate_adapter(upload, base_dir, Policy())
    edit_adapter_config(upload, auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "x"})
    assert validate_adapter(upload, base_dir, Policy()).rank == 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "sets use_dora, so its change is not a low-rank weight delta"),
        ({"modules_to_save": ["lm_head"]}, "sets modules_to_save"),
        ({"bias": "all"}, "trains biases"),
        ({"secret_field": 1}, "field 'secret_field' is unknown"),
    ],
)
def test_adapters_that_are_not_plain_deltas_are_refused(
    upload: Path, base_dir: Path, changes: dict[str, object], message: str
) -> None:
    edit_adapter_config(upload, **changes)
    with pytest.raises(UserError, match=message):
        validate_adapter(upload, base_dir, Policy())


def test_non_finite_values_are_refused(upload: Path, base_dir: Path) -> None:
    name = edit_adapter_tensor(upload, "lora_B", float("nan"))
    with pytest.raises(UserError, match=f"tensor {name} holds NaN or infinite values"):
        validate_adapter(upload, base_dir, Policy())


def test_an_honest_update_scaled_50_times_is_refused_by_the_relative_limit(adapter_dir: Path, base_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    honest = validate_adapter(adapter_dir, base_dir, Policy())
    assert honest.module_norms  # passes the default relative limit (0.5 of each weight's norm)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 50 if "lora_B" in k else v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"times the weight's own norm, over the limit 0\.5"):
        validate_adapter(adapter_dir, base_dir, Policy())
    # The limit is the policy's: lifted, the same adapter passes.
    lifted = Policy.model_validate({"limits": {"max_relative_update": 1000}})
    assert validate_adapter(adapter_dir, base_dir, lifted).total_norm == pytest.approx(50 * honest.total_norm)
