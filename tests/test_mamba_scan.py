"""Seshu's chunked selective scan against the sequential recurrence, and inside transformers' Mamba.

Tolerances: the scans run in float32 (as transformers' do) and are compared with a float64 sequential loop (or,
for whole models, with mambapy's float32 parallel scan). Their sums run in another order, so each value may
differ by a few float32 roundings (2^-24 ~ 6e-8 relative) of the largest terms summed into it over 37 steps
and 4-16 states: rtol 1e-4 / atol 1e-5 is ~100x that, and ~1000x below what any wrong term would give.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from seshu.models.mamba import fast_path, scan_path, use_fast_scan
from seshu.models.mamba.fast_path import FastScanMambaMixer
from seshu.models.mamba.scan import selective_scan
from seshu.models.registry import build_config, build_model

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
IDS = {"bos": 1, "eos": 2, "pad": 0}


def sequential_scan(u, delta, A, B, C, D, z, delta_bias):  # type: ignore[no-untyped-def]
    """Mamba-1's recurrence one step at a time: the definition the chunked scan must reproduce."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)


def scan_inputs(seed: int, decay_scale: float) -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias at tiny shapes (batch 2, d_inner 6, d_state 4, 37 steps), float64."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, length = 2, 6, 4, 37
    return [
        torch.randn(b, d, length, generator=g, dtype=torch.float64),
        torch.randn(b, d, length, generator=g, dtype=torch.float64),
        -torch.rand(d, n, generator=g, dtype=torch.float64) * decay_scale,
        torch.randn(b, n, length, generator=g, dtype=torch.float64),
        torch.randn(b, n, length, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
        torch.randn(b, d, length, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    ]


# chunk sizes: one step, a last chunk shorter than the rest, exactly the sequence, longer than the sequence.
# decay_scale 40: some steps decay by exp(-100), the state vanishes in one step, and nothing may overflow.
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("decay_scale", [1.0, 40.0])
def test_chunked_scan_matches_the_sequential_recurrence_forward_and_backward(
    chunk_size: int, decay_scale: float
) -> None:
    inputs = [x.requires_grad_() for x in scan_inputs(0, decay_scale)]
    grad_out = torch.randn(2, 6, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = sequential_scan(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    u, delta, A, B, C, D, z, bias = inputs
    got = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    for name, g, e in zip(
        ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], got_grads, expected_grads, strict=True
    ):
        torch.testing.assert_close(g, e, **TOLERANCE, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_transformers_mamba2_chunked_scan_matches_the_sequential_recurrence() -> None:
    """Mamba-2 keeps transformers' own chunked SSD scan: check that it is exact too, forward and backward."""
    g = torch.Generator().manual_seed(0)
    b, length, heads, p, n = 2, 37, 3, 4, 5
    x, dt = torch.randn(b, length, heads, p, generator=g), torch.randn(b, length, heads, generator=g)
    A, D = -torch.rand(heads, generator=g) * 4, torch.randn(heads, generator=g)
    B, C = torch.randn(b, length, 1, n, generator=g), torch.randn(b, length, 1, n, generator=g)
    inputs = [t.double().requires_grad_() for t in (x, dt, A, D, B, C)]
    grad_out = torch.randn(b, length, heads, p, generator=g, dtype=torch.float64)

    def sequential(x, dt, A, D, B, C):  # type: ignore[no-untyped-def]
        dt = F.softplus(dt)
        h = torch.zeros(b, heads, p, n, dtype=x.dtype)
        ys = []
        for t in range(length):
            h = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * h
            h = h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((h * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
        return torch.stack(ys, 1)

    expected = sequential(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    fp32 = [t.float() for t in inputs]
    got = mamba2_chunk_scan(fp32[0], fp32[1], fp32[2], fp32[4], fp32[5], chunk_size=16, D=fp32[3], dt_softplus=True)
    got_grads = torch.autograd.grad(got, inputs, grad_out.float())
    torch.testing.assert_close(got.double(), expected, **TOLERANCE)
    for got_grad, want in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, want, **TOLERANCE)


def tiny_mamba(seed: int = 0) -> PreTrainedModel:
    config = build_config("mamba", "tiny", vocab_size=300, context_length=64, special_token_ids=IDS)
    return build_model(config, seed=seed)


def mambapy_twin(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a plain transformers Mamba, which scans with mambapy (the registry's use_mambapy)."""
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict())
    assert not any(isinstance(m, FastScanMambaMixer) for m in plain.modules())
    return plain


def test_a_mamba_built_by_seshu_trains_with_the_chunked_scan_and_matches_mambapy() -> None:
    fast = tiny_mamba()
    assert sum(isinstance(m, FastScanMambaMixer) for m in fast.modules()) == fast.config.num_hidden_layers
    plain = mambapy_twin(fast)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (fast, plain):
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], **TOLERANCE)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, **TOLERANCE, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_the_saved_model_is_a_plain_mamba_with_the_same_logits(tmp_path: Path) -> None:
    fast = tiny_mamba().eval()
    fast.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no Seshu: transformers' classes, mambapy
    assert type(loaded) is type(fast)
    assert not any(isinstance(m, FastScanMambaMixer) for m in loaded.modules())
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=ids, use_cache=False).logits, loaded(input_ids=ids, use_cache=False).logits, **TOLERANCE
        )


def test_generation_keeps_transformers_cached_step() -> None:
    fast = tiny_mamba().eval()
    plain = mambapy_twin(fast).eval()
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    calls = {"chunked": 0}
    chunked = FastScanMambaMixer._chunked_forward

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["chunked"] += 1
        return chunked(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FastScanMambaMixer, "_chunked_forward", counting)
        out = fast.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert calls["chunked"] == 0  # prefill and every token went through transformers' cached path
    assert torch.equal(out, plain.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0))


def test_scan_path_names_what_trains_each_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = tiny_mamba()
    assert scan_path(fast, "cpu") == fast_path.PATH_SESHU
    assert scan_path(mambapy_twin(fast), "cpu") == fast_path.PATH_MAMBAPY
    mamba2 = build_model(build_config("mamba2", "tiny", vocab_size=300, context_length=64, special_token_ids=IDS))
    assert scan_path(mamba2, "cpu") == fast_path.PATH_SSD
    llama = build_model(build_config("llama", "tiny", vocab_size=300, context_length=64, special_token_ids=IDS))
    assert scan_path(use_fast_scan(llama), "cpu") is None
    monkeypatch.setattr(fast_path, "kernels_installed", lambda: True)
    assert scan_path(fast, "cuda") == scan_path(mamba2, "cuda") == fast_path.PATH_KERNELS
    assert scan_path(fast, "cpu") == fast_path.PATH_SESHU  # the kernels are CUDA-only
