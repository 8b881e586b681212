"""MoE assembly: peak memory of `seshu moe build` on the tiny Baraat recipe against its largest tensor, and against
what holding the assembled model takes, in the same run.

Command (~3 minutes on 2 CPU cores with the defaults; `--shapes tiny` takes seconds):
    python bench/moe_memory.py [--shapes tiny baraat-layers] [--work DIR] [--out bench/results/moe_memory.json]

Per shape, five seeded random Llamas (base, translation, instruct, qa, reasoning) and a BPE tokenizer trained on
the bundled corpus are written where recipes/tiny/baraat-moe.yaml looks for them (runs/tiny-baraat/ under the work
folder). Then, each in a child process whose own peak RSS (ru_maxrss) a launcher takes (`merge_vs_mergekit.run_timed`):
- `seshu moe build --config recipes/tiny/baraat-moe.yaml --out runs/tiny-baraat/moe` (gate_mode hidden: the
  base's forward over the recipe's prompts, then every tensor of the MoE);
- the start-up peer: a process that imports what the build imports and loads the tokenizer, and stops: the
  fixed cost every build pays, to subtract;
- the holding peer: loading the built MoE in float32 with `AutoModelForCausalLM.from_pretrained`, which is what
  a build that assembles the model in memory holds at least (the old build held that plus a dense model).
Shapes: `tiny` is the tiny quickstart model the tiny Baraat pipeline makes (hidden 64, intermediate 128, 1 layer);
`baraat-layers` has the layers of Baraat's TinyLlama 1.1B experts (hidden 2048, intermediate 5632, 32 heads, 4 kv
heads), two of them, so the largest tensor (an MLP weight, 46 MB) is the real one and the model is small enough
to build here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import transformers
from machine import cpu_model  # bench/machine.py: the benchmarks' shared look at the machine
from merge_vs_mergekit import run_timed  # its launcher: a child's own ru_maxrss

from seshu.merge.checkpoint import read_header

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny" / "baraat-moe.yaml"
DEFAULT_OUT = Path(__file__).parent / "results" / "moe_memory.json"
MODELS = ("base", "translation", "instruct", "qa", "reasoning")
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4),
    "baraat-layers": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=4),
}  # fmt: skip
STARTUP = (
    "import sys\n"
    "from transformers import LlamaForCausalLM, MixtralForCausalLM\n"
    "import seshu.cli, seshu.moe.build\n"
    "from seshu.tokenizer import load_tokenizer\n"
    "load_tokenizer(sys.argv[1])\n"
)
HOLD = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
)


def make_inputs(runs: Path, shape: dict[str, int]) -> None:
    """The five dense models and their tokenizer, as the tiny Baraat pipeline leaves them."""
    from seshu.tokenizer import train_tokenizer

    corpus = REPO / "src" / "seshu" / "assets" / "corpus"
    texts = [line for name in ("en.txt", "hi.txt") for line in (corpus / name).read_text().splitlines() if line]
    tokenizer = train_tokenizer(texts, 400)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **ids, **shape)
    for seed, name in enumerate(MODELS):
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(config).save_pretrained(runs / name)
        tokenizer.save_pretrained(runs / name)


def tensor_bytes(folder: Path) -> tuple[int, int]:
    """(largest tensor, all tensors) of a model folder, in bytes."""
    sizes = [info.nbytes for path in folder.glob("*.safetensors") for info in read_header(path).values()]
    return max(sizes), sum(sizes)


def bench_shape(name: str, work: Path) -> dict[str, Any]:
    root = work / name
    runs = root / "runs" / "tiny-baraat"
    shutil.rmtree(root, ignore_errors=True)
    print(f"[{name}] making the five dense models in {runs}", flush=True)
    make_inputs(runs, SHAPES[name])
    moe = runs / "moe"
    logs = root / "logs"
    logs.mkdir()
    os.chdir(root)  # the recipe names its inputs relative to the working folder
    build = [sys.executable, "-m", "seshu", "moe", "build", "--config", str(RECIPE), "--out", str(moe), "--json"]
    results = {
        "startup": run_timed([sys.executable, "-c", STARTUP, str(runs / "base")], logs / "startup", logs),
        "build": run_timed(build, logs / "build", moe),
    }
    if results["build"]["returncode"] != 0:
        print(results["build"].get("error_tail", ""), file=sys.stderr)
        return {"shape": SHAPES[name], **results}
    results["hold"] = run_timed([sys.executable, "-c", HOLD, str(moe)], logs / "hold", logs)
    largest, moe_bytes = tensor_bytes(moe)
    _, dense_bytes = tensor_bytes(runs / "base")
    increase = (results["build"]["peak_mb"] - results["startup"]["peak_mb"]) * 2**20
    held = (results["hold"]["peak_mb"] - results["startup"]["peak_mb"]) * 2**20
    row = {
        "shape": SHAPES[name],
        "largest_tensor_mb": round(largest / 2**20, 2),
        "dense_model_mb": round(dense_bytes / 2**20, 1),
        "moe_mb": round(moe_bytes / 2**20, 1),
        "build_peak_mb": results["build"]["peak_mb"],
        "startup_peak_mb": results["startup"]["peak_mb"],
        "hold_peak_mb": results["hold"]["peak_mb"],
        "build_increase_over_largest_tensor": round(increase / largest, 2),
        "build_increase_over_moe": round(increase / moe_bytes, 3),
        "hold_increase_over_largest_tensor": round(held / largest, 2),
        "runs": results,
    }
    print(f"[{name}] largest tensor {row['largest_tensor_mb']} MB, MoE {row['moe_mb']} MB; peaks: build "
          f"{row['build_peak_mb']} MB, start-up {row['startup_peak_mb']} MB, holding the MoE "
          f"{row['hold_peak_mb']} MB; build - start-up = {row['build_increase_over_largest_tensor']} x the largest "
          "tensor", flush=True)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--work", type=Path, default=None, help="folder for the models (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    transformers.logging.set_verbosity_error()
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    work = (args.work or Path(tempfile.mkdtemp(prefix="seshu-moe-bench-"))).resolve()
    try:
        rows = [bench_shape(name, work) for name in args.shapes]
    finally:
        os.chdir(REPO)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "moe_memory",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/moe_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "recipe": str(RECIPE.relative_to(REPO)),
        "measure": "peak RSS (ru_maxrss via a launcher) of each child; increase = build peak - start-up peak",
        "environment": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("seshu", "torch", "transformers")},
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0 if all(r["runs"]["build"]["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
