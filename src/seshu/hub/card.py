"""Model cards: README.md with YAML front matter recording what made an artifact (recipe, inputs, metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from seshu import assets
from seshu.hub.ids import is_hub_id
from seshu.io import sha256_file


def describe_inputs(paths: list[str]) -> list[dict[str, str]]:
    """Each local input file with its sha256 (folders file by file, leaving out hidden files and folders as the
    data readers do; a packaged `seshu:` file under its own name), a Hub id as such, and any other path as
    given."""
    described: list[dict[str, str]] = []
    for ref in paths:
        local = Path(assets.resolve(ref))
        if local.is_file():
            name = ref if ref.startswith(assets.PREFIX) else str(local)
            described.append({"path": name, "sha256": sha256_file(local)})
        elif local.is_dir():
            for file in sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p.relative_to(local))):
                described.append({"path": str(file), "sha256": sha256_file(file)})
        elif is_hub_id(ref):
            described.append({"hub_id": ref})
        else:
            described.append({"path": ref})
    return described


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def describe_model(ref: str) -> list[dict[str, str]]:
    """A model folder by the files that define it (weights, config, tokenizer) with their sha256, leaving out
    checkpoints, caches and logs; a Hub id stands for itself."""
    local = Path(ref)
    if not local.is_dir():
        return [{"hub_id": ref}]
    defining = sorted(p for p in local.iterdir() if p.is_file() and _defines_model(p.name))
    return describe_inputs([str(p) for p in defining])


# Tokenizers without a tokenizer.json (sentencepiece, or BPE/WordPiece vocabularies) are defined by these files.
_TOKENIZER_FILES = ("tokenizer.model", "merges.txt", "vocab.txt", "spiece.model")


def _defines_model(name: str) -> bool:
    return name.endswith((".safetensors", ".json", ".jinja")) or name in _TOKENIZER_FILES


def usage_snippet(*, base: str | None = None, vision: bool = False) -> str:
    """The markdown code block a card shows to load the artifact with plain transformers: a whole model or a
    vision-language model (`vision`), or (given the `base` it was trained on) a peft adapter applied to it."""
    if vision:
        load = "LlavaForConditionalGeneration.from_pretrained"
        code = (
            "from PIL import Image\nfrom transformers import AutoProcessor, LlavaForConditionalGeneration\n"
            + (
                f"model = {load}(PATH)\n"
                if base is None
                else f"from peft import PeftModel\nmodel = PeftModel.from_pretrained({load}({base!r}), PATH)\n"
            )
            + "processor = AutoProcessor.from_pretrained(PATH)\n"
            'inputs = processor(images=Image.open("photo.jpg"), text="<image>\\nWhat is in the picture?", '
            'return_tensors="pt")\n'
            "print(processor.decode(model.generate(**inputs, max_new_tokens=40)[0]))\n"
        )
    elif base is None:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n"
        )
    else:
        code = (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), PATH)\n"
        )
    return f"```python\n{code}```\n"


def render_card(title: str, metadata: dict[str, Any], body: str) -> str:
    """A model card: YAML front matter (Hub metadata plus a `seshu` block) followed by markdown."""
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n# {title}\n\n{body.strip()}\n"


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when it has none)."""
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    front, _, _ = text[4:].partition("\n---\n")
    loaded = yaml.safe_load(front)
    return loaded if isinstance(loaded, dict) else {}


def seshu_block(folder: Path) -> dict[str, Any]:
    """The `seshu` block of a folder's card (empty when it has none, or a card that is not ours)."""
    card = folder / "README.md"
    try:
        meta = read_card_metadata(card) if card.is_file() else {}
    except Exception:  # a card that is not YAML is simply not ours
        return {}
    block = meta.get("seshu")
    return block if isinstance(block, dict) else {}


def check_replaceable_output(out: Path, sources: list[str], commands: tuple[str, ...], what: str) -> None:
    """`out` is replaced whole, so it must be new, empty, or an earlier output of one of `commands` (read from its
    card): never one of the `sources` or a folder of something else. `what` names the output in the error."""
    from seshu.errors import UserError

    resolved = out.resolve()
    for ref in sources:
        if ref and Path(ref).exists() and Path(ref).resolve() == resolved:
            raise UserError(f"{out}: --out is the input {ref}; choose a new folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if any(out.iterdir()) and seshu_block(out).get("command") not in commands:
        raise UserError(f"{out}: exists and is not {what}; choose another --out (it would be replaced)")
