"""Conversations with images and audio, for visual (and spoken) instruction tuning.

Two layouts are read, beside every text-only layout `seshu.data.instructions` knows:
- LLaVA's (`llava_instruct_150k.json`): `{"image": "000000033471.jpg", "conversations": [{"from": "human",
  "value": "<image>\\nWhat are the colors of the bus?"}, {"from": "gpt", "value": "..."}, ...]}`; `image` may
  also be a list, one path per `<image>`, or absent for a text-only record.
- LLaMA-Factory's (`mllm_demo.json`): `{"messages": [{"role": "user", "content": "<image>Who are they?"}, ...],
  "images": [...], "audios": [...]}`, with `<image>` and `<audio>` placeholders in the turns.

The conversation itself is read by the instruction-format registry; this module adds the media: every
`<image>` and `<audio>` placeholder must have its file (one clear error naming the record otherwise), and the
paths resolve against a media folder (by default the records file's own folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from seshu.data.instructions import InstructionStats, Message, read_record_conversations
from seshu.data.sources import SourceRecord
from seshu.errors import UserError
from seshu.multimodal.vlm import IMAGE_TOKEN

AUDIO_TOKEN = "<audio>"  # LLaMA-Factory's placeholder for a recording

# Where each layout keeps its media: LLaVA's `image` (one path or a list), LLaMA-Factory's `images`, `audios`.
IMAGE_FIELDS = ("images", "image")
AUDIO_FIELDS = ("audios", "audio")


@dataclass(frozen=True)
class MediaConversation:
    where: str  # how errors name it: "FILE, record N"
    messages: list[Message]  # `<image>` and `<audio>` still in place
    images: tuple[str, ...]  # resolved image files, in the order of the `<image>` placeholders
    audios: tuple[str, ...]  # resolved audio files, in the order of the `<audio>` placeholders

    def key(self) -> str:
        """What decides the conversation's side of a held-out split (hashed): its turns and the names of its
        files, so the split is the same wherever the media folder is."""
        names = [Path(path).name for path in (*self.images, *self.audios)]
        return json.dumps([self.messages, names], sort_keys=True)


def read_media_conversations(
    path: str,
    *,
    format: str = "auto",
    on_error: Literal["raise", "skip"] = "raise",
    split: str = "train",
    name: str | None = None,
    stats: InstructionStats | None = None,
    media_folder: str | None = None,
) -> Iterator[MediaConversation]:
    """The conversations at `path` with their images and audio files, lazily. A record of a text-only layout
    reads as a conversation without media. The path, format and media folder are checked at call time; a
    record whose placeholders do not match its files, or whose file is missing, is a `UserError` naming it
    (`on_error` applies to the conversation's own faults, as in `read_conversations`)."""
    folder = Path(media_folder).expanduser() if media_folder else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"{media_folder}: media folder not found (vlm.media_folder)")
    pairs = read_record_conversations(path, format=format, on_error=on_error, split=split, name=name, stats=stats)
    return (_with_media(record, messages, folder) for record, messages in pairs)


def _with_media(record: SourceRecord, messages: list[Message], folder: Path | None) -> MediaConversation:
    value = record.value
    root = folder if folder is not None else _records_folder(record.source)
    images = _paths(value, IMAGE_FIELDS, record.where, root)
    audios = _paths(value, AUDIO_FIELDS, record.where, root)
    for token, files in ((IMAGE_TOKEN, images), (AUDIO_TOKEN, audios)):
        marks = sum(message["content"].count(token) for message in messages)
        if marks != len(files):
            raise UserError(f"{record.where}: {marks} {token} in its turns but {len(files)} file(s) for them")
    return MediaConversation(record.where, messages, images, audios)


def _records_folder(source: str) -> Path:
    path = Path(source).expanduser()
    return path if path.is_dir() else path.parent


def _paths(value: Any, fields: tuple[str, ...], where: str, root: Path) -> tuple[str, ...]:
    raw: Any = next((value[f] for f in fields if isinstance(value, dict) and value.get(f) is not None), [])
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(item, str) and item for item in items):
        raise UserError(f"{where}: '{fields[0]}' must hold file paths (strings)")
    paths = tuple(str(root / item) for item in items)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{where}: file not found: {missing[0]} (paths are relative to vlm.media_folder)")
    return paths


def with_transcripts(messages: list[Message], transcripts: list[str]) -> list[Message]:
    """`messages` with each `<audio>` replaced by its recording's transcript, in order: the words go into the
    turn where the sound was, on a line of their own before what follows, as `seshu chat --audio` lays them
    out."""
    heard = iter(transcripts)
    out: list[Message] = []
    for message in messages:
        parts = message["content"].split(AUDIO_TOKEN)
        text = parts[0]
        for rest in parts[1:]:
            words = next(heard)
            text += words + ("\n" if rest and not rest.startswith("\n") else "") + rest
        out.append({**message, "content": text})
    return out
