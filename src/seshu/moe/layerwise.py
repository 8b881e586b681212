"""The base model's forward over a few prompts, one decoder layer at a time, for `hidden` gate vectors.

`seshu moe build` needs the hidden state entering every layer's MLP for each expert's prompts. Loading the base
to run it would hold the whole model (4.4 GB in float32 for Baraat's 1.1B base) when the prompts' states are a
few MB. Here the model is built on the meta device (no memory), and each decoder layer in turn gets its weights
from the checkpoint, runs every prompt's states through the model's own forward (which builds the causal or
sliding-window mask and the rotary embeddings exactly as a whole-model forward does), and is dropped: the memory
is one layer plus the states. Every layer sees the very tensors a whole-model forward would hand it, so the
states are the same to the bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AutoModel, PretrainedConfig

# The prefix a causal LM's checkpoint puts before its decoder's tensors (`model.layers.0...`).
DECODER = "model."


@torch.no_grad()
def mlp_inputs_by_layer(
    config: PretrainedConfig, read: Callable[[str], torch.Tensor], sequences: list[list[int]]
) -> Iterator[list[torch.Tensor]]:
    """For each layer in order, the hidden states entering its MLP for each sequence ([positions, hidden] each,
    float32). `read(name)` gives a tensor of the model's checkpoint in float32."""
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    model.eval()
    model.rotary_emb = type(model.rotary_emb)(config=config)  # its buffers are computed, not loaded: not on meta
    model.norm = torch.nn.Identity()  # so that the forward returns the layer's own output
    embed = read(f"{DECODER}embed_tokens.weight")
    states = [F.embedding(torch.tensor([ids]), embed) for ids in sequences]
    del embed
    pending = list(reversed(model.layers))  # popped as used, so that a used layer's weights go at once
    for index in range(len(pending)):
        layer = pending.pop()
        layer.load_state_dict({k: read(f"{DECODER}layers.{index}.{k}") for k in layer.state_dict()}, assign=True)
        model.layers = torch.nn.ModuleList([layer])
        captured: list[torch.Tensor] = []
        handle = layer.mlp.register_forward_pre_hook(partial(_record, captured))
        try:
            states = [model(inputs_embeds=h, use_cache=False).last_hidden_state for h in states]
        finally:
            handle.remove()
        model.layers = torch.nn.ModuleList()
        del layer
        yield captured


def _record(into: list[torch.Tensor], module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    into.append(args[0][0].float())  # the MLP's input for the one sequence of the batch
