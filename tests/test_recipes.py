"""Every shipped recipe validates, and every tiny variant really trains its architecture end to end."""

import json
from pathlib import Path

import pytest

from seshu.config import PretrainRecipe, load_recipe
from seshu.train import pretrain

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = sorted(p.name for p in (RECIPES / "tiny").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_real_scale_recipes_validate_and_document_their_command(path: Path) -> None:
    load_recipe(PretrainRecipe, path)
    header = path.read_text(encoding="utf-8").splitlines()[:12]
    assert any("seshu pretrain --config recipes/" in line for line in header)
    assert (RECIPES / "tiny" / path.name).is_file(), "every recipe has a tiny variant"


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_train_and_lower_the_loss(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(PretrainRecipe, RECIPES / "tiny" / name, [f"output_dir={tmp_path / 'run'}"])
    real = load_recipe(PretrainRecipe, RECIPES / name)
    if recipe.track.report_to != "none":
        pytest.importorskip(recipe.track.report_to)  # the `track` extra (part of `dev`)
    assert recipe.model.arch == real.model.arch
    result = pretrain.run(recipe)
    log = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    assert result.steps == recipe.train.max_steps
    if recipe.track.report_to == "mlflow":
        assert (result.output_dir / "mlflow.db").stat().st_size > 0
