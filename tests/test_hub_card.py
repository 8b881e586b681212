"""Model cards (`seshu.hub.card`): what a card records about its inputs, its front matter read back as written, the
`seshu` block of cards that are and are not ours, the usage code a card shows (run as shown), and the rule for
which folders an output may replace."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import save_tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from seshu.errors import UserError
from seshu.hub.card import (
    check_replaceable_output,
    describe_inputs,
    describe_model,
    read_card_metadata,
    render_card,
    seshu_block,
    usage_snippet,
)

CORPUS = ["The river runs past the market.", "नदी बाज़ार के पास बहती है।", "Rain fell on the school garden."]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def our_card(folder: Path, command: str, **extra: Any) -> Path:
    metadata = {"license": "apache-2.0", "seshu": {"command": command, **extra}}
    write(folder / "README.md", render_card(folder.name, metadata, "Made."))
    return folder


# ------------------------------------------------------------------------------------------------ describe_inputs


def test_describe_inputs_hashes_files_and_folders_file_by_file(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.txt", "नमस्ते\nhello\n")
    folder = tmp_path / "data"
    b = write(folder / "b.jsonl", '{"text": "b"}\n')
    a = write(folder / "sub" / "a.txt", "a" * 5000)
    write(folder / ".hidden.txt", "not an input")
    described = describe_inputs([str(corpus), str(folder), "gpt2", "org/dataset"])
    assert described == [
        {"path": str(corpus), "sha256": sha256(corpus)},
        {"path": str(b), "sha256": sha256(b)},
        {"path": str(a), "sha256": sha256(a)},
        {"hub_id": "gpt2"},
        {"hub_id": "org/dataset"},
    ]


def test_describe_inputs_follows_a_changed_file(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.txt", "first\n")
    before = describe_inputs([str(corpus)])[0]["sha256"]
    write(corpus, "second, and longer\n")
    assert describe_inputs([str(corpus)])[0]["sha256"] == sha256(corpus) != before


def test_describe_inputs_leaves_out_hidden_folders_as_the_data_reader_does(tmp_path: Path) -> None:
    write(tmp_path / "data" / ".git" / "objects" / "ab", b"\x00blob")
    kept = write(tmp_path / "data" / "corpus.txt", "text\n")
    assert describe_inputs([str(tmp_path / "data")]) == [{"path": str(kept), "sha256": sha256(kept)}]


def test_describe_inputs_hashes_packaged_corpora() -> None:
    from seshu import assets

    (entry,) = describe_inputs(["seshu:corpus/en.txt"])
    assert entry.get("sha256") == sha256(Path(assets.resolve("seshu:corpus/en.txt"))), entry


# ------------------------------------------------------------------------------------------------ describe_model


def test_describe_model_lists_only_the_files_that_define_it(tmp_path: Path) -> None:
    model = tmp_path / "model"
    names = ("config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json")
    names += ("tokenizer.model", "merges.txt", "vocab.txt")  # tokenizers without a tokenizer.json
    defining = [write(model / name, name) for name in names]
    for other in (
        "README.md",
        "train_log.jsonl",
        "training.png",
        "notes.txt",
        "checkpoint-4/model.safetensors",
        ".cache/x.json",
    ):
        write(model / other, other)
    described = describe_model(str(model))
    assert described == [{"path": str(p), "sha256": sha256(p)} for p in sorted(defining)]


def test_describe_model_records_a_hub_id_as_itself() -> None:
    assert describe_model("HuggingFaceTB/SmolLM2-135M") == [{"hub_id": "HuggingFaceTB/SmolLM2-135M"}]


# ------------------------------------------------------------------------------------------------ render and read


def test_a_card_reads_back_what_was_written(tmp_path: Path) -> None:
    metadata = {
        "license": "apache-2.0",
        "language": ["en", "hi"],
        "tags": ["seshu", "llama"],
        "seshu": {
            "command": "seshu pretrain",
            "recipe": {"model": {"arch": "llama", "overrides": {"hidden_size": 64}}, "train": {"lr": 3e-3}},
            "inputs": [{"path": "कहानी/गाँव.txt", "sha256": "0" * 64}, {"hub_id": "org/data"}],
            "metrics": {"eval_perplexity": 12.5, "steps": 4, "finished": True, "note": None},
            # a value that spans lines, one of them the front matter's own fence
            "notes": "line one\n---\nline three: with a colon",
        },
    }
    text = render_card("गाँव के लोग — a tiny model", metadata, "\n\nTrained on *two* languages.\n\n")
    assert text.startswith("---\n") and "\n# गाँव के लोग — a tiny model\n\nTrained on *two* languages.\n" in text
    assert text.endswith("languages.\n")
    card = write(tmp_path / "README.md", text)
    assert read_card_metadata(card) == metadata
    assert list(read_card_metadata(card)) == list(metadata)  # the order written is the order read


def test_a_card_without_front_matter_has_no_metadata(tmp_path: Path) -> None:
    assert read_card_metadata(write(tmp_path / "plain.md", "# A model\n\nlicense: mit\n")) == {}
    assert read_card_metadata(write(tmp_path / "list.md", "---\n- a\n- b\n---\n\n# A list\n")) == {}
    assert read_card_metadata(write(tmp_path / "empty.md", "---\n---\n\n# Nothing\n")) == {}
    assert read_card_metadata(write(tmp_path / "braces.md", render_card("T", {}, "body"))) == {}


# ------------------------------------------------------------------------------------------------ seshu_block


def test_seshu_block_of_our_card(tmp_path: Path) -> None:
    our_card(tmp_path, "seshu merge", method="ties")
    assert seshu_block(tmp_path) == {"command": "seshu merge", "method": "ties"}


@pytest.mark.parametrize(
    "card",
    [
        None,  # no card at all
        "---\nlicense: mit\nlibrary_name: transformers\n---\n\n# Someone else's model\n",
        "---\nseshu: just a string\n---\n",
        "---\nseshu: [1, 2]\n---\n",
        "---\nlicense: [mit\n---\n\n# Broken YAML\n",
        "---\n\tkey: tab-indented\n---\n",
        "# A README with no front matter\n",
        "---\nno closing fence: here\n\n# Title\n",
        b"\xff\xfe\x00 not UTF-8",
    ],
    ids=["none", "foreign", "string", "list", "bad-yaml", "tab", "no-front-matter", "unclosed", "binary"],
)
def test_seshu_block_of_a_card_that_is_not_ours_is_empty(tmp_path: Path, card: str | bytes | None) -> None:
    if card is not None:
        write(tmp_path / "README.md", card)
    assert seshu_block(tmp_path) == {}


def test_seshu_block_of_a_readme_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "README.md").mkdir()
    assert seshu_block(tmp_path) == {}


# ------------------------------------------------------------------------------------------------ usage_snippet


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # A quote and a non-ASCII letter in the base's name: the snippet must still be valid Python.
    root = tmp_path_factory.mktemp("card")
    model = save_tiny_model(root / "farmer's मॉडल", CORPUS)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(str(root / "adapter"))
    return model, root / "adapter"


def code_of(snippet: str) -> str:
    match = re.fullmatch(r"```python\n(.*)```\n", snippet, re.DOTALL)
    assert match, snippet
    return match[1]


def test_the_model_snippet_loads_the_model(model_and_adapter: tuple[Path, Path]) -> None:
    model, _ = model_and_adapter
    scope: dict[str, Any] = {"PATH": str(model)}
    exec(code_of(usage_snippet()), scope)
    assert isinstance(scope["model"], PreTrainedModel) and isinstance(scope["tokenizer"], PreTrainedTokenizerBase)
    assert scope["tokenizer"].decode(scope["tokenizer"]("The river").input_ids, skip_special_tokens=True) == "The river"


def test_the_adapter_snippet_applies_the_adapter_to_its_base(model_and_adapter: tuple[Path, Path]) -> None:
    model, adapter = model_and_adapter
    scope: dict[str, Any] = {"PATH": str(adapter)}
    exec(code_of(usage_snippet(base=str(model))), scope)
    loaded = scope["model"]
    assert isinstance(loaded, PeftModel)
    base = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        tokens = torch.tensor([[base.config.bos_token_id, 5, 6, 7]])
        assert not torch.allclose(loaded(tokens).logits, base(tokens).logits)  # the adapter is applied


# ------------------------------------------------------------------------------------------------ replaceable outputs


COMMANDS = ("seshu merge",)


def test_a_new_or_empty_folder_or_an_earlier_output_may_be_replaced(tmp_path: Path) -> None:
    check_replaceable_output(tmp_path / "new" / "out", [], COMMANDS, "a merge")
    (tmp_path / "empty").mkdir()
    check_replaceable_output(tmp_path / "empty", [], COMMANDS, "a merge")
    earlier = our_card(tmp_path / "earlier", "seshu merge")
    write(earlier / "model.safetensors", b"weights")
    check_replaceable_output(earlier, [str(tmp_path / "input"), "", "org/model"], COMMANDS, "a merge")
    fold = our_card(tmp_path / "fold", "seshu adapters fold")
    check_replaceable_output(fold, [], ("seshu merge", "seshu adapters fold"), "an earlier merge or fold")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("input", "--out is the input"),
        ("input-spelt-otherwise", "--out is the input"),
        ("file", "exists and is not a folder"),
        ("foreign", "exists and is not an earlier merge"),
        ("other-command", "exists and is not an earlier merge"),
        ("not-yaml", "exists and is not an earlier merge"),
    ],
)
def test_an_input_a_file_or_someone_elses_folder_is_refused(tmp_path: Path, case: str, message: str) -> None:
    model = write(tmp_path / "model" / "model.safetensors", b"weights").parent
    out = tmp_path / "out"
    sources = [str(model), "gpt2"]
    if case == "input":
        out = model
    elif case == "input-spelt-otherwise":
        out = tmp_path / "model" / ".." / "model"
    elif case == "file":
        write(out, "a file")
    elif case == "foreign":
        write(out / "notes.txt", "keep me")
    elif case == "other-command":
        our_card(out, "seshu moe build")
    else:
        write(out / "README.md", "---\nseshu: [\n---\n")
    before = sorted(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(UserError, match=re.escape(message)) as raised:
        check_replaceable_output(out, sources, COMMANDS, "an earlier merge")
    assert "\n" not in str(raised.value) and str(out) in str(raised.value)
    assert sorted(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()) == before
