"""Image-caption records for projector pretraining, read from LLaVA's pretraining format or COCO captions JSON.

- LLaVA (`blip_laion_cc_sbu_558k.json`, a JSON list or JSON Lines): `{"image": "path", "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "caption"}]}`; `image` may also be a
  list of paths, one per `<image>` in the human turn.
- COCO captions (`captions_train2017.json`): `{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`; every annotation is a record, with the recipe's prompt as its user turn.

Image paths are relative to an image folder. Each record is checked as it is read (its `<image>` count against its
images, and that every image file exists), with one error naming the file and record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seshu.data.sources import read_records
from seshu.errors import UserError
from seshu.multimodal.config import IMAGE_TOKEN, CaptionSource


@dataclass(frozen=True)
class CaptionRecord:
    where: str  # how errors name it: "FILE, record N"
    prompt: str  # the user turn, with one `<image>` per image
    caption: str  # the answer the loss is on
    images: tuple[str, ...]  # image files, resolved against the image folder


def read_caption_records(source: CaptionSource, prompt: str) -> Iterator[CaptionRecord]:
    """The records of `source` (a file, or a folder of LLaVA files), lazily; `prompt` is the user turn of COCO
    records. The path and format are checked at call time; a bad record raises a `UserError` naming it."""
    path = Path(source.path).expanduser()
    if not path.exists():
        raise UserError(f"{source.path}: caption records not found")
    folder = Path(source.image_folder).expanduser() if source.image_folder else path if path.is_dir() else path.parent
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found (data.image_folder)")
    fmt = source.format or "auto"
    coco = _coco_file(path) if fmt in ("auto", "coco") else None
    if fmt == "coco" and coco is None:
        raise UserError(f"{source.path}: not a COCO captions file (a JSON object with 'images' and 'annotations')")
    reader = _coco(path, coco, prompt) if coco is not None else _llava(source.path)
    return (_resolved(record, folder) for record in reader)


def _coco_file(path: Path) -> dict[str, Any] | None:
    """The parsed COCO captions file at `path`, or None for a file of another kind (a list, JSON Lines)."""
    if not path.is_file() or path.suffix.lower() != ".json":
        return None
    with open(path, "rb") as handle:
        if not handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            return None
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # JSON Lines, or not JSON: read_records says what is wrong with it
    return value if isinstance(value, dict) and "annotations" in value else None


def _coco(path: Path, data: dict[str, Any], prompt: str) -> Iterator[tuple[str, str, str, list[Any]]]:
    try:
        files = {image["id"]: image["file_name"] for image in data.get("images", [])}
    except (TypeError, KeyError):
        raise UserError(f"{path}: every entry of 'images' needs an 'id' and a 'file_name'") from None
    for n, annotation in enumerate(data["annotations"], 1):
        where = f"{path}, annotation {n}"
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            raise UserError(f"{where}: needs a 'caption' string and an 'image_id'")
        if annotation.get("image_id") not in files:
            raise UserError(f"{where}: image_id {annotation.get('image_id')!r} is not in the file's 'images'")
        yield where, prompt, annotation["caption"], [files[annotation["image_id"]]]


def _llava(path: str) -> Iterator[tuple[str, str, str, list[Any]]]:
    for record in read_records(path):
        value, where = record.value, record.where
        turns = value.get("conversations") if isinstance(value, dict) else None
        if not isinstance(turns, list):
            raise UserError(f"{where}: not a LLaVA record (needs 'image' and 'conversations')")
        human = _turn(turns, "human", where)
        images = value.get("image", [])
        yield where, human, _turn(turns, "gpt", where), images if isinstance(images, list) else [images]


def _turn(turns: list[Any], speaker: str, where: str) -> str:
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") == speaker and isinstance(turn.get("value"), str):
            return str(turn["value"])
    raise UserError(f"{where}: no '{speaker}' turn in its conversations")


def _resolved(raw: tuple[str, str, str, list[Any]], folder: Path) -> CaptionRecord:
    where, prompt, caption, images = raw
    if not images or not all(isinstance(i, str) and i for i in images):
        raise UserError(f"{where}: needs an image (a path relative to the image folder)")
    marks = prompt.count(IMAGE_TOKEN)
    if marks != len(images):
        raise UserError(f"{where}: {marks} {IMAGE_TOKEN} in the prompt but {len(images)} image(s)")
    if not caption.strip():
        raise UserError(f"{where}: empty caption")
    paths = tuple(str(folder / image) for image in images)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{where}: image file not found: {missing[0]}")
    return CaptionRecord(where=where, prompt=prompt, caption=caption.strip(), images=paths)


def record_key(record: CaptionRecord) -> str:
    """What decides a record's side of a held-out split (hashed, not drawn): its image names and caption, so the
    split is the same wherever the image folder is."""
    return json.dumps([[Path(image).name for image in record.images], record.caption])
