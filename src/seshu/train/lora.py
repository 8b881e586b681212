"""LoRA wiring shared by fine-tuning and LoRA continued pretraining: targets from the registry, checked."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from seshu.config import LoraSection
from seshu.errors import UserError
from seshu.models.registry import arch_of


def lora_config(lora: LoraSection, model: PreTrainedModel, key: str) -> LoraConfig:
    """`lora`'s settings, with target modules (and fused expert parameters) from the registry by default."""
    spec = arch_of(model.config)
    default_modules, default_params = (list(spec.lora_modules), list(spec.lora_parameters)) if spec else ([], [])
    modules = lora.target_modules if lora.target_modules is not None else default_modules
    params = lora.target_parameters if lora.target_parameters is not None else default_params
    if not modules and not params:
        raise UserError(
            f"{key}.target_modules: Seshu has no default targets for model type '{model.config.model_type}'; "
            "name the modules to adapt"
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
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_every_target_trains(model: torch.nn.Module, config: LoraConfig, key: str) -> None:
    """A LoRA target that matches nothing would silently train less than asked: make it an error."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]
    for target in config.target_modules or []:
        if not any(f".{target}.lora_" in name for name in trainable):
            raise UserError(f"{key}: the target module '{target}' matches nothing in the model")
    # peft wraps the module holding a targeted parameter and remembers the parameter's name on the wrapper.
    wrapped = {getattr(module, "parameter_name", None) for module in model.modules()}
    for target in config.target_parameters or []:
        if target.split(".")[-1] not in wrapped:
            raise UserError(f"{key}: the target parameter '{target}' matches nothing in the model")


def apply_lora(
    model: PreTrainedModel, lora: LoraSection, key: str, new_token_ids: int | list[int] | None = None
) -> PeftModel:
    """`model` wrapped with fresh LoRA adapters (and trainable rows for `new_token_ids`), every target checked."""
    config = lora_config(lora, model, key)
    if new_token_ids is not None:
        config.trainable_token_indices = new_token_ids if isinstance(new_token_ids, list) else [new_token_ids]
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"{key}: {str(exc).splitlines()[0]}") from None
    check_every_target_trains(wrapped, config, key)
    return wrapped
