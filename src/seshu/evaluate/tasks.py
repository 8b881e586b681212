"""Generation tasks: what a record holds, how it becomes a prompt, and how the answers are scored.

Each task is one `Task` entry in `TASKS`: a reader that turns a data file into `TaskRecord`s (the prompt fields,
the references), a default prompt template, and a scorer over predictions and references. Scorers are pure
functions (`translation_scores`, `qa_scores`); running the model is `seshu.evaluate.generation_eval`'s job.

- translation: records {"source", "target"} (or two line-aligned files); chrF and BLEU from sacrebleu.
- qa: records {"question", "answer" | "answers", optional "context"}; SQuAD exact match and token F1.
- instruct: instruction records in any layout `seshu.data.instructions` reads; answer-only perplexity.

A VLM's task, caption (image-caption records, chrF and BLEU against the captions, caption-only loss), is run by
`seshu.multimodal.caption_eval` and named in `VLM_TASKS`, not `TASKS`: its records, model and loss are a VLM's.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seshu.errors import UserError

Message = dict[str, str]


@dataclass(frozen=True)
class TaskRecord:
    """One evaluation example: the fields its prompt is made from, or a conversation, and the references."""

    where: str  # "FILE, record N (line L)": how errors and outputs name it
    references: list[str]
    fields: dict[str, str] = field(default_factory=dict)  # template placeholders: source, question, context
    messages: list[Message] | None = None  # instruct: the whole conversation, ending with the answer
    images: tuple[str, ...] = ()  # caption: the image files of the prompt's `<image>` tokens, in order


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable[[str], Iterator[TaskRecord]]  # data path -> records; UserError names a bad record
    score: Callable[[list[str], list[list[str]]], dict[str, float]] | None  # None: no score from predictions
    template: str | None  # the default plain prompt (None: the prompt is the conversation)
    placeholders: frozenset[str]  # what a --prompt-template may use
    first_line: bool  # predictions are cut at the first line break (one-line answers)
    answer_perplexity: bool = False  # score the references' tokens by teacher forcing


# --------------------------------------------------------------------------------------------------
# Scoring


def translation_scores(hypotheses: list[str], references: list[list[str]] | list[str]) -> dict[str, float]:
    """Corpus chrF (character 6-grams, beta 2: sacrebleu's default, the WMT standard for morphologically rich
    languages) and BLEU (13a tokenization), both 0-100. `references` holds one reference per hypothesis, or
    a list of them (at least one each; COCO gives an image five captions, some six or seven)."""
    import sacrebleu  # imported here: only translation and caption need it

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    per_hyp: list[list[str | None]] = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if not all(per_hyp):
        raise ValueError("every hypothesis needs at least one reference")
    # sacrebleu takes reference *streams*: stream k holds the k-th reference of every hypothesis, None where a
    # hypothesis has fewer (sacrebleu's documented way to give a variable number; its type hints omit the None).
    width = max(map(len, per_hyp))
    streams: Any = [[refs[k] if k < len(refs) else None for refs in per_hyp] for k in range(width)]
    return {
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, streams).score),
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, streams).score),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(ch: str) -> bool:
    # All of Unicode's punctuation, not only ASCII's (MLQA's choice): the Devanagari danda or a CJK full stop
    # must not cost a match. ASCII's list also has symbols ($, +, <) that Unicode files elsewhere.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no English articles, single spaces."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty is a match (SQuAD 2.0's rule for unanswerable questions)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and token F1 (0-100), each the best over a question's gold answers, averaged."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    exact = f1 = 0.0
    for prediction, golds in zip(predictions, answers, strict=True):
        if not golds:
            raise ValueError("every question needs at least one gold answer")
        exact += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        f1 += max(_token_f1(prediction, g) for g in golds)
    return {"exact_match": 100 * exact / len(predictions), "f1": 100 * f1 / len(predictions)}


# --------------------------------------------------------------------------------------------------
# Records


def _text_field(record: dict[str, Any], key: str) -> str:
    if key not in record:
        raise ValueError(f"no '{key}' field (it has: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is {'empty' if isinstance(value, str) else 'not text'}")
    return value


def parse_translation(record: Any, where: str) -> TaskRecord:
    """{"source": text, "target": text} -> a translation record."""
    record = _object(record)
    return TaskRecord(where, [_text_field(record, "target")], {"source": _text_field(record, "source")})


def parse_qa(record: Any, where: str) -> TaskRecord:
    """{"question", "answer": text | "answers": [text, ...] | {"text": [...]} (SQuAD), optional "context"}."""
    record = _object(record)
    fields = {"question": _text_field(record, "question"), "context": ""}
    if record.get("context") is not None:
        fields["context"] = _text_field(record, "context")
    if "answers" in record:
        answers = record["answers"]
        if isinstance(answers, dict):  # the SQuAD dataset's {"text": [...], "answer_start": [...]}
            answers = answers.get("text")
        if not isinstance(answers, list) or not answers:
            raise ValueError("'answers' must be a non-empty list of texts")
        if not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError("every item of 'answers' must be a non-empty text")
        references = list(answers)
    elif "answer" in record:
        references = [_text_field(record, "answer")]
    else:
        raise ValueError(f"no 'answer' or 'answers' field (it has: {', '.join(map(str, record))})")
    return TaskRecord(where, references, fields)


def _object(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    return record


def _record_reader(parse: Callable[[Any, str], TaskRecord]) -> Callable[[str], Iterator[TaskRecord]]:
    def read(path: str) -> Iterator[TaskRecord]:
        from seshu.data.sources import read_records

        for record in read_records(path):  # checks the path now; malformed JSON names file and line
            try:
                yield parse(record.value, record.where)
            except ValueError as exc:
                raise UserError(f"{record.where}: {exc}") from None

    return read


def read_instruct(path: str) -> Iterator[TaskRecord]:
    """Conversations of any instruction layout; the reference is the last assistant answer."""
    from seshu.data.instructions import read_conversations

    for number, messages in enumerate(read_conversations(path), 1):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[: last + 1]  # a trailing user turn has no answer to score
        yield TaskRecord(f"{path}, conversation {number}", [messages[-1]["content"]], messages=messages)


def read_line_pairs(src_file: str | Path, tgt_file: str | Path) -> list[TaskRecord]:
    """Translation records from two line-aligned files (line n of one translates line n of the other)."""
    sources, targets = _lines(Path(src_file)), _lines(Path(tgt_file))
    if len(sources) != len(targets):
        raise UserError(
            f"{src_file} has {_count(len(sources))} but {tgt_file} has {_count(len(targets))}; "
            "line-aligned files must have the same number of lines"
        )
    records = []
    for number, (source, target) in enumerate(zip(sources, targets, strict=True), 1):
        if not source.strip() and not target.strip():
            continue  # a blank line on both sides is a gap, not a pair
        for file, text in ((src_file, source), (tgt_file, target)):
            if not text.strip():
                raise UserError(f"{file}, line {number}: empty line where its pair has text; fix the alignment")
        records.append(TaskRecord(f"{src_file}, line {number}", [target], {"source": source}))
    if not records:
        raise UserError(f"{src_file} and {tgt_file} hold no line pairs")
    return records


def _count(lines: int) -> str:
    return f"{lines} line" if lines == 1 else f"{lines} lines"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8 text; convert it to UTF-8") from None
    # Split on line feeds only: str.splitlines would also split at U+2028 or form feeds inside a sentence.
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


# --------------------------------------------------------------------------------------------------
# Prompts

_QA_TEMPLATE = "Question: {question}\nAnswer:"
_QA_CONTEXT_TEMPLATE = "{context}\n\nQuestion: {question}\nAnswer:"


def check_template(task: Task, template: str) -> None:
    """A UserError unless `template` only uses the task's placeholders (and `{{`/`}}` for braces)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise UserError(f"--prompt-template is malformed ({exc}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(names - task.placeholders)
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in sorted(task.placeholders))
        raise UserError(f"--prompt-template uses {{{unknown[0]}}}; the {task.name} task knows {allowed}")


