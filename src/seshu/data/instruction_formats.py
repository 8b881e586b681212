"""Instruction-data formats: one registry entry per layout, each turning a record into canonical messages.

The canonical form is what chat templates and `trl` take: a list of `{"role": "system" | "user" |
"assistant", "content": str}` dicts. Every format is two pure functions over one record (a dict): `detect`
says whether a record looks like the format, `convert` turns it into one or more conversations and raises
`ValueError` with a one-clause reason for a malformed record (the reader adds the file and record number).
Adding a format is one `InstructionFormat` and one line in `FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

ROLES: tuple[str, ...] = ("system", "user", "assistant")

# ShareGPT exports name the speakers after the product that produced them; these are the ones seen in the
# public dumps (ShareGPT, OpenChat, LLaMA-Factory, Vicuna). Tool and function turns have no place in the
# three-role form, so they stay unknown and are reported rather than silently dropped.
_SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
# OpenAI's newer name for the system role.
_MESSAGE_ROLES: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class InstructionFormat:
    """A record layout: `detect` recognises it, `convert` turns a record into conversations (several for
    a record that holds several examples) or raises ValueError saying what is wrong with it."""

    name: str
    detect: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], list[list[Message]]]


# --- field helpers ---------------------------------------------------------------------------------------


def _field(record: dict[str, Any], key: str) -> Any:
    if key not in record:
        raise ValueError(f"no '{key}' field (it has: {', '.join(map(str, record)) or 'none'})")
    return record[key]


def _text(value: Any, what: str, *, optional: bool = False) -> str:
    """`value` as text; None or blank is an error unless `optional` (then it is "")."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} holds {_kind(value)}, not text")
    if not value.strip() and not optional:
        raise ValueError(f"{what} is empty")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} holds {_kind(value)}, not a list")
    if not value:
        raise ValueError(f"{what} is an empty list")
    return value


