"""A donor's training step (`seshu client train`): the federation's SFT recipe on the pulled release, through
`seshu.train.sft.run` like every other fine-tune, and what the coordinator is told about the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seshu.errors import UserError
from seshu.federation import Report
from seshu.federation.client import RELEASE_MARKER
from seshu.hub.card import seshu_block
from seshu.io import write_text_atomic


def release_of(folder: Path) -> dict[str, Any]:
    """The marker `seshu client pull` leaves in a release folder (version, server, manifest)."""
    marker = Path(folder) / RELEASE_MARKER
    if not marker.is_file():
        raise UserError(f"{folder}: not a pulled release (no {RELEASE_MARKER}); run `seshu client pull` first")
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{marker}: not valid JSON; pull the release again") from None
    if not isinstance(found, dict) or not isinstance(found.get("version"), int):
        raise UserError(f"{marker}: has no release version; pull the release again")
    return found


def train_adapter(
    release: Path,
    data: str,
    out: Path,
    *,
    recipe: dict[str, Any] | None = None,
    recipe_path: Path | None = None,
    overrides: list[str] | None = None,
    log: Report | None = None,
) -> Any:
    """Fine-tune an adapter on `data` over the pulled `release`, with `recipe` (the federation's, as served) or the
    recipe file `recipe_path` (default: the packaged donor recipe); returns `SFTResult`, the run's progress going
    to `log`. The adapter folder gets the release marker, so `seshu client submit` knows what it was trained on."""
    from seshu.config import SFTRecipe, apply_overrides, deep_merge, read_yaml, validate
    from seshu.federation.coordinator import complete_donor_recipe, read_donor_recipe
    from seshu.train.common import silent
    from seshu.train.sft import run

    marker = release_of(release)
    raw = recipe if recipe is not None else (read_yaml(recipe_path) if recipe_path else read_donor_recipe(None))
    raw = deep_merge(raw, complete_donor_recipe(str(release), data, str(out)))
    checked: SFTRecipe = validate(SFTRecipe, apply_overrides(raw, overrides or []), "the federation's recipe")
    if checked.sft.method == "full":
        raise UserError("sft.method: full trains a whole model; a federation takes LoRA adapters (lora or qlora)")
    result = run(checked, log=log or silent)
    write_text_atomic(Path(result.output_dir) / RELEASE_MARKER, json.dumps(marker, indent=2) + "\n")
    return result


def adapter_facts(adapter: Path) -> dict[str, Any]:
    """What a submission reports of an adapter made by `seshu sft` / `seshu client train`: the release it was
    trained on, its training examples and answer tokens, and its recipe (all from its files; empty if unknown)."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise UserError(f"{adapter}: adapter folder not found")
    facts: dict[str, Any] = {}
    if (adapter / RELEASE_MARKER).is_file():
        facts["release"] = release_of(adapter)["version"]
    block = seshu_block(adapter)
    for key in ("examples", "answer_tokens"):
        if isinstance(block.get(key), int):
            facts[key] = block[key]
    if isinstance(block.get("recipe"), dict):
        facts["train_config"] = block["recipe"]
    return facts
