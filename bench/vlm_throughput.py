"""VLM training throughput and memory: `seshu vlm pretrain-projector` and LoRA `seshu sft` on a VLM, against the
same training written directly on transformers + trl + peft.

Command (about 10 minutes on 2 idle CPU cores with the defaults: 2 alternating attempts per side and task):
    python bench/vlm_throughput.py [--tasks projector lora] [--steps 24] [--warmup 2] [--preset small]
        [--image-size 224] [--patch-size 32] [--batch-size 8] [--records 320] [--repeats 2]
        [--out bench/results/vlm_throughput.json]

The VLM is built by `seshu.multimodal.vlm.build_vlm` from a seeded random CLIP vision tower (`VISION`: ViT
224/32, 6 layers 384 wide, so one `<image>` fills (224 / 32)^2 = 49 positions; saved with a `CLIPImageProcessorPil`)
and a fresh llama at `--preset` with a BPE tokenizer trained on the bundled corpus. The data is synthetic: JPEGs of
coloured shapes drawn with PIL, a caption for each (LLaVA's pretraining records) and a two-turn conversation about
it (LLaVA's instruct records). Seshu's own `build_datasets` turns them into rows once, in the driver; the direct
side reads those rows, and Seshu rebuilds the same rows in its run folder (checked by digest).

Each measurement runs in a fresh subprocess of this script (`--worker`), so that its peak memory is its own:
- **projector**, seshu: `seshu.multimodal.pretrain_projector.run(recipe)`; direct: `LlavaForConditionalGeneration
  .from_pretrained`, everything frozen but `multi_modal_projector`, and transformers' plain `Trainer`. Plain
  Trainer because that is what a person uses here: LLaVA's own pretraining script is a Trainer, and with the
  rows already tokenized and labelled trl's SFTTrainer would only add its fused LM head (see the lora task).
- **lora**, seshu: `seshu.multimodal.sft.run(recipe)` with `sft.method: lora` (the projector trains whole);
  direct: `get_peft_model` with the same `LoraConfig` (Seshu's r, alpha, dropout and llama targets,
  `exclude_modules` the vision tower and projector, `modules_to_save` the projector) and trl's `SFTTrainer` with
  a collator for the pre-tokenized rows, `remove_unused_columns=False` and `skip_prepare_dataset`, as trl's docs
  have it for a custom VLM collator.

Both direct sides copy the recipe's batch size, steps, lr, schedule, warm-up, weight decay, clipping, optimizer,
precision, seed and logging interval, evaluate the validation rows and save at the end as Seshu does, and batch
with the same image processor: the collator pads the rows and reads their images into `pixel_values`.

Tokens/s and memory are measured as in `bench/sft_throughput.py` (its `StepMeter`): steady state from the end of
step `--warmup` to the end of the last step, counting each batch's attention mask, so image positions count; the
rows' digest and every step's token count must agree between the sides. `peak_rss_mb` is the worker's
ru_maxrss, `train_peak_mb` the peak resident memory from the start of training to its end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from machine import machine_record  # bench/machine.py: the benchmarks' shared look at the machine
from PIL import Image, ImageDraw
from sft_throughput import (  # bench/sft_throughput.py: the same measuring, for text fine-tuning
    CORPUS,
    Row,
    StepMeter,
    _version,
    alternate_sides,
    rows_digest,
    run_measurement,
    run_worker_process,
    summarize,
)

TASKS = ("projector", "lora")
DEFAULT_OUT = Path(__file__).parent / "results" / "vlm_throughput.json"
# A CLIP ViT-B/32's geometry (224 px, 32 px patches) at a CPU's width: 384 wide, 6 layers (10.7M parameters).
VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (230, 200, 30),
           "purple": (130, 50, 170), "orange": (240, 140, 30)}  # fmt: skip
SHAPES = ("square", "circle", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right", "centre")
QUESTIONS = ("What shape is in the picture?", "What do you see in this image?", "Describe the object shown.")


# --------------------------------------------------------------------------------------------------
# Synthetic data (in the driver)


def draw(rng: random.Random, pixels: int) -> tuple[Image.Image, dict[str, str]]:
    """A shape of a random colour, size and place on a pale background, with the facts a caption states."""
    colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PLACES)
    image = Image.new("RGB", (pixels, pixels), tuple(rng.randint(215, 255) for _ in range(3)))  # type: ignore[arg-type]
    size = rng.randint(pixels // 5, pixels // 3)
    x = {"left": pixels // 8, "right": pixels - pixels // 8 - size}.get(place.split()[-1], (pixels - size) // 2)
    y = {"top": pixels // 8, "bottom": pixels - pixels // 8 - size}.get(place.split()[0], (pixels - size) // 2)
    box = (x, y, x + size, y + size)
    pen = ImageDraw.Draw(image)
    if shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=COLOURS[colour])
    return image, {"colour": colour, "shape": shape, "place": place, "size": "large" if size > pixels // 4 else "small"}


def write_records(folder: Path, count: int, pixels: int, seed: int) -> tuple[Path, Path]:
    """`count` images under `folder/images` with LLaVA pretraining records (a caption each) and LLaVA instruct
    records (two questions and answers each); the two records files."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    captions, conversations = [], []
    for i in range(count):
        image, f = draw(rng, pixels)
        name = f"images/{i:05d}.jpg"
        image.save(folder / name, quality=90)  # JPEG, as LLaVA's data is
        captions.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nGive a short caption of this image."},
            {"from": "gpt", "value": f"A {f['size']} {f['colour']} {f['shape']} in the {f['place']} of a plain "
                                     "pale background."}]})  # fmt: skip
        conversations.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{rng.choice(QUESTIONS)}"},
            {"from": "gpt", "value": f"The picture shows a {f['colour']} {f['shape']}; it is {f['size']} and "
                                     "stands alone on a plain background."},
            {"from": "human", "value": "Where in the picture is it?"},
            {"from": "gpt", "value": f"It is in the {f['place']} of the picture."}]})  # fmt: skip
    paths = folder / "captions.json", folder / "instruct.json"
    for path, records in zip(paths, (captions, conversations), strict=True):
        path.write_text(json.dumps(records), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------------
# Recipes (plain dicts, so they travel to a worker); every setting not named is the recipe's default


def make_recipe(task: str, args: argparse.Namespace, vlm: Path, records: Path, out: Path) -> dict[str, Any]:
    steps = args.warmup + args.steps
    train = {
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "max_steps": steps,
        # Past the last step: no evaluation or checkpoint inside the timed window.
        "eval_every": steps + 1,
        "save_every": steps + 1,
        "seed": args.seed,
    }
    data = {"train": str(records), "validation": 0.05}
    if task == "projector":
        return {"model": {"init_from": str(vlm)}, "data": data, "train": train, "output_dir": str(out)}
    return {"model": {"init_from": str(vlm)}, "data": {**data, "train": [str(records)]}, "train": train,
            "sft": {"method": "lora"}, "vlm": {"projector": "train"}, "output_dir": str(out)}  # fmt: skip


def validate_recipe(task: str, raw: dict[str, Any]) -> Any:
    from seshu.config import SFTRecipe, validate
    from seshu.multimodal.config import VLMPretrainRecipe

    return validate(VLMPretrainRecipe if task == "projector" else SFTRecipe, raw, "benchmark recipe")


# --------------------------------------------------------------------------------------------------
# The two contenders (each runs in its own worker process)


def seshu_side(task: str, recipe: Any, warmup: int) -> dict[str, Any]:
    # Only the task's own module: importing the other would count its imports against this task's memory.
    if task == "projector":
        from seshu.multimodal.pretrain_projector import run
    else:
        from seshu.multimodal.sft import run
    meter = StepMeter(warmup)
    result = run(recipe, callbacks=[meter])
    if result.steps != recipe.train.max_steps:
        raise RuntimeError(f"seshu ran {result.steps} steps, expected {recipe.train.max_steps}")
    return {**summarize(meter, warmup), "trainable_parameters": result.trainable_parameters}


class RowCollator:
    """What a person writes to batch pre-tokenized VLM rows: pad ids (pad token), labels (-100) and the attention
    mask on the right, and run the processor's image processor over the rows' images."""

    def __init__(self, processor: Any) -> None:
        self.image_processor = processor.image_processor
        self.pad_id = processor.tokenizer.pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from torch.nn.utils.rnn import pad_sequence

        ids = [torch.tensor(row["input_ids"]) for row in rows]
        batch = {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_id),
            "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
            "labels": pad_sequence([torch.tensor(r["labels"]) for r in rows], batch_first=True, padding_value=-100),
        }
        images = [Image.open(path).convert("RGB") for row in rows for path in row["images"]]
        if images:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch


