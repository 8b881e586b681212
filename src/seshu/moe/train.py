"""`seshu moe train-router`: fine-tune only the routers of a Mixtral on prompts labelled by expert.

Every weight but each layer's `mlp.gate.weight` is frozen, so the experts, attention and embeddings come out
bit-identical. The loss is the cross-entropy of each layer's router logits against the prompt's expert at
every text token (the bos token is left out: its state is the same whatever the prompt), averaged over layers
and tokens: the router learns to send a translation prompt's tokens to the translation expert.

The language-model loss can be added (`lm_loss_weight`) but is off by default. The labels say which expert
should handle a prompt, which is what routing is for; the LM loss on a few hundred short prompts would instead
let the routers drift toward whichever mixture happens to predict those prompts best, and it needs the whole
vocabulary's logits at every step. Turn it on (0.1 is a start) when the prompts are also text the model
should predict well.

Training is transformers' `Trainer` with this loss (`RouterTrainer`), in float32 (a 16-bit router loses small
AdamW updates to rounding), with AdamW at a constant learning rate, no weight decay (decay would shrink the
routers and flatten every routing decision) and no gradient clipping. The model is written back in the dtype
it came in.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from transformers import AutoConfig, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from seshu.config import StrictModel, read_yaml, validate
from seshu.errors import UserError, first_line
from seshu.hub.card import (
    check_replaceable_output,
    describe_inputs,
    describe_model,
    render_card,
    seshu_block,
    usage_snippet,
)
from seshu.models.loading import DTYPES, check_model_dir, default_device, load_causal_lm
from seshu.moe.build import CARD_COMMAND as BUILD_COMMAND
from seshu.moe.build import write_model
from seshu.moe.config import dtype_name, load_moe_config
from seshu.moe.router import encode_prompts, text_start

CARD_COMMAND = "moe train-router"
IGNORE = -100


class RouterTrainConfig(StrictModel):
    model: str
    # Labelled prompts: a .jsonl of {"text": ..., "expert": name or index}, or a MoE YAML (its experts'
    # positive_prompts, each labelled with its expert).
    data: str
    # Held out for the accuracy figures: a fraction of each expert's prompts, or a file like `data`.
    validation: float | str = 0.25
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    lm_loss_weight: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=2)
    log_every: int = Field(50, ge=1)
    seed: int = 0
    device: str | None = None

    @field_validator("validation")
    @classmethod
    def _fraction_in_range(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError("a validation fraction must be at least 0 and below 1")
        return value


def load_router_config(path: Path | None = None, **options: Any) -> RouterTrainConfig:
    """The train-router settings: the YAML file `path` (if any) with the `options` that are not None over it."""
    raw: dict[str, Any] = read_yaml(path) if path else {}
    raw.update({key: value for key, value in options.items() if value is not None})
    config: RouterTrainConfig = validate(RouterTrainConfig, raw, str(path) if path else "train-router options")
    return config


@dataclass(frozen=True)
class RouterTrainReport:
    out: Path
    steps: int
    train_prompts: int
    heldout_prompts: int  # 0: the accuracies are measured on the training prompts
    accuracy_before: float  # share of (token, layer) pairs whose top router logit is the labelled expert
    accuracy_after: float
    layer_accuracy_after: list[float]
    final_loss: float  # mean over the last `log_every` steps (over all steps when fewer were run)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


# --------------------------------------------------------------------------------------------------
# Labelled prompts


def read_labelled(path: str, names: list[str], num_experts: int) -> list[tuple[str, int]]:
    """(text, expert index) pairs from a .jsonl file or a MoE YAML's positive prompts."""
    if Path(path).suffix in (".yaml", ".yml"):
        config = load_moe_config(path)
        if len(config.experts) != num_experts:
            raise UserError(f"{path}: lists {len(config.experts)} experts but the model has {num_experts}")
        return [(p, i) for i, e in enumerate(config.experts) for p in e.positive_prompts]
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: labelled prompts file not found")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise UserError(f'{where}: expected {{"text": ..., "expert": ...}} with a non-blank text')
        records.append((record["text"], _label(record.get("expert"), names, num_experts, where)))
    if not records:
        raise UserError(f"{path}: holds no labelled prompts")
    return records