def render_prompt(task: Task, record: TaskRecord, template: str | None, values: dict[str, str]) -> str:
    """The plain-text prompt of `record`: `template` (default: the task's) filled with the record's fields and
    `values` (target_lang, source_lang)."""
    if template is None:
        if task.name == "qa":  # with or without a context paragraph, per record
            template = _QA_CONTEXT_TEMPLATE if record.fields.get("context") else _QA_TEMPLATE
        else:
            template = task.template or ""
    filled = {**values, **record.fields}
    try:
        return template.format(**filled)
    except KeyError as exc:
        option = "--" + str(exc.args[0]).replace("_", "-")
        raise UserError(f"the prompt template uses {{{exc.args[0]}}}; give {option}") from None


TASKS: dict[str, Task] = {
    "translation": Task(
        name="translation",
        read=_record_reader(parse_translation),
        score=translation_scores,
        template="Translate to {target_lang}: {source}\n",
        placeholders=frozenset({"source", "target_lang", "source_lang"}),
        first_line=True,
    ),
    "qa": Task(
        name="qa",
        read=_record_reader(parse_qa),
        score=qa_scores,
        template=_QA_TEMPLATE,
        placeholders=frozenset({"question", "context"}),
        first_line=True,
    ),
    "instruct": Task(
        name="instruct",
        read=read_instruct,
        score=None,
        template=None,
        placeholders=frozenset(),
        first_line=False,
        answer_perplexity=True,
    ),
}


# Tasks on image records, for a VLM. Kept out of `TASKS`, which is also what a federation judges text adapters on.
VLM_TASKS = ("caption",)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}") from None