def direct_side(task: str, recipe: dict[str, Any], warmup: int, rows_dir: Path, targets: list[str]) -> dict[str, Any]:
    """The same training written on transformers (projector) or transformers + peft + trl (lora). `recipe` is the
    Seshu recipe as a plain dict with every default filled in, so this side imports nothing of Seshu's."""
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    t, base, out = recipe["train"], recipe["model"]["init_from"], Path(recipe["output_dir"])
    processor = AutoProcessor.from_pretrained(base)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    common = dict(
        output_dir=str(out / "checkpoints"),
        max_steps=t["max_steps"],
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["grad_accum"],
        learning_rate=t["lr"],
        lr_scheduler_type=t["scheduler"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"],
        optim=t["optimizer"],
        bf16=False,  # the recipe trains in fp32 (trl's default is bf16)
        gradient_checkpointing=t["gradient_checkpointing"],  # off in both recipes (trl's default is on)
        logging_steps=t["log_every"],
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=t["seed"],
        data_seed=t["seed"],
        remove_unused_columns=False,  # the collator needs `images`, which the model's signature lacks
    )
    meter = StepMeter(warmup)
    data = {
        "train_dataset": datasets.load_from_disk(str(rows_dir / "train")),
        "eval_dataset": datasets.load_from_disk(str(rows_dir / "validation")),
        "data_collator": RowCollator(processor),
        "callbacks": [meter],
    }
    trainer: Trainer
    if task == "projector":
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        trainer = Trainer(model=model, args=TrainingArguments(**common), **data)
    else:
        from peft import LoraConfig, get_peft_model
        from trl import SFTConfig, SFTTrainer

        lora = recipe["sft"]["lora"]
        config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=0.05 if lora["dropout"] is None else lora["dropout"],  # Seshu's default for nn.Linear
            target_modules=targets,  # Seshu's registry defaults for the LM's architecture
            exclude_modules=".*(vision_tower|multi_modal_projector).*",  # the vision tower has q_proj etc. too
            modules_to_save=["multi_modal_projector"],
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        sft_args = SFTConfig(
            **common, max_length=t["seq_len"], packing=False, dataset_kwargs={"skip_prepare_dataset": True}
        )
        trainer = SFTTrainer(model=model, args=sft_args, processing_class=processor, **data)
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(out / "final"))
    processor.save_pretrained(str(out / "final"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**summarize(meter, warmup), "trainable_parameters": trainable}


def worker_main(spec_path: Path) -> int:
    """Run one measurement as `spec_path` says and write its figures next to it (`<spec>.result.json`)."""

    def measure(spec: dict[str, Any]) -> dict[str, Any]:
        torch.manual_seed(spec["recipe"]["train"]["seed"])
        if spec["side"] == "seshu":
            return seshu_side(spec["task"], validate_recipe(spec["task"], spec["recipe"]), spec["warmup"])
        return direct_side(spec["task"], spec["recipe"], spec["warmup"], Path(spec["rows_dir"]), spec["lora_targets"])

    return run_measurement(spec_path, measure)


# --------------------------------------------------------------------------------------------------
# The VLM, the records and the rows (in the driver)


@dataclass
class Prepared:
    vlm_dir: Path
    records: dict[str, Path]  # per task
    rows_dirs: dict[str, Path]  # per task
    data: dict[str, dict[str, Any]]  # per task: row counts, digest, tokens
    model: dict[str, Any]
    lora_targets: list[str]  # Seshu's defaults for the LM's architecture


def prepare(args: argparse.Namespace, work: Path) -> Prepared:
    """Build the VLM, draw the images, write the records, and build the rows each task trains on."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlavaProcessor

    from seshu.config import PretrainRecipe, validate
    from seshu.data.pipeline import training_documents
    from seshu.models.registry import ARCHS
    from seshu.multimodal import pretrain_projector, sft
    from seshu.multimodal.vlm import build_vlm
    from seshu.tokenizer import train_tokenizer

    corpus = validate(PretrainRecipe, {"data": {"train": list(CORPUS)}}, "corpus").data
    tokenizer = train_tokenizer(training_documents(corpus, args.seed), args.tokenizer_vocab, "bpe", seed=args.seed)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    torch.manual_seed(args.seed)
    vision = CLIPVisionConfig(**VISION, image_size=args.image_size, patch_size=args.patch_size)
    CLIPVisionModel(vision).save_pretrained(str(work / "clip"))
    side = args.image_size
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        str(work / "clip")
    )
    vlm = work / "vlm"
    built = build_vlm(str(work / "clip"), f"llama:{args.preset}", vlm, tokenizer=str(work / "tokenizer"),
                      context_length=args.seq_len, seed=args.seed)  # fmt: skip
    report = built.report
    del built
    captions, conversations = write_records(work / "data", args.records, args.image_pixels, args.seed)

    processor = LlavaProcessor.from_pretrained(str(vlm))
    tok, image_id, positions = processor.tokenizer, report.image_token_id, report.image_tokens
    records = {"projector": captions, "lora": conversations}
    rows_dirs, data = {}, {}
    for task in args.tasks:
        recipe = validate_recipe(task, make_recipe(task, args, vlm, records[task], work / f"probe-{task}"))
        build = pretrain_projector.build_datasets if task == "projector" else sft.build_datasets
        train, validation = build(recipe, tok, image_id, positions, work / f"cache-{task}")
        rows_dirs[task] = work / f"rows-{task}"
        train.save_to_disk(str(rows_dirs[task] / "train"))
        validation.save_to_disk(str(rows_dirs[task] / "validation"))
        lengths = [len(ids) for ids in train["input_ids"]]
        images = sum(len(i) for i in train["images"])
        data[task] = {
            "records_file": records[task].name,
            "train_rows": len(train),
            "validation_rows": len(validation),
            "rows_digest": rows_digest(train["input_ids"]),
            "train_tokens": sum(lengths),
            "image_positions": images * positions,
            "answer_tokens": sum(sum(label != -100 for label in labels) for labels in train["labels"]),
            "mean_row_tokens": round(sum(lengths) / len(lengths), 1),
        }
    model = {
        "vision": {**VISION, "image_size": args.image_size, "patch_size": args.patch_size},
        "lm": f"llama:{args.preset}",
        "image_positions": positions,
        "parameters": report.parameters,
        "projector_parameters": report.projector_parameters,
        "tokenizer_size": len(tok),
    }
    return Prepared(vlm, records, rows_dirs, data, model, list(ARCHS["llama"].lora_modules))


# --------------------------------------------------------------------------------------------------
# Driver


def worker_spec(side: str, task: str, args: argparse.Namespace, prepared: Prepared, out: Path) -> dict[str, Any]:
    """What a worker is told: the side, the task, where the rows are, and the recipe (training into `out`)."""
    recipe = make_recipe(task, args, prepared.vlm_dir, prepared.records[task], out)
    return {
        "task": task,
        "side": side,
        "warmup": args.warmup,
        "rows_dir": str(prepared.rows_dirs[task]),
        # Every default filled in, so that the direct side reads the settings without importing Seshu.
        "recipe": validate_recipe(task, recipe).model_dump(mode="json"),
        "lora_targets": prepared.lora_targets,
    }


def run_worker(side: str, task: str, args: argparse.Namespace, prepared: Prepared, work: Path, tag: str) -> dict:
    name = f"{task}-{side}-{tag}"
    spec = worker_spec(side, task, args, prepared, work / name)
    return run_worker_process(__file__, spec, work / name, args.max_wait, prepared.data[task]["rows_digest"])


def bench_task(task: str, args: argparse.Namespace, prepared: Prepared, work: Path) -> Row:
    print(f"[{task}] {args.warmup} warm-up + {args.steps} timed steps, median of {args.repeats}", flush=True)
    seshu, direct, attempts = alternate_sides(
        task, args.repeats, lambda side, attempt: run_worker(side, task, args, prepared, work, str(attempt))
    )
    return Row(task, prepared.model["parameters"], seshu["trainable_parameters"], seshu, direct, attempts)


def memory_ratio(row: Row, key: str) -> float | None:
    seshu, direct = row.seshu.get(key), row.direct.get(key)
    return round(seshu / direct, 3) if seshu and direct else None


def print_table(rows: Sequence[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("task", "trainable", "seshu tok/s", "direct tok/s", "seshu/direct", "seshu train MB",
               "direct train MB", "train MB ratio", "seshu peak MB", "direct peak MB", "peak ratio")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "task" else "right")
    for r in rows:
        speed = "green" if r.ratio >= 0.95 else "red"
        memory = [memory_ratio(r, "train_peak_mb"), memory_ratio(r, "peak_rss_mb")]
        table.add_row(
            r.method,
            f"{r.trainable_parameters / 1e6:.2f}M",
            f"{r.seshu['tokens_per_second']:,.0f}",
            f"{r.direct['tokens_per_second']:,.0f}",
            f"[{speed}]{r.ratio:.2f}[/]",
            f"{r.seshu['train_peak_mb'] or 0:,.0f}",
            f"{r.direct['train_peak_mb'] or 0:,.0f}",
            "-" if memory[0] is None else f"{memory[0]:.2f}",
            f"{r.seshu['peak_rss_mb']:,.0f}",
            f"{r.direct['peak_rss_mb']:,.0f}",
            "-" if memory[1] is None else f"{memory[1]:.2f}",
        )
    console = Console(width=160)
    console.print(table)
    console.print(
        "tok/s: real (non-padding) tokens per second after the warm-up, image positions included. Goals: "
        "seshu/direct >= 0.95, memory ratios <= 1.\ntrain MB: peak resident memory from the start of training to "
        "its end; peak MB: the worker's ru_maxrss (load, train, final eval and save)."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--steps", type=int, default=24, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--preset", default="small", help="llama size preset of the language model")
    parser.add_argument("--image-size", type=int, default=224, help="the vision tower's input side in pixels")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--image-pixels", type=int, default=320, help="side of the drawn JPEGs (resized to fit)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--records", type=int, default=320, help="images, with one record of each task per image")
    parser.add_argument("--tokenizer-vocab", type=int, default=8000, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="attempts per side, alternating; the median attempt is reported"
    )
    parser.add_argument(
        "--max-wait", type=float, default=60.0, help="seconds to wait for other processes to go quiet before each run"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    transformers.logging.set_verbosity_error()
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="seshu-vlm-bench-") as tmp:
        work = Path(tmp)
        print("building the VLM, the images and the rows ...", flush=True)
        prepared = prepare(args, work)
        m = prepared.model
        print(f"VLM: {m['parameters']:,} parameters (CLIP {args.image_size}/{args.patch_size}: {m['image_positions']} "
              f"positions per image; {m['lm']})", flush=True)  # fmt: skip
        for task in args.tasks:
            d = prepared.data[task]
            print(f"[{task}] {d['train_rows']} training rows, {d['train_tokens']:,} tokens ({d['image_positions']:,} "
                  f"image positions, {d['answer_tokens']:,} with a label)", flush=True)  # fmt: skip
        for task in args.tasks:
            rows.append(bench_task(task, args, prepared, work))

    threads = torch.get_num_threads()
    print_table(rows, f"VLM training throughput, CLIP {args.image_size}/{args.patch_size} + llama-{args.preset}, fp32, "
                f"{threads} threads, batch {args.batch_size}")  # fmt: skip
    import peft
    import trl

    report = {
        "benchmark": "vlm_throughput",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/vlm_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "worker")},
            "precision": "fp32",
            "gradient_checkpointing": False,
            "projector_train": "VLMPretrainRecipe defaults otherwise: lr 1e-3, cosine, 30 LR warm-up steps, weight "
            "decay 0, clip 1.0, adamw_torch, log every 10 steps",
            "lora_train": "SFTRecipe defaults otherwise: lr 2e-4, cosine, 10 LR warm-up steps, weight decay 0, "
            "clip 1.0, adamw_torch, log every 10 steps; lora r 16, alpha 32, dropout 0.05, llama targets; "
            "projector trained whole (modules_to_save)",
            "direct": {"projector": "transformers.Trainer", "lora": "peft.get_peft_model + trl.SFTTrainer"},
            "tokens_per_second_window": "end of the last warm-up step to the end of the last step; real tokens = "
            "attention-mask sum of each step's batch (image positions included)",
            "peak_memory": "peak_rss_mb = ru_maxrss of the worker process; train_peak_mb = VmHWM reset at "
            "on_train_begin, read at on_train_end",
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
            "pillow": _version("pillow"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "torch_threads": threads,
            **machine_record(started, load_start),
        },
        "model": prepared.model,
        "data": prepared.data,
        "results": [
            {
                **row.as_json(),
                "task": row.method,
                "train_peak_ratio": memory_ratio(row, "train_peak_mb"),
                "peak_rss_ratio": memory_ratio(row, "peak_rss_mb"),
            }
            for row in rows
        ],
        "notes": [
            "Both sides run in fresh worker processes; peak memory is per process.",
            "Each side's figures are its median attempt by tokens/s; `attempts` lists every attempt's tokens/s.",
            "foreign_cpu: share of all cores used by other processes while timing (0 = machine otherwise idle).",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
