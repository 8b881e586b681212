"""`seshu quickstart`: the whole build loop, offline on a CPU in a few minutes.

Tokenizer -> untrained model's perplexity -> pretraining -> perplexity again -> samples, on the English and
Hindi sample corpus shipped in the package, so a new user sees every stage work before bringing their data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seshu import assets
from seshu.config import PretrainRecipe, load_recipe
from seshu.data.pipeline import training_documents, validation_documents
from seshu.errors import UserError
from seshu.evaluate.perplexity import evaluate_perplexity, sum_totals
from seshu.generate import SamplingOptions, generate_text
from seshu.models.loading import load_causal_lm
from seshu.tokenizer import save_tokenizer, stats_report, tokenizer_stats, train_tokenizer
from seshu.train import pretrain
from seshu.train.common import silent

RECIPE = assets.ROOT / "recipes" / "quickstart.yaml"
PROMPTS = ("The farmers of the village", "गाँव के लोग")


@dataclass
class QuickstartResult:
    workdir: Path
    tokenizer_dir: Path
    model_dir: Path
    perplexity_before: float
    perplexity_after: float
    samples: dict[str, str]


def quickstart_recipe(workdir: Path, max_steps: int | None = None) -> PretrainRecipe:
    """The quickstart's pretraining recipe, writing its model to `workdir/model`."""
    overrides = [f"output_dir={json.dumps(str(workdir / 'model'))}"]
    if max_steps:
        overrides.append(f"train.max_steps={max_steps}")
    recipe: PretrainRecipe = load_recipe(PretrainRecipe, RECIPE, overrides)
    return recipe


def train_quickstart_tokenizer(
    recipe: PretrainRecipe, tokenizer_dir: Path
) -> tuple[PreTrainedTokenizerBase, PretrainRecipe]:
    """Train the recipe's tokenizer on its training documents into `tokenizer_dir`; returns it and the recipe
    pointed at it (so that pretraining uses it instead of training another)."""
    spec = recipe.tokenizer.train
    tokenizer = train_tokenizer(
        training_documents(recipe.data, seed=recipe.train.seed),
        spec.vocab_size,
        spec.kind,
        balance_alpha=spec.balance_alpha,
        seed=recipe.train.seed,
    )
    save_tokenizer(tokenizer, tokenizer_dir)
    recipe = recipe.model_copy(update={"tokenizer": recipe.tokenizer.model_copy(update={"path": str(tokenizer_dir)})})
    return tokenizer, recipe


def run(workdir: Path, *, max_steps: int | None = None, log: Callable[[str], None] = silent) -> QuickstartResult:
    """Run the quickstart in `workdir` (its `tokenizer/` and `model/` are replaced on each run); each stage, the
    training progress and the samples go to `log`, one line at a time."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"{workdir}: exists and is not a folder; choose another --workdir")
    recipe = quickstart_recipe(workdir, max_steps)
    tokenizer_dir = workdir / "tokenizer"
    for owned in (tokenizer_dir, Path(recipe.output_dir)):
        shutil.rmtree(owned, ignore_errors=True)

    spec = recipe.tokenizer.train
    log(f"[1/5] training a {spec.kind} tokenizer with {spec.vocab_size} tokens")
    tokenizer, recipe = train_quickstart_tokenizer(recipe, tokenizer_dir)
    validation = list(validation_documents(recipe.data, seed=recipe.train.seed))
    for script, row in stats_report(tokenizer_stats(tokenizer, validation))["by_script"].items():
        log(f"      {script}: {row['fertility']:.2f} tokens per word, {row['bytes_per_token']:.2f} bytes per token")

    log(f"[2/5] perplexity of the untrained model on {len(validation)} held-out documents")
    untrained = pretrain.prepare_model(recipe, tokenizer)
    assert isinstance(untrained, PreTrainedModel)  # a fresh model: the quickstart recipe has no LoRA
    before = sum_totals(evaluate_perplexity(untrained, tokenizer, validation)).perplexity
    log(f"      {before:.1f}")

    log(f"[3/5] pretraining for {recipe.train.max_steps} steps")
    result = pretrain.run(recipe, log=log)

    log("[4/5] perplexity of the trained model")
    model, trained_tokenizer = load_causal_lm(str(result.output_dir))
    after = sum_totals(evaluate_perplexity(model, trained_tokenizer, validation)).perplexity
    log(f"      {after:.1f} ({before / after:.0f}x lower)")

    log("[5/5] samples")
    options = SamplingOptions(max_new_tokens=40, temperature=0.7, seed=recipe.train.seed)
    samples: dict[str, str] = {}
    for prompt in PROMPTS:
        samples[prompt] = generate_text(model, trained_tokenizer, prompt, options)
        log(f"      {prompt}{samples[prompt]}")
    return QuickstartResult(workdir, tokenizer_dir, result.output_dir, before, after, samples)
