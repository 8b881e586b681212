"""`seshu merge` agrees with mergekit 0.1.5 on every method both have, without mergekit installed: its outputs on
tiny seeded models are committed in tests/golden/mergekit/ (rebuilt by regenerate.py there, whose docstring has
the command). The live comparison against an installed mergekit is in test_merge_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seshu.merge.engine import merge_file
from seshu.merge.methods import METHODS

GOLDEN = Path(__file__).parent / "golden" / "mergekit"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))


def test_every_method_mergekit_has_is_covered() -> None:
    covered = {yaml.safe_load((GOLDEN / f"{case}.yaml").read_text())["merge_method"] for case in CASES}
    assert covered == set(METHODS)


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit_golden_output(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)  # the configs name the inputs relative to their folder
    report = merge_file(Path(f"{case}.yaml"), tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = load_file(str(GOLDEN / f"{case}.safetensors"))
    assert set(ours) == set(theirs) and report.tensors == len(theirs)
    base = load_file(str(GOLDEN / "inputs" / "base" / "model.safetensors"))
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype == torch.float32
        assert torch.allclose(tensor, theirs[name], atol=1e-6, rtol=0), (name, (tensor - theirs[name]).abs().max())
    assert any(not torch.equal(ours[n], base[n]) for n in ours)  # a merge, not a copy of the base