def _kind(value: Any) -> str:
    kinds: dict[type, str] = {dict: "an object", list: "a list", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _user_turn(instruction: str, extra: str) -> str:
    # A blank line keeps the task apart from the material it applies to, as Alpaca's own prompt does with
    # its "### Input:" section; the chat template supplies the rest of the framing.
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _system(record: dict[str, Any]) -> list[Message]:
    """An optional top-level `system` field (LLaMA-Factory's alpaca and sharegpt layouts carry one)."""
    system = _text(record.get("system"), "'system'", optional=True)
    return [{"role": "system", "content": system}] if system.strip() else []


# --- alpaca ----------------------------------------------------------------------------------------------


def _alpaca_detect(record: dict[str, Any]) -> bool:
    return "instruction" in record and "instances" not in record


def _alpaca_convert(record: dict[str, Any]) -> list[list[Message]]:
    """instruction (+ input) -> user, output -> assistant; an optional `history` of [instruction, answer]
    pairs comes first (LLaMA-Factory's multi-turn alpaca)."""
    messages = _system(record)
    for n, pair in enumerate(record.get("history") or [], 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"'history' item {n} is not an [instruction, answer] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"'history' item {n} instruction")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"'history' item {n} answer")})
    instruction = _text(_field(record, "instruction"), "'instruction'")
    extra = _text(record.get("input"), "'input'", optional=True)
    output = _text(_field(record, "output"), "'output'")
    messages.append({"role": "user", "content": _user_turn(instruction, extra)})
    messages.append({"role": "assistant", "content": output})
    return [messages]


# --- self-instruct seed tasks ----------------------------------------------------------------------------


def _self_instruct_detect(record: dict[str, Any]) -> bool:
    return "instruction" in record and "instances" in record


def _self_instruct_convert(record: dict[str, Any]) -> list[list[Message]]:
    """One conversation per instance: the task's instruction with the instance's input, and its output."""
    instruction = _text(_field(record, "instruction"), "'instruction'")
    conversations = []
    for n, instance in enumerate(_list(_field(record, "instances"), "'instances'"), 1):
        if not isinstance(instance, dict):
            raise ValueError(f"instance {n} holds {_kind(instance)}, not an object with input and output")
        if "output" not in instance:
            raise ValueError(f"instance {n} has no 'output' field")
        extra = _text(instance.get("input"), f"instance {n} 'input'", optional=True)
        output = _text(instance["output"], f"instance {n} 'output'")
        conversations.append(
            [{"role": "user", "content": _user_turn(instruction, extra)}, {"role": "assistant", "content": output}]
        )
    return conversations


# --- sharegpt --------------------------------------------------------------------------------------------


def _sharegpt_detect(record: dict[str, Any]) -> bool:
    # Role/content turns under "conversations" belong to `messages`, which is tried first.
    return "conversations" in record


def _sharegpt_convert(record: dict[str, Any]) -> list[list[Message]]:
    turns = _list(_field(record, "conversations"), "'conversations'")
    messages = _system(record)
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {n} is not an object with 'from' and 'value'")
        speaker = turn["from"]
        role = _SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise ValueError(f"turn {n} has unknown speaker {speaker!r}; known: {', '.join(_SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": _text(turn["value"], f"turn {n} 'value'")})
    return [messages]


# --- messages (OpenAI / trl conversational) --------------------------------------------------------------


def _messages_key(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "messages"
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
        return "conversations"
    return None


def _messages_detect(record: dict[str, Any]) -> bool:
    return _messages_key(record) is not None


def _messages_convert(record: dict[str, Any]) -> list[list[Message]]:
    key = _messages_key(record) or "messages"
    return [_role_messages(_list(_field(record, key), f"'{key}'"), key)]


def _role_messages(turns: list[Any], key: str) -> list[Message]:
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"'{key}' turn {n} is not an object with 'role' and 'content'")
        role = _MESSAGE_ROLES.get(turn["role"]) if isinstance(turn["role"], str) else None
        if role is None:
            raise ValueError(f"'{key}' turn {n} has unknown role {turn['role']!r}; known: {', '.join(_MESSAGE_ROLES)}")
        messages.append({"role": role, "content": _content(turn["content"], f"'{key}' turn {n} content")})
    return messages


def _content(value: Any, what: str) -> str:
    """A string, or OpenAI's list of content parts when every part is text (joined in order)."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise ValueError(f"{what} has a {kind!s} part; only text parts are supported")
            texts.append(part["text"])
        value = "".join(texts)
    return _text(value, what)


# --- prompt / completion ---------------------------------------------------------------------------------


def _prompt_completion_detect(record: dict[str, Any]) -> bool:
    return "prompt" in record and "completion" in record


def _prompt_completion_convert(record: dict[str, Any]) -> list[list[Message]]:
    """Strings (prompt -> user, completion -> assistant) or trl's conversational form, where each side is a
    list of messages; the two may be mixed."""
    prompt, completion = _field(record, "prompt"), _field(record, "completion")
    messages = (
        _role_messages(_list(prompt, "'prompt'"), "prompt")
        if isinstance(prompt, list)
        else [{"role": "user", "content": _text(prompt, "'prompt'")}]
    )
    if isinstance(completion, list):
        answers = _role_messages(_list(completion, "'completion'"), "completion")
        if any(m["role"] != "assistant" for m in answers):
            raise ValueError("'completion' holds a turn that is not the assistant's")
        messages += answers
    else:
        messages.append({"role": "assistant", "content": _text(completion, "'completion'")})
    return [messages]


# --- the registry ----------------------------------------------------------------------------------------

# Detection tries these in order and takes the first match, so the more specific layouts come first:
# role/content "conversations" are `messages` before `sharegpt` claims the key, and "instances" makes a
# record `self_instruct` before `alpaca` claims "instruction".
FORMATS: dict[str, InstructionFormat] = {
    f.name: f
    for f in (
        InstructionFormat("messages", _messages_detect, _messages_convert),
        InstructionFormat("sharegpt", _sharegpt_detect, _sharegpt_convert),
        InstructionFormat("prompt_completion", _prompt_completion_detect, _prompt_completion_convert),
        InstructionFormat("self_instruct", _self_instruct_detect, _self_instruct_convert),
        InstructionFormat("alpaca", _alpaca_detect, _alpaca_convert),
    )
}


def detect_format(record: dict[str, Any]) -> str:
    """The name of the first format in `FORMATS` that recognises `record`; ValueError if none does."""
    for name, fmt in FORMATS.items():
        if fmt.detect(record):
            return name
    keys = ", ".join(map(str, record)) or "none"
    raise ValueError(
        f"no known instruction format has fields like these ({keys}); expected one of {', '.join(FORMATS)} "
        "(e.g. alpaca: instruction, input, output; sharegpt: conversations of from/value; messages: role/content)"
    )


_ARTICLE = {"user": "a", "assistant": "an"}


def validate_conversation(messages: list[Message]) -> None:
    """ValueError unless `messages` is a conversation every chat template takes: known roles, non-blank text,
    an optional system turn first, then user and assistant turns alternating from a user turn, and at least
    one assistant turn to learn from."""
    if not messages:
        raise ValueError("the conversation is empty")
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(f"turn {n} holds {_kind(message)}, not a role/content message")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"turn {n} has unknown role {role!r}; known: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"turn {n} ({role}) has no text")
        if role == "system" and n > 1:
            raise ValueError(f"turn {n} is a system turn; only the first turn may be one")
    offset = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[offset:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"turn {i + offset + 1} is a {message['role']} turn where {_ARTICLE[expected]} {expected} turn "
                "belongs; user and assistant turns must alternate, starting with the user"
            )
    if len(messages) - offset < 2:
        raise ValueError("the conversation has no assistant turn, so nothing to learn from")
