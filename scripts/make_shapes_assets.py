"""Regenerate the bundled shapes data, `src/seshu/assets/multimodal/shapes/` (`seshu:multimodal/shapes/...`): the
images a tiny VLM recipe trains on without a download, and their records.

    python scripts/make_shapes_assets.py            # rewrites the bundled folder
    python scripts/make_shapes_assets.py OUT_DIR    # writes elsewhere (the tests compare the two)

- `images/COLOUR-SHAPE-VARIANT.png`: each of the 12 colour-shape pairs of the tests (4 colours x square, circle,
  triangle) in 3 variants, drawn 32x32 by `tests/helpers.py`'s `draw_shape` (the drawing the tests train on, so
  the bundled data and the tests' data cannot drift apart).
- `captions.json`: LLaVA's pretraining records, one per image, a short-caption prompt and the caption
  ("a red square"), for `seshu vlm pretrain-projector`.
- `instruct.json`: LLaVA's instruction records, one conversation per image (its colour, its shape, a one-line
  description), for `seshu sft` on a VLM.

Everything follows from the lists below, with no randomness: running the script again gives the same images (pixel
for pixel; PNG bytes may differ with another zlib) and the same JSON files, byte for byte.
"""

from __future__ import annotations

import json
import sys
from itertools import product
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The drawing lives with the tests that train on it, in tests/helpers.py (not a package).
sys.path.insert(0, str(ROOT / "tests"))
from helpers import SHAPE_COLOURS, SHAPES, draw_shape  # noqa: E402

DEFAULT_OUT = ROOT / "src" / "seshu" / "assets" / "multimodal" / "shapes"
VARIANTS = 3

# Three of the short-caption prompts of LLaVA's pretraining records (blip_laion_cc_sbu_558k.json), in turn.
CAPTION_PROMPTS = (
    "Give a short caption of this image.",
    "Write a terse but informative summary of the picture.",
    "Share a concise interpretation of the image provided.",
)


def shapes() -> list[tuple[str, str, int]]:
    """(colour, shape, variant) of every bundled image, in file order."""
    return [(c, s, v) for (c, s), v in product(product(SHAPE_COLOURS, SHAPES), range(VARIANTS))]


def image_name(colour: str, shape: str, variant: int) -> str:
    return f"images/{colour}-{shape}-{variant}.png"


def caption_records() -> list[dict[str, Any]]:
    return [
        {
            "id": Path(image_name(c, s, v)).stem,
            "image": image_name(c, s, v),
            "conversations": [
                {"from": "human", "value": f"<image>\n{CAPTION_PROMPTS[n % len(CAPTION_PROMPTS)]}"},
                {"from": "gpt", "value": f"a {c} {s}"},
            ],
        }
        for n, (c, s, v) in enumerate(shapes())
    ]


def instruct_records() -> list[dict[str, Any]]:
    records = []
    for c, s, v in shapes():
        colour = [{"from": "human", "value": "What colour is the shape?"}, {"from": "gpt", "value": f"{c.title()}."}]
        shape = [{"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": f"A {s}."}]
        # The questions in both orders, so that neither answer is learnt as a function of its turn number.
        turns = colour + shape if v % 2 == 0 else shape + colour
        turns[0] = {"from": "human", "value": f"<image>\n{turns[0]['value']}"}
        turns += [
            {"from": "human", "value": "Describe the image in one sentence."},
            {"from": "gpt", "value": f"A {c} {s} on a white background."},
        ]
        records.append({"id": Path(image_name(c, s, v)).stem, "image": image_name(c, s, v), "conversations": turns})
    return records


def records_json(records: list[dict[str, Any]]) -> str:
    """A JSON list, one record a line: small, and readable in a diff."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def main(out: Path = DEFAULT_OUT) -> None:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob("*.png"):
        stale.unlink()
    for c, s, v in shapes():
        draw_shape(c, s, v).save(out / image_name(c, s, v), optimize=True)
    (out / "captions.json").write_text(records_json(caption_records()), encoding="utf-8")
    (out / "instruct.json").write_text(records_json(instruct_records()), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
