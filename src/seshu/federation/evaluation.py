"""Scoring a model (a release, with a submission's adapter or without) on the federation's frozen sets.

An evaluation set's name says what it measures:

- `general` or `general-<lang>`: documents (text, one per line, or jsonl with `text`); perplexity over them,
  lower is better. This is the check that an adapter does not damage the language as a whole.
- `<task>` or `<task>-<lang>`, with a task of `seshu eval generate` (`translation`, `qa`, `instruct`): the task's
  records. Translation is scored by chrF of greedy answers (higher is better); the other tasks by the
  answer-only perplexity of the references (lower is better), which is smooth where exact match on a small
  model is mostly zero.
- `probe-<name>`: canary conversations (instruct records) whose answers must not become less likely: scored by
  answer-only perplexity and held to the policy's regression bound like every other set.

Every score is {"value", "higher_is_better", "metric"}, so that policies compare any set the same way. The
scoring itself is `seshu.evaluate`'s; nothing here computes a metric of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seshu.errors import UserError

KINDS = ("general", "task", "probe")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
# Greedy answers are short in the tasks scored by generation (translation: one line).
MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class SetKind:
    kind: str  # general | task | probe
    task: str | None
    language: str | None


def parse_set_name(name: str) -> SetKind:
    """What an evaluation set named `name` measures (see the module's docstring)."""
    from seshu.evaluate.tasks import TASKS

    if not _NAME.match(name):
        raise UserError(
            f"evaluation set name '{name}': use lower-case letters, digits, '.', '_' and '-' (e.g. general-hi, "
            "translation-hi, probe-safety)"
        )
    head, _, tail = name.partition("-")
    if head == "general":
        return SetKind("general", None, tail or None)
    if head == "probe":
        if not tail:
            raise UserError(f"evaluation set name '{name}': a probe set is named probe-<name>")
        return SetKind("probe", "instruct", None)
    if head in TASKS:
        return SetKind("task", head, tail or None)
    raise UserError(
        f"evaluation set name '{name}': start it with general, probe or a task ({', '.join(TASKS)}), "
        "optionally followed by -<language>"
    )


def task_set(task: str, language: str, sets: Mapping[str, Any]) -> str:
    """The evaluation set a submission's declared task is judged on: `<task>-<language>` when the federation has
    one, else `<task>` (which may be missing: the policy then rejects the submission for it)."""
    specific = f"{task}-{language}"
    return specific if specific in sets else task


def check_set_file(name: str, path: Path) -> int:
    """Read the set as the evaluation will, so that a malformed file fails at init; returns its record count."""
    kind = parse_set_name(name)
    if kind.kind == "general":
        from seshu.data.sources import read_documents

        count = sum(1 for _ in read_documents(str(path)))
    else:
        from seshu.evaluate.tasks import get_task, render_prompt

        assert kind.task is not None
        task = get_task(kind.task)
        records = list(task.read(str(path)))
        count = len(records)
        if records and task.template is not None and kind.kind == "task":
            render_prompt(task, records[0], None, prompt_values(name))  # a prompt it cannot make fails now
    if count == 0:
        raise UserError(f"{path}: evaluation set '{name}' holds no records")
    return count


def prompt_values(name: str) -> dict[str, str]:
    """What a task's prompt template takes from the set's name: a translation set `translation-<lang>` translates
    into `<lang>`."""
    kind = parse_set_name(name)
    if kind.task == "translation" and kind.language is None:
        raise UserError(f"evaluation set '{name}': name a translation set translation-<target language>")
    return {"target_lang": kind.language} if kind.task == "translation" and kind.language else {}


def eval_set_files(cache: Path, sets: dict[str, Any], fetch: Callable[[str, Path], None]) -> dict[str, Path]:
    """The frozen evaluation sets (name -> {sha256, filename}) as local files under `cache`, each fetched once by
    `fetch(sha256, dest)` (from the store, or over HTTP) and kept under its hash, so a copy never goes stale."""
    out = {}
    for name, item in sets.items():
        path = Path(cache) / "eval-sets" / item["sha256"] / item["filename"]
        if not path.is_file():
            fetch(item["sha256"], path)
        out[name] = path
    return out


def score(value: float, higher_is_better: bool, metric: str) -> dict[str, Any]:
    """A score as it is stored and sent. A diverged figure (inf, NaN) is `None`: JSON has no infinity, and
    PostgreSQL's JSON refuses one; the policy reads `None` as the worst score there is."""
    value = float(value)
    return {"value": value if math.isfinite(value) else None, "higher_is_better": higher_is_better, "metric": metric}


def score_sets(model: Any, tokenizer: Any, sets: dict[str, Path], batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """The model's score on every set (`sets`: name -> local file)."""
    return {name: _score_one(model, tokenizer, name, path, batch_size) for name, path in sorted(sets.items())}


def _score_one(model: Any, tokenizer: Any, name: str, path: Path, batch_size: int) -> dict[str, Any]:
    from seshu.evaluate.generation_eval import answer_nll, evaluate_generation
    from seshu.evaluate.perplexity import evaluate_perplexity, sum_totals
    from seshu.evaluate.tasks import get_task

    kind = parse_set_name(name)
    if kind.kind == "general":
        from seshu.data.sources import read_documents

        totals = sum_totals(evaluate_perplexity(model, tokenizer, read_documents(str(path)), batch_size=batch_size))
        return score(totals.perplexity, False, "perplexity")
    assert kind.task is not None
    task = get_task(kind.task)
    records = list(task.read(str(path)))
    if task.answer_perplexity or task.score is None or kind.kind == "probe":
        conversations = [r.messages for r in records if r.messages is not None]
        if not conversations:
            raise UserError(f"{path}: evaluation set '{name}' has no conversations to score")
        return score(answer_nll(model, tokenizer, conversations, batch_size=batch_size).perplexity, False, "answer_ppl")
    result = evaluate_generation(
        model,
        tokenizer,
        task,
        records,
        values=prompt_values(name),
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=batch_size,
    )
    metric = "chrf" if "chrf" in result.scores else next(iter(result.scores))
    return score(result.scores[metric], True, metric)


def score_folder(
    model_dir: Path, adapter_dir: Path | None, sets: dict[str, Path], device: str | None = None
) -> dict[str, dict[str, Any]]:
    """Load the model (with the adapter, through Seshu's one checked adapter loader) and score it."""
    from seshu.generate import load_for_generation

    model, tokenizer = load_for_generation(str(model_dir), str(adapter_dir) if adapter_dir else None, device)
    return score_sets(model, tokenizer, sets)
