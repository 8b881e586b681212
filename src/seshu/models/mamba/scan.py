"""Mamba-1's selective scan for training on a CPU: exact, chunked, with a hand-written backward pass.

The recurrence, per batch row b, channel d and state n (A is [d_inner, d_state], a decay per channel *and* state):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        y_t = sum_n C_t * h_t (+ D * u_t, gated by z)

Why not Mamba-2's SSD form: SSD turns a chunk into matmuls because its decay is one scalar per head, so the decay
between positions s and t is a [T, T] matrix. Here it differs per (channel, state), so the same matrix is
[T, T, d_inner, d_state], T times the state itself; on a CPU, which is bound by memory traffic, that loses to
the plain recurrence, which touches each state once. What is worth doing on a CPU is what this module does:

- time runs in chunks of `chunk_size` steps; each chunk's decays, inputs and states are made, scanned and read
  out while they are in cache, and only the state at each chunk's end is kept (the carry into the next chunk);
- the scan inside a chunk is one in-place multiply-add per step over all (b, d, n) at once, the read-out
  through C one batched matmul per chunk;
- autograd would keep every intermediate of every step, so the backward pass is written out: per chunk, last to
  first, it recomputes the chunk's states from the carried-in state (as mamba-ssm's kernel recomputes them),
  runs the adjoint recurrence backwards, and gets the gradients of u, delta, A, B and C from matmuls.

mambapy's parallel scan instead materialises several [b, L, d, n] tensors per layer and makes 2 log2(L) strided
passes over them, forward and backward; bench/pretrain_throughput.py measures the two side by side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

# Steps per chunk. The chunk's [T, batch, d_inner, d_state] float32 working tensors should stay in cache (2 MiB
# each at T=16, the small preset and batch 8). Scan forward + backward at that size, one thread on a 2-core EPYC,
# against mambapy's 1.8-3.0 s: T=8 0.32-0.48 s, T=16 0.27-0.34 s, T=32 0.31-0.41 s, T=64 0.56 s.
CHUNK_SIZE = 16


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Mamba-1's selective scan with the arguments and layouts of mamba-ssm's `selective_scan_fn` (and
    transformers' `mamba_selective_scan`): u, delta [batch, d_inner, L]; A [d_inner, d_state]; B, C
    [batch, d_state, L]; D, delta_bias [d_inner]; z [batch, d_inner, L]. Returns y [batch, d_inner, L] in u's
    dtype; the scan itself runs in float32."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y = _scan(u.float(), delta, A.float(), B.float(), C.float(), chunk_size)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(u.dtype)


@torch.compiler.disable  # a graph would unroll every step of the loops below
def _scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    # Time-major, so that one step (or one chunk) is a contiguous slice.
    y: torch.Tensor = _ChunkedScan.apply(
        u.permute(2, 0, 1).contiguous(),
        delta.permute(2, 0, 1).contiguous(),
        A,
        B.permute(2, 0, 1).contiguous(),
        C.permute(2, 0, 1).contiguous(),
        chunk_size,
    )
    return y.permute(1, 2, 0)


def _chunk_states(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's decays exp(delta A) and states h_1..h_T [T, b, d, n], from the state h carried in."""
    decay = torch.exp(delta[..., None] * A)
    states = (delta * u)[..., None] * B[:, :, None, :]  # the input term, scanned in place below
    with _one_thread():
        states[0].addcmul_(decay[0], h)
        for t in range(1, len(states)):
            states[t].addcmul_(decay[t], states[t - 1])
    return decay, states


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the step-by-step loops on this thread alone. One step is too little work to share: the threads meet at
    a barrier after every step, and on a busy machine one that is descheduled stalls the other. Scan forward +
    backward at the small preset, 2 threads against 1 on a loaded 2-core EPYC: 1.35 s against 0.30 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _ChunkedScan(torch.autograd.Function):
    """y = scan(u, delta, A, B) read out through C; all sequences time-major: u, delta [L, b, d]; B, C [L, b, n]."""

    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        length, batch, d_inner = u.shape
        starts = list(range(0, length, chunk_size))
        # carries[i]: the state entering chunk i (zero before the first), all the backward pass keeps.
        carries = u.new_zeros(len(starts), batch, d_inner, A.shape[1])
        y = u.new_empty(length, batch, d_inner)
        h = carries[0]
        for i, s in enumerate(starts):
            e = s + chunk_size
            _, states = _chunk_states(u[s:e], delta[s:e], A, B[s:e], h)
            torch.matmul(states, C[s:e, :, :, None], out=y[s:e, :, :, None])
            h = states[-1]
            if i + 1 < len(starts):
                carries[i + 1] = h
        ctx.save_for_backward(u, delta, A, B, C, carries)
        ctx.chunk_size = chunk_size
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, carries = ctx.saved_tensors
        chunk_size: int = ctx.chunk_size
        grad_y = grad_y.contiguous()
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        # dL/dh_t flowing back into chunk i from chunk i+1: exp(delta_{t+1} A) * dL/dh_{t+1} at its first step.
        carry = torch.zeros_like(carries[0])
        for i in reversed(range(len(carries))):
            s = i * chunk_size
            e = s + chunk_size
            u_c, delta_c, B_c, gy = u[s:e], delta[s:e], B[s:e], grad_y[s:e]
            decay, states = _chunk_states(u_c, delta_c, A, B_c, carries[i])
            # grad_h: the adjoint state dL/dh_t, first its direct part C_t * dy_t, then the reverse recurrence.
            grad_h = gy[..., None] * C[s:e, :, None, :]
            grad_h[-1] += carry
            with _one_thread():
                for t in range(len(grad_h) - 2, -1, -1):
                    grad_h[t].addcmul_(decay[t + 1], grad_h[t + 1])
            carry = decay[0] * grad_h[0]
            torch.matmul(gy[:, :, None, :], states, out=grad_C[s:e, :, None, :])
            # Through the input term delta * u * B.
            grad_input = torch.matmul(grad_h, B_c[..., None])[..., 0]
            torch.matmul((delta_c * u_c)[:, :, None, :], grad_h, out=grad_B[s:e, :, None, :])
            torch.mul(grad_input, delta_c, out=grad_u[s:e])
            # Through the decay exp(delta A): dL/d(delta A) = dL/dh_t * h_{t-1} * exp(delta_t A), in place.
            grad_log = grad_h.mul_(decay)
            grad_log[1:] *= states[:-1]
            grad_log[0] *= carries[i]
            # A sum over n batched over the channel d: a bmm on a strided view, where einsum would first copy
            # grad_log into a permuted tensor. Then grad_log turns into dL/dA's terms in place.
            by_channel = grad_log.flatten(0, 1).transpose(0, 1)  # [d, T * b, n]
            grad_delta_A = torch.bmm(by_channel, A[:, :, None])[..., 0].T.view_as(grad_input)
            torch.addcmul(grad_delta_A, grad_input, u_c, out=grad_delta[s:e])
            grad_A += grad_log.mul_(delta_c[..., None]).sum((0, 1))
        return grad_u, grad_delta, grad_A, grad_B, grad_C, None
