"""LoRA wiring shared by fine-tuning and LoRA continued pretraining: targets from the registry, checked."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from seshu.config import LoraSection
from seshu.errors import UserError, first_line
from seshu.models.registry import arch_of

# The layer types peft's LoRA adapts (what a target module can be).
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)


def lora_config(
    lora: LoraSection,
    model: PreTrainedModel,
    key: str,
    exclude_modules: str | None = None,
    modules_to_save: list[str] | None = None,
) -> LoraConfig:
    """`lora`'s settings, with target modules (and fused expert parameters) from the registry by default (a
    composite model's from its language model's architecture). `exclude_modules` (a regex on module paths) keeps
    LoRA out of parts of the model; `modules_to_save` train whole and are saved with the adapter."""
    default_modules, default_params = _defaults(model.config)
    modules = lora.target_modules if lora.target_modules is not None else default_modules
    params = lora.target_parameters if lora.target_parameters is not None else default_params
    if not modules and not params:
        raise UserError(
            f"{key}.target_modules: Seshu has no default targets for model type '{model.config.model_type}'; "
            f"name the modules to adapt ({what_it_has(model)})"
        )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        # peft applies no dropout to fused parameters and refuses a non-zero one there.
        lora_dropout=lora.dropout if lora.dropout is not None else 0.0 if params else 0.05,
        target_modules=modules or None,
        target_parameters=params or None,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _defaults(config: PretrainedConfig) -> tuple[list[str], list[str]]:
    spec = arch_of(config.get_text_config())
    return (list(spec.lora_modules), list(spec.lora_parameters)) if spec else ([], [])


def what_it_has(model: PreTrainedModel) -> str:
    """The names of an (unwrapped) model's adaptable layers and Seshu's default targets, for an error message."""
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ADAPTABLE)})
    defaults = _defaults(model.config)[0]
    line = f"its layers: {', '.join(names) or 'none'}"
    return line + (f"; Seshu's default targets: {', '.join(defaults)}" if defaults else "")


def check_every_target_trains(model: PeftModel, config: LoraConfig, key: str, has: str) -> None:
    """A LoRA target that matches nothing would silently train less than asked: make it an error (`has` says
    what the model has instead)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]
    for target in config.target_modules or []:
        if not any(f".{target}.lora_" in name for name in trainable):
            raise UserError(f"{key}.target_modules: '{target}' matches nothing in the model ({has})")
    # peft wraps the module holding a targeted parameter and remembers the parameter's name on the wrapper.
    wrapped = {getattr(module, "parameter_name", None) for module in model.modules()}
    for target in config.target_parameters or []:
        if target.split(".")[-1] not in wrapped:
            raise UserError(f"{key}.target_parameters: '{target}' matches nothing in the model")


def check_every_target_is_called(model: PeftModel, key: str, has: str) -> None:
    """A model may compute with a layer's weight directly instead of calling the layer (Mamba's dt_proj), so the
    LoRA wrapped around it never runs and never trains (and training dies on a loss without gradient). One
    forward pass over two tokens finds such targets before training starts."""
    called: set[str] = set()
    modules = dict(model.named_modules())
    layers = [name for name, module in modules.items() if isinstance(module, LoraLayer)]
    hooks = [modules[name].register_forward_hook(lambda *_, name=name: called.add(name)) for name in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.tensor([[0, 0]], device=next(model.parameters()).device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    # By target name, not layer by layer: a mixture of experts routes two tokens past most of its experts.
    never = sorted({name.rsplit(".", 1)[-1] for name in layers} - {name.rsplit(".", 1)[-1] for name in called})
    if never:
        raise UserError(
            f"{key}.target_modules: the model computes with the weights of {', '.join(never)} without calling "
            f"{'it' if len(never) == 1 else 'them'}, so LoRA there would never train; choose other targets ({has})"
        )


def _token_layers(model: PreTrainedModel) -> list[str]:
    """The names of the layers that hold a row per token: the input embeddings, and an untied head too (the
    head's row of a new token is what makes the model say it, so it must train as well)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [embeddings] if head is None or head.weight is embeddings.weight else [embeddings, head]
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def apply_lora(
    model: PreTrainedModel,
    lora: LoraSection,
    key: str,
    new_token_ids: int | list[int] | None = None,
    *,
    exclude_modules: str | None = None,
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """`model` wrapped with fresh LoRA adapters (and trainable rows for `new_token_ids`), every target checked;
    `exclude_modules` and `modules_to_save` as `lora_config` takes them."""
    config = lora_config(lora, model, key, exclude_modules, modules_to_save)
    if new_token_ids is not None:
        ids = new_token_ids if isinstance(new_token_ids, list) else [new_token_ids]
        config.trainable_token_indices = {layer: ids for layer in _token_layers(model)}
    has = what_it_has(model)  # before peft wraps its layers in its own
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # e.g. peft refuses Mamba's out_proj and conv1d
        raise UserError(f"{key}: peft cannot apply LoRA here: {first_line(exc)} ({has})") from None
    check_every_target_trains(wrapped, config, key, has)
    check_every_target_is_called(wrapped, key, has)
    return wrapped