def _label(value: Any, names: list[str], num_experts: int, where: str) -> int:
    if isinstance(value, bool) or value is None:
        raise UserError(f"{where}: 'expert' must be an expert's name or index")
    if isinstance(value, int):
        if not 0 <= value < num_experts:
            raise UserError(
                f"{where}: expert index {value} is out of range; the model has experts 0 to {num_experts - 1}"
            )
        return value
    if str(value) in names:
        return names.index(str(value))
    known = ", ".join(names) if names else f"none recorded; use indices 0 to {num_experts - 1}"
    raise UserError(f"{where}: unknown expert '{value}' (the model's experts: {known})")


def split_heldout(
    records: list[tuple[str, int]], fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Hold out `fraction` of each expert's prompts (rounded; at least one stays for training)."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in sorted({label for _, label in records}):
        mine = [r for r in records if r[1] == label]
        order = torch.randperm(len(mine), generator=generator).tolist()
        cut = min(len(mine) - 1, round(fraction * len(mine)))
        held += [mine[i] for i in order[:cut]]
        train += [mine[i] for i in order[cut:]]
    return train, held


# --------------------------------------------------------------------------------------------------
# Loss and accuracy (pure)


def token_labels(
    ids: list[list[int]], experts: list[int], bos_token_id: int | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and per-token expert labels (IGNORE at bos and padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    for row, (seq, expert) in enumerate(zip(ids, experts, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, text_start(seq, bos_token_id) : len(seq)] = expert
    return input_ids, mask, labels


def router_loss(router_logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the cross-entropy of the router logits ([tokens, experts] each) at labelled tokens."""
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    return torch.stack([F.cross_entropy(lg.float()[keep], flat[keep]) for lg in router_logits]).mean()


def layer_accuracy(router_logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> list[tuple[int, int]]:
    """Per layer, (labelled tokens whose top router logit is their expert, labelled tokens)."""
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    return [(int((lg[keep].argmax(dim=-1) == flat[keep]).sum()), int(keep.sum())) for lg in router_logits]


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def is_router(name: str) -> bool:
    return name.endswith("mlp.gate.weight")


# --------------------------------------------------------------------------------------------------
# Training


class LabelledPrompts:
    """Token ids of labelled prompts; as a dataset its items are row numbers, which `collate` pads into a batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, records: list[tuple[str, int]], max_length: int) -> None:
        self.ids = [ids[:max_length] for ids in encode_prompts(tokenizer, [text for text, _ in records])]
        self.experts = [label for _, label in records]
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> int:
        return row

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        ids = [self.ids[r] for r in rows]
        input_ids, mask, labels = token_labels(ids, [self.experts[r] for r in rows], self.bos, self.pad)
        return {"input_ids": input_ids, "attention_mask": mask, "expert_labels": labels}


class RouterTrainer(Trainer):
    """A `Trainer` whose loss is `router_loss` against each token's labelled expert, plus `lm_loss_weight` times
    the language-model loss."""

    def __init__(self, *args: Any, lm_loss_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lm_loss_weight = lm_loss_weight

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        labels = inputs.pop("expert_labels")
        out = model(**inputs, output_router_logits=True, use_cache=False)
        loss = router_loss(out.router_logits, labels)
        if self.lm_loss_weight > 0:
            loss = loss + self.lm_loss_weight * lm_loss(out.logits, inputs["input_ids"], inputs["attention_mask"])
        return (loss, out) if return_outputs else loss


class _LogLoss(TrainerCallback):
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.say(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")


@torch.no_grad()
def routing_accuracy(model: Any, data: LabelledPrompts, batch_size: int, device: torch.device) -> list[float]:
    """Per layer, the share of labelled tokens whose top router logit is their expert."""
    model.eval()
    totals: list[list[int]] | None = None
    for start in range(0, len(data), batch_size):
        batch = data.collate(list(range(start, min(start + batch_size, len(data)))))
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "expert_labels"))
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        counts = layer_accuracy(out.router_logits, labels)
        totals = [[a + c, b + n] for (a, b), (c, n) in zip(totals or [[0, 0]] * len(counts), counts, strict=True)]
    return [hit / max(n, 1) for hit, n in totals or []]


def _arguments(config: RouterTrainConfig, work: str, device: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=work,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping
        optim="adamw_torch",
        logging_steps=config.log_every,
        save_strategy="no",  # minutes of training, written all or nothing
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        disable_tqdm=True,
        remove_unused_columns=False,  # the items are row numbers, batched by LabelledPrompts.collate
        dataloader_num_workers=0,
    )


def train_router(
    config: RouterTrainConfig, out: str | Path, log: Callable[[str], None] | None = None
) -> RouterTrainReport:
    """Train the routers of the Mixtral at `config.model` and write the result to `out`, all or nothing."""
    say = log or (lambda message: None)
    out = Path(out)
    check_model_dir(config.model)
    check_replaceable_output(out, [config.model], (BUILD_COMMAND, CARD_COMMAND), "a MoE Seshu built")
    try:
        model_config = AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{config.model}: cannot read its config ({first_line(exc)})") from None
    if model_config.model_type != "mixtral":
        raise UserError(
            f"{config.model} is a '{model_config.model_type}' model; train-router takes a Mixtral (seshu moe build)"
        )
    num_experts = int(model_config.num_local_experts)
    meta = seshu_block(Path(config.model))
    names = [str(e.get("name")) for e in meta.get("experts") or [] if isinstance(e, dict)]
    names = names if len(names) == num_experts else []
    records = read_labelled(config.data, names, num_experts)
    if isinstance(config.validation, str):
        train, held = records, read_labelled(config.validation, names, num_experts)
    else:
        train, held = split_heldout(records, config.validation, config.seed)
    model, tokenizer = load_causal_lm(config.model, dtype="float32")
    for name, param in model.named_parameters():
        param.requires_grad_(is_router(name))
    train_data = LabelledPrompts(tokenizer, train, config.max_length)
    eval_data = LabelledPrompts(tokenizer, held or train, config.max_length)

    device = config.device or default_device()
    with tempfile.TemporaryDirectory(prefix="seshu-router-") as work:
        trainer = RouterTrainer(
            model=model,
            args=_arguments(config, work, device),
            train_dataset=train_data,
            data_collator=train_data.collate,
            callbacks=[_LogLoss(say)],
            lm_loss_weight=config.lm_loss_weight,
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log; `say` reports instead
        if trainer.args.device.type != torch.device(device).type:
            raise UserError(f"device {device} is not available here (training would run on {trainer.args.device})")
        before = routing_accuracy(model, eval_data, config.batch_size, trainer.args.device)
        say(f"{len(train)} training prompts, {len(held)} held out; routing accuracy before: {_mean(before):.3f}")
        result = trainer.train()
    after = routing_accuracy(model, eval_data, config.batch_size, trainer.args.device)
    say(f"routing accuracy after: {_mean(after):.3f}")
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    report = RouterTrainReport(
        out=out,
        steps=config.steps,
        train_prompts=len(train),
        heldout_prompts=len(held),
        accuracy_before=_mean(before),
        accuracy_after=_mean(after),
        layer_accuracy_after=after,
        final_loss=float(logged[-1] if logged else result.training_loss),
    )
    for param in model.parameters():
        param.requires_grad_(False)
    model.to(torch.device("cpu")).to(DTYPES[dtype_name(model_config)])  # type: ignore[arg-type]
    write_model(out, model, tokenizer, _card(config, report, meta, names))
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _card(config: RouterTrainConfig, report: RouterTrainReport, meta: dict[str, Any], names: list[str]) -> str:
    data_files = [p for p in (config.data, config.validation) if isinstance(p, str) and Path(p).is_file()]
    carried = {k: meta[k] for k in ("gate_mode", "experts_per_token", "num_experts", "experts") if k in meta}
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["seshu", "mixtral", "moe", "merge"],
        "seshu": {
            "command": CARD_COMMAND,
            "source_model": config.model,
            **carried,
            "router_training": {**report.to_dict(), "config": config.model_dump(mode="json")},
            "inputs": describe_model(config.model) + describe_inputs(data_files),
        },
    }
    held = f"{report.heldout_prompts} held-out prompts" if report.heldout_prompts else "the training prompts"
    body = (
        f"`{config.model}` with only its routers trained by `seshu moe train-router` ({report.steps} steps on "
        f"{report.train_prompts} prompts labelled by expert{': ' + ', '.join(names) if names else ''}). Routing "
        f"accuracy on {held}: {report.accuracy_before:.3f} before, {report.accuracy_after:.3f} after (share of "
        "tokens and layers whose top expert is the labelled one). Every other weight is unchanged.\n\n"
        f"{usage_snippet()}"
    )
    return render_card(f"{Path(config.model).name}, routers trained", metadata, body)
