"""Every shipped recipe validates, and every tiny variant really trains its architecture end to end."""

import json
from pathlib import Path

import pytest
from helpers import seshu
from transformers import AutoModelForCausalLM

from seshu.config import PretrainRecipe, SFTRecipe, load_recipe
from seshu.merge.fold import fold_adapter
from seshu.models.mamba.fast_path import PATH_SESHU
from seshu.multimodal import pipeline
from seshu.multimodal.pipeline import VLMRecipe
from seshu.train import pretrain, sft

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SFT_RECIPES = {"bloom-alpaca-lora.yaml", "baraat-hindi.yaml"}
MOE_RECIPES = {"baraat-moe.yaml"}  # validated and run in tests/test_moe_train.py
POLICY_RECIPES = {"seshu-federation.yaml"}  # a federation policy: validated in tests/test_federation_demo.py
VLM_RECIPES = {"vlm-clip-phi.yaml"}  # `seshu vlm train`
TINY_PRETRAIN = sorted(
    p.name for p in (RECIPES / "tiny").glob("*.yaml") if p.name not in SFT_RECIPES | MOE_RECIPES | VLM_RECIPES
)
COMMANDS = {**dict.fromkeys(SFT_RECIPES, "seshu sft"), **dict.fromkeys(VLM_RECIPES, "seshu vlm train")}


def kind(name: str) -> type[PretrainRecipe] | type[SFTRecipe] | type[VLMRecipe]:
    return SFTRecipe if name in SFT_RECIPES else VLMRecipe if name in VLM_RECIPES else PretrainRecipe


def losses(run: Path, key: str = "loss") -> list[float]:
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [e[key] for e in log if key in e]


@pytest.mark.parametrize(
    "path",
    sorted(p for p in RECIPES.glob("*.yaml") if p.name not in MOE_RECIPES | POLICY_RECIPES),
    ids=lambda p: p.name,
)
def test_real_scale_recipes_validate_and_document_their_command(path: Path) -> None:
    load_recipe(kind(path.name), path)
    header = path.read_text(encoding="utf-8").splitlines()[:14]
    command = COMMANDS.get(path.name, "seshu pretrain") + " --config recipes/"
    assert any(command in line for line in header)
    assert (RECIPES / "tiny" / path.name).is_file(), "every recipe has a tiny variant"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny-quickstart"
    pretrain.run(load_recipe(PretrainRecipe, RECIPES / "tiny" / "quickstart.yaml", [f"output_dir={out}"]))
    return out


@pytest.mark.parametrize("name", TINY_PRETRAIN)
def test_tiny_pretraining_variants_train_and_lower_the_loss(name: str, tmp_path: Path, tiny_base: Path) -> None:
    overrides = [f"output_dir={tmp_path / 'run'}"]
    recipe = load_recipe(PretrainRecipe, RECIPES / "tiny" / name, overrides)
    if recipe.model.init_from:
        recipe = load_recipe(PretrainRecipe, RECIPES / "tiny" / name, [*overrides, f"model.init_from={tiny_base}"])
    real = load_recipe(PretrainRecipe, RECIPES / name)
    assert recipe.model.arch == real.model.arch
    if recipe.track.report_to != "none":
        pytest.importorskip(recipe.track.report_to)  # the `track` extra (part of `dev`)
    result = pretrain.run(recipe)
    steps = losses(result.output_dir)
    assert steps[-1] < steps[0]
    if recipe.model.arch == "mamba":  # the card says which selective scan trained it
        assert f"scan: {PATH_SESHU}" in (result.output_dir / "README.md").read_text()
    assert result.steps == recipe.train.max_steps
    if recipe.track.report_to == "mlflow":
        assert (result.output_dir / "mlflow.db").stat().st_size > 0


def test_tiny_bloom_alpaca_lora_lowers_the_answer_loss(tmp_path: Path, tiny_base: Path) -> None:
    recipe = load_recipe(
        SFTRecipe,
        RECIPES / "tiny" / "bloom-alpaca-lora.yaml",
        [f"output_dir={tmp_path / 'run'}", f"model.init_from={tiny_base}"],
    )
    result = sft.run(recipe)
    steps = losses(result.output_dir)
    assert sum(steps[-3:]) < sum(steps[:3]), steps
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_the_tiny_baraat_pipeline_runs_end_to_end(tmp_path: Path, tiny_base: Path) -> None:
    """Continued pretraining with LoRA -> fold -> one LoRA expert per task -> fold each, as the recipe says."""
    cpt = pretrain.run(
        load_recipe(
            PretrainRecipe,
            RECIPES / "tiny" / "baraat-hindi-cpt.yaml",
            [f"output_dir={tmp_path / 'cpt'}", f"model.init_from={tiny_base}"],
        )
    )
    hindi_base = tmp_path / "base"
    fold_adapter(str(tiny_base), str(cpt.output_dir), hindi_base, dtype="float32")
    for task in ("translation", "instruct", "qa", "reasoning"):
        expert = sft.run(
            load_recipe(
                SFTRecipe,
                RECIPES / "tiny" / "baraat-hindi.yaml",
                [
                    f"output_dir={tmp_path / task}-lora",
                    f"model.init_from={hindi_base}",
                    f"data.train=seshu:instructions/{task}.jsonl",
                    "train.max_steps=2",
                ],
            )
        )
        fold_adapter(str(hindi_base), str(expert.output_dir), tmp_path / task, dtype="float32")
        assert AutoModelForCausalLM.from_pretrained(tmp_path / task).config.model_type == "llama"


def test_the_tiny_vlm_pipeline_runs_end_to_end(tmp_path: Path, tiny_base: Path) -> None:
    """Build (random CLIP tower, fresh Phi) -> projector pretraining -> QLoRA visual instruction tuning -> fold, on
    the bundled shapes, as recipes/tiny/vlm-clip-phi.yaml says; then resuming skips every finished stage."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    overrides = [f"output_dir={tmp_path / 'vlm'}", f"build.tokenizer={tiny_base}"]
    recipe = load_recipe(VLMRecipe, RECIPES / "tiny" / "vlm-clip-phi.yaml", overrides)
    real = load_recipe(VLMRecipe, RECIPES / "vlm-clip-phi.yaml")
    assert recipe.instruct and real.instruct and recipe.instruct.sft.method == real.instruct.sft.method == "qlora"
    lines: list[str] = []
    result = pipeline.run(recipe, log=lines.append)
    assert result.final == tmp_path / "vlm" / "chat"
    assert losses(tmp_path / "vlm" / "projector")[-1] < losses(tmp_path / "vlm" / "projector")[0]
    assert set(result.metrics) == {"projector", "instruct"}
    model = LlavaForConditionalGeneration.from_pretrained(result.final)
    AutoProcessor.from_pretrained(result.final)
    assert model.config.text_config.model_type == "phi"

    lines.clear()
    pipeline.run(recipe, resume=True, log=lines.append)
    assert [line.split(":")[0] for line in lines if "done earlier" in line] == ["vlm", "projector", "instruct", "chat"]
    again = seshu("vlm", "train", "--config", RECIPES / "tiny" / "vlm-clip-phi.yaml", "--out", tmp_path / "vlm")
    assert "already holds a VLM run; pass --resume" in again.error
