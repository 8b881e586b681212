"""Instruction data: every format to canonical messages, bad records named by file and record, the chat
template, and the answer-only mask (the labels SFT trains on)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from seshu.chat import CHAT_TOKENS, DEFAULT_CHAT_TEMPLATE, ensure_chat_template
from seshu.data.instructions import (
    FORMATS,
    InstructionStats,
    detect_format,
    labels_from_mask,
    read_conversations,
    tokenize_conversation,
    validate_conversation,
)
from seshu.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def convert(fmt: str, record: dict[str, Any]) -> list[list[dict[str, str]]]:
    return FORMATS[fmt].convert(record)


# --- formats ---------------------------------------------------------------------------------------------


def test_alpaca_with_and_without_input() -> None:
    assert convert("alpaca", {"instruction": "Add them.", "input": "2, 3", "output": "5"}) == [
        [user("Add them.\n\n2, 3"), assistant("5")]
    ]
    no_input = [[user("Name a colour."), assistant("Blue.")]]
    assert convert("alpaca", {"instruction": "Name a colour.", "input": "", "output": "Blue."}) == no_input
    assert convert("alpaca", {"instruction": "Name a colour.", "output": "Blue."}) == no_input
    assert convert("alpaca", {"instruction": "Name a colour.", "input": None, "output": "Blue."}) == no_input


def test_alpaca_with_system_and_history_fields() -> None:
    record = {"instruction": "And 3+3?", "output": "6", "system": "Be terse.", "history": [["2+2?", "4"]]}
    assert convert("alpaca", record) == [
        [system("Be terse."), user("2+2?"), assistant("4"), user("And 3+3?"), assistant("6")]
    ]


def test_sharegpt_with_a_system_turn_and_any_case_of_speaker() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "You are kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "User", "value": "Bye"},
            {"from": "assistant", "value": "Goodbye."},
        ]
    }
    assert convert("sharegpt", record) == [
        [system("You are kind."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")]
    ]


def test_messages_under_messages_or_conversations_and_text_parts() -> None:
    turns = [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello!"}]
    assert convert("messages", {"messages": turns}) == [[user("Hi"), assistant("Hello!")]]
    assert convert("messages", {"conversations": turns}) == [[user("Hi"), assistant("Hello!")]]
    parts = {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    developer = {"role": "developer", "content": "Be brief."}
    assert convert("messages", {"messages": [developer, parts, turns[1]]}) == [
        [system("Be brief."), user("Hi there"), assistant("Hello!")]
    ]


def test_prompt_completion_strings_and_conversational() -> None:
    assert convert("prompt_completion", {"prompt": "The sky is", "completion": "blue."}) == [
        [user("The sky is"), assistant("blue.")]
    ]
    record = {"prompt": [system("S"), user("Q")], "completion": [assistant("A")]}
    assert convert("prompt_completion", record) == [[system("S"), user("Q"), assistant("A")]]


def test_self_instruct_gives_one_conversation_per_instance() -> None:
    record = {
        "instruction": "Give the antonym.",
        "instances": [{"input": "hot", "output": "cold"}, {"input": "", "output": "Give me a word."}],
        "is_classification": False,
    }
    assert convert("self_instruct", record) == [
        [user("Give the antonym.\n\nhot"), assistant("cold")],
        [user("Give the antonym."), assistant("Give me a word.")],
    ]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "instances": []}, "self_instruct"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
        ({"conversations": [{"role": "user", "content": "x"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ],
)
def test_detect_format(record: dict[str, Any], expected: str) -> None:
    assert detect_format(record) == expected


def test_undetectable_record_lists_the_formats_and_its_keys() -> None:
    with pytest.raises(ValueError) as info:
        detect_format({"question": "q", "answer": "a"})
    message = str(info.value)
    assert "(question, answer)" in message
    assert all(name in message for name in FORMATS)


@pytest.mark.parametrize(
    ("conversation", "problem"),
    [
        ([], "empty"),
        ([user("q")], "no assistant turn"),
        ([user("q"), assistant("  ")], "turn 2 (assistant) has no text"),
        ([user("q"), {"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([user("q"), assistant("a"), system("s")], "only the first turn"),
        ([assistant("a"), user("q")], "turn 1 is a assistant turn where a user turn belongs"),
        ([system("s"), user("q"), user("q2"), assistant("a")], "turn 3 is a user turn where an assistant turn belongs"),
    ],
)
def test_validate_conversation_rejects(conversation: list[dict[str, str]], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        validate_conversation(conversation)


# --- reading files ---------------------------------------------------------------------------------------

ALPACA = [
    {"instruction": "Add.", "input": "1 2", "output": "3"},
    {"instruction": "Greet.", "input": "", "output": "Hello."},
]
ALPACA_CONVERSATIONS = [
    [user("Add.\n\n1 2"), assistant("3")],
    [user("Greet."), assistant("Hello.")],
]


def test_json_list_jsonl_and_parquet_read_the_same(tmp_path: Path) -> None:
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), parquet)
    for path in (listed, lines, parquet):
        assert list(read_conversations(str(path))) == ALPACA_CONVERSATIONS, path


def test_parquet_with_nested_messages(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    rows = [{"messages": [user("Hi"), assistant("Hello!")]}, {"messages": [user("2+2?"), assistant("4")]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert list(read_conversations(str(path))) == [r["messages"] for r in rows]


def test_auto_detects_each_file_of_a_folder_and_a_format_overrides(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a_alpaca.jsonl", ALPACA)
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    write_jsonl(tmp_path / "b_sharegpt.jsonl", sharegpt)
    (tmp_path / "notes.txt").write_text("not instruction data\n", encoding="utf-8")
    assert list(read_conversations(str(tmp_path))) == [*ALPACA_CONVERSATIONS, [user("Hi"), assistant("Yo")]]
    with pytest.raises(UserError, match=r"b_sharegpt\.jsonl, record 1 \(line 1\): no 'instruction' field"):
        list(read_conversations(str(tmp_path), format="alpaca"))


def test_a_mixed_file_fails_on_the_odd_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [*ALPACA, {"messages": [user("q"), assistant("a")]}])
    where = r"mixed\.jsonl, record 3 \(line 3\)"
    with pytest.raises(UserError, match=where + r": no 'instruction' field \(it has: messages\)"):
        list(read_conversations(str(path)))


CHAT = {"messages": [user("q"), assistant("a")]}
SHAREGPT = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


@pytest.mark.parametrize(
    ("good", "bad", "problem"),
    [
        (ALPACA[0], {"instruction": "Greet."}, "no 'output' field (it has: instruction)"),
        (ALPACA[0], {"instruction": "Greet.", "output": ["Hello."]}, "'output' holds a list, not text"),
        (ALPACA[0], {"instruction": "Greet.", "output": ""}, "'output' is empty"),
        (ALPACA[0], {"instruction": 7, "output": "x"}, "'instruction' holds a int"),
        (CHAT, {"messages": [user("q"), assistant("")]}, "turn 2 content is empty"),
        (CHAT, {"messages": [user("q")]}, "no assistant turn"),
        (CHAT, {"messages": [user("q"), {"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
        (SHAREGPT, {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "a"}]}, "speaker"),
        ({"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}, "'completion' holds a int"),
        (ALPACA[0], ["not", "an", "object"], "expected an object"),
    ],
)
def test_bad_record_is_named_by_file_and_record(tmp_path: Path, good: Any, bad: Any, problem: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad])
    conversations = read_conversations(str(path))
    next(conversations)  # lazy: the good record before the bad one still arrives
    with pytest.raises(UserError) as info:
        next(conversations)
    message = str(info.value)
    assert f"{path}, record 2 (line 2): " in message
    assert problem in message
    assert "on_error: skip" in message
    assert "\n" not in message


def test_skip_counts_bad_records_and_continues(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    records = [ALPACA[0], {"instruction": "x"}, ALPACA[1], {"instruction": "y", "output": ""}]
    path.write_text(json.dumps(records), encoding="utf-8")
    stats = InstructionStats()
    assert list(read_conversations(str(path), on_error="skip", stats=stats)) == ALPACA_CONVERSATIONS
    assert (stats.records, stats.conversations, stats.skipped) == (4, 2, 2)
    assert stats.first_error == f"{path}, record 2: no 'output' field (it has: instruction)"
    assert stats.reasons == {"no 'output' field (it has: instruction)": 1, stats.reasons.most_common()[-1][0]: 1}
    assert stats.summary().startswith("4 records -> 2 conversations, 2 skipped: 1x no 'output' field")
    assert stats.summary().endswith(f"(first: {stats.first_error})")


def test_skip_also_passes_over_an_undetectable_first_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q"}, *ALPACA])
    stats = InstructionStats()
    assert list(read_conversations(str(path), on_error="skip", stats=stats)) == ALPACA_CONVERSATIONS
    assert stats.skipped == 1


def test_no_usable_record_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "x"}])
    with pytest.raises(UserError, match=r"none of its 1 records is usable; the first error: .*no 'output'"):
        list(read_conversations(str(path), on_error="skip"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.jsonl has no records"):
        list(read_conversations(str(empty)))


def test_unknown_format_and_bad_path_fail_at_call_time(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ALPACA)
    with pytest.raises(UserError, match="unknown instruction format 'dolly': choose auto or one of messages, "):
        read_conversations(str(path), format="dolly")
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file or folder"):
        read_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match=r"unsupported file type '\.txt'; use \.jsonl, \.json, \.parquet"):
        (tmp_path / "a.txt").write_text("x\n", encoding="utf-8")
        read_conversations(str(tmp_path / "a.txt"))


def test_dataset_id_is_read_with_split_and_name(monkeypatch) -> None:
    calls = []

    def fake_load(path, name=None, *, split, streaming):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([*ALPACA, {"instruction": "x", "input": "", "output": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    stats = InstructionStats()
    got = list(read_conversations("someone/alpaca", split="test", name="en", on_error="skip", stats=stats))
    assert calls == [("someone/alpaca", "en", "test")]
    assert got == ALPACA_CONVERSATIONS
    assert stats.first_error == "someone/alpaca, record 3: 'output' is empty"


@pytest.mark.skipif(not (SHARED_DATA / "alpaca").is_dir(), reason="shared data not present")
def test_the_shared_self_instruct_seed_tasks_read() -> None:
    stats = InstructionStats()
    conversations = list(
        read_conversations(str(SHARED_DATA / "alpaca" / "self_instruct_seed_tasks.jsonl"), stats=stats)
    )
    assert (stats.records, stats.skipped) == (175, 0)
    assert stats.conversations == len(conversations) >= 175
    assert conversations[1] == [
        user("What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
        assistant("The relation between the given pairs is that they are opposites."),
    ]


# --- chat template ---------------------------------------------------------------------------------------


def bare_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with no chat template and no chat tokens, as many base models ship."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["hello world", "what is two plus two", "four"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


CONVERSATION = [
    system("You answer briefly."),
    user("Hello there"),
    assistant("Hi! What do you need?"),
    user("What is two plus two?"),
    assistant("Four, of course."),
]
ANSWERS = [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]


def test_ensure_chat_template_sets_the_default_and_it_survives_saving(tmp_path: Path) -> None:
    tokenizer = bare_tokenizer()
    size = len(tokenizer)
    assert ensure_chat_template(tokenizer) is True  # the chat tokens were added: embeddings must grow
    assert len(tokenizer) == size + 2
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    for token in CHAT_TOKENS:
        assert token in tokenizer.all_special_tokens
    assert ensure_chat_template(tokenizer) is False  # idempotent

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for add_generation_prompt in (False, True):
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        assert reloaded.apply_chat_template(CONVERSATION, **kwargs) == tokenizer.apply_chat_template(
            CONVERSATION, **kwargs
        )
    assert tokenize_conversation(reloaded, CONVERSATION) == tokenize_conversation(tokenizer, CONVERSATION)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False).startswith(
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\n"
    )


def test_ensure_chat_template_keeps_the_tokenizers_own(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    own = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.chat_template = own
    assert ensure_chat_template(tokenizer) is False
    assert tokenizer.chat_template == own


@pytest.mark.parametrize(
    "template",
    ["{% for m in messages %}{{ m['content'] }", "{{ raise_exception('this template is broken') }}"],
)
def test_a_template_that_does_not_render_is_a_user_error(tiny_tokenizer_dir: Path, template: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = template
    with pytest.raises(UserError, match="chat template does not render: "):
        ensure_chat_template(tokenizer)


# --- the answer mask -------------------------------------------------------------------------------------


def masked_spans(tokenizer: Any, encoded: dict[str, list[int]]) -> list[str]:
    """The decoded runs of consecutive mask-1 tokens."""
    spans: list[list[int]] = []
    previous = 0
    for token, bit in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
        if bit and not previous:
            spans.append([])
        if bit:
            spans[-1].append(token)
        previous = bit
    return [tokenizer.decode(span) for span in spans]


NO_MARKERS = DEFAULT_CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")


@pytest.mark.parametrize("path", ["generation markers", "prefix fallback"])
def test_labels_cover_exactly_the_answers_and_their_end_of_turn(tiny_tokenizer_dir: Path, path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    if path == "prefix fallback":
        tokenizer.chat_template = NO_MARKERS
    assert ("{%- generation %}" in tokenizer.chat_template) == (path == "generation markers")
    encoded = tokenize_conversation(tokenizer, CONVERSATION)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]

    # Two runs of learnt tokens, each exactly one answer and its <|im_end|>: no prompt token is unmasked.
    assert masked_spans(tokenizer, encoded) == [answer + "<|im_end|>" for answer in ANSWERS]
    labels = labels_from_mask(ids, mask)
    assert [t for t in labels if t != -100] == [t for t, m in zip(ids, mask, strict=True) if m]
    prompt_text = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
    for turn in CONVERSATION:
        assert (turn["content"] in prompt_text) == (turn["role"] != "assistant")


def test_both_paths_give_the_same_mask_on_chatml(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    marked = tokenize_conversation(tokenizer, CONVERSATION)
    tokenizer.chat_template = NO_MARKERS
    assert tokenize_conversation(tokenizer, CONVERSATION) == marked


def test_prefix_fallback_with_another_template(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Zephyr's layout: the end of a turn is the tokenizer's EOS.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    encoded = tokenize_conversation(tokenizer, CONVERSATION)
    assert masked_spans(tokenizer, encoded) == [answer + "</s>" for answer in ANSWERS]


def test_a_template_that_is_not_prefix_preserving_is_refused(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # The turn count up front changes as the conversation grows.
    tokenizer.chat_template = "{{ messages | length }}" + NO_MARKERS
    with pytest.raises(UserError, match=r"renders the beginning of a conversation differently .* \(at turn 3\)"):
        tokenize_conversation(tokenizer, CONVERSATION)


def test_a_template_that_refuses_a_conversation_is_a_user_error(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # As Gemma's template does: no system turns.
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    for template in (refuse + DEFAULT_CHAT_TEMPLATE, refuse + NO_MARKERS):
        tokenizer.chat_template = template
        assert ensure_chat_template(tokenizer) is False  # the probe has no system turn
        with pytest.raises(UserError, match="does not render this conversation: System role not supported"):
            tokenize_conversation(tokenizer, CONVERSATION)


def test_truncation_keeps_the_beginning(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    full = tokenize_conversation(tokenizer, CONVERSATION)
    first_answer = full["assistant_masks"].index(1)
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=first_answer + 3)
    assert cut == {key: value[: first_answer + 3] for key, value in full.items()}
    assert sum(cut["assistant_masks"]) == 3
    only_prompt = tokenize_conversation(tokenizer, CONVERSATION, max_length=first_answer)
    assert not any(only_prompt["assistant_masks"])  # nothing left to learn: the caller drops it


def test_tokenizing_needs_a_chat_template_and_a_valid_conversation() -> None:
    with pytest.raises(UserError, match="no chat template; call ensure_chat_template"):
        tokenize_conversation(bare_tokenizer(), CONVERSATION)
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_conversation(bare_tokenizer(), [user("q")])
    with pytest.raises(ValueError, match="3 ids but 2 mask values"):
        labels_from_mask([1, 2, 3], [0, 1])
