"""Sequence-parallel causal-LM loss: the mean over every valid token of the whole (sharded) sequence.

Two forms with one contract: ``causal_lm_loss`` on full logits, and ``chunked_causal_lm_loss``, which takes the
final hidden states and the LM head and never holds more than one chunk of the sequence's logits.

This module is also the one home of the chunked LM head (``head_chunks``, ``head_gradients``, ``lm_head_chunk``,
``call_as_forward``) and of the ring's value/gradient-share rule (``ring_sum``): ``training/logprobs.py`` builds the
sequence log-probabilities on the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..parallel.groups import SequenceParallel

IGNORE_INDEX = -100  # transformers' (and torch's cross_entropy's) "no target here" label


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The target of every position of FULL (unsharded) ``labels`` (..., S): ``labels[..., i + 1]``, and
    ``ignore_index`` at the last position. Exactly transformers' ``ForCausalLMLoss`` shift and nothing else (the
    user's labels decide what is ignored). The one home of the shift: ``shard_batch``, the chunked loss's one-rank
    path and the Trainer's target count use it."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


# Default chunk of the chunked loss: 2**24 logits (64 MiB in fp32) per chunk, i.e. 512 tokens for a 32k vocabulary,
# 128 for 128k. Small enough to stay well under the hidden states of a long shard, large enough for full-speed matmuls.
LOSS_CHUNK_ELEMENTS = 2**24


def causal_lm_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, sp: SequenceParallel | None, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy (computed in fp32) averaged over all valid tokens of the ring's whole sequence.

    ``logits`` (B, L, V) and ``shift_labels`` (B, L) are this rank's shard (``shift_labels`` from
    ``ds_ring.shard_batch``: already shifted, ``ignore_index`` where there is no target). ``sp=None``: one rank.

    Contract:
    - VALUE: the global mean ``sum of token losses over the ring / number of valid tokens over the ring``, identical
      on every rank of the ring (so logs agree).
    - GRADIENT: this rank's share only, ``d(local_sum / global_count)``. Summing the parameter gradients over the
      ring's ranks therefore gives exactly the one-process gradient of the mean loss. Do not average them over the
      ring (that would divide by sp_size).
    - Ranks with no valid token contribute zero gradient; if the whole ring has none, the loss is 0 (not NaN).
    The token count and loss sum are all-reduced over ``sp.group`` without autograd (one small all-reduce).
    """
    if logits.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"causal_lm_loss: logits {tuple(logits.shape)} must be (B, L, V) for shift_labels "
            f"{tuple(shift_labels.shape)} (B, L)"
        )
    labels = shift_labels.to(logits.device).reshape(-1)
    local_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=ignore_index, reduction="sum"
    )
    return _ring_mean(local_sum, labels, sp, ignore_index)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    shift_labels: torch.Tensor,
    sp: SequenceParallel | None,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """``causal_lm_loss(lm_head(hidden_states), shift_labels, sp)`` without ever holding the (B, L, V) logits.

    ``hidden_states`` (B, L, h): the LM head's input (after the final norm); ``lm_head``: a linear layer with
    ``weight`` (V, h) and optional ``bias`` (V); ``shift_labels`` (B, L) as for ``causal_lm_loss``, whose contract
    (value, gradient share, ignored targets, ranks without a valid target) this function keeps.

    The sequence is cut into chunks of ``chunk_tokens`` rows (default: ``LOSS_CHUNK_ELEMENTS // V``). Each chunk's
    logits, fp32 log-sum-exp and softmax gradient are computed and dropped inside forward, which keeps only dL/dx
    (B, L, h) and dL/dW (V, h, fp32); backward scales them by the incoming gradient. Memory: one chunk's logits
    instead of (B, L, V) logits, their fp32 copy and their gradient; compute: the same three LM-head matmuls.

    Under ZeRO-3 the head's weight is gathered once for all chunks: the loss runs as ``lm_head``'s own forward, so
    DeepSpeed's module hooks gather and release the partitioned weight around it (and around its backward) exactly as
    for ``lm_head(hidden_states)``.
    """
    if hidden_states.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"chunked_causal_lm_loss: hidden_states {tuple(hidden_states.shape)} must be (B, L, h) for shift_labels "
            f"{tuple(shift_labels.shape)} (B, L)"
        )
    check_chunk_tokens(chunk_tokens, "chunked_causal_lm_loss")
    labels = shift_labels.to(hidden_states.device).reshape(-1)

    def head_loss(x: torch.Tensor) -> torch.Tensor:  # reads the weight when lm_head's hooks have gathered it
        chunk = lm_head_chunk(lm_head, chunk_tokens, "chunked_causal_lm_loss")
        # grad mode is read here: inside Function.forward it is always off, and needs_input_grad ignores it
        return _ChunkedLMHeadLoss.apply(x, lm_head.weight, getattr(lm_head, "bias", None), labels, chunk,
                                        ignore_index, torch.is_grad_enabled())

    local_sum = call_as_forward(lm_head, head_loss, hidden_states)
    return _ring_mean(local_sum, labels, sp, ignore_index)


def check_chunk_tokens(chunk_tokens: int | None, who: str) -> None:
    """Refuse a ``chunk_tokens`` that is not a positive int or None (before anything is gathered or sent)."""
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"{who}: chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def lm_head_chunk(lm_head: nn.Module, chunk_tokens: int | None, who: str) -> int:
    """Rows per chunk of the chunked LM head: ``chunk_tokens``, default ``LOSS_CHUNK_ELEMENTS // V``. Checks that
    ``lm_head`` is a linear layer with a (V, h) weight.

    Call it only inside the function ``call_as_forward`` runs as the head's forward. Under ZeRO-3, reading
    ``lm_head.weight`` anywhere else in the engine's forward makes DeepSpeed register the weight as an external
    parameter of the module then running (the model's root), so from the next step on the whole (V, h) weight is
    gathered when the model's forward starts and held until its backward ends (measured: 125 MiB more per rank
    over the whole step at V = 32,000, h = 1,024, fp32; benchmarks/bench_timeline.py).
    """
    check_chunk_tokens(chunk_tokens, who)
    weight = getattr(lm_head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{who}: lm_head must be a linear layer with a (V, h) weight, got {type(lm_head).__name__}")
    return chunk_tokens or max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])


def call_as_forward(module: nn.Module, fn: Callable, *args):
    """``fn(*args)`` run through ``module.__call__`` as if it were ``module.forward``.

    The module's hooks fire around it: under ZeRO-3, DeepSpeed gathers the module's partitioned parameters before
    ``fn`` and releases them after, and registers the same around the backward of ``fn``'s outputs.
    """
    previous = module.__dict__.get("forward")  # an instance-level forward (another patch) is put back afterwards
    module.forward = fn
    try:
        return module(*args)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _ring_mean(local_sum: torch.Tensor, labels: torch.Tensor, sp: SequenceParallel | None,
               ignore_index: int) -> torch.Tensor:
    """The global mean with this rank's gradient share (the contract of ``causal_lm_loss``)."""
    return ring_mean_and_sums(local_sum, labels, sp, ignore_index)[0]


def ring_mean_and_sums(local_sum: torch.Tensor, labels: torch.Tensor, sp: SequenceParallel | None,
                       ignore_index: int = IGNORE_INDEX, extra: tuple[torch.Tensor, ...] = ()
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``causal_lm_loss``'s reduction of a rank's summed token losses ``local_sum`` (fp32 scalar) over targets
    ``labels`` (this shard's shift_labels): (the loss, the ring's target count, the ring's sums of ``extra``).

    ``extra``: scalars to be summed over the ring in the same all-reduce (a trainer's logged metrics: entropy,
    correct tokens), returned as one float64 vector without gradient. One small all-reduce in all."""
    # float64 keeps the token count exact and the sum stable across many ranks.
    stats = torch.stack([local_sum.detach().double(), (labels != ignore_index).sum().double(),
                         *(t.detach().double() for t in extra)])
    if sp is not None and sp.sp_size > 1:
        dist.all_reduce(stats, group=sp.group)
    global_sum, count = stats[0], stats[1].clamp(min=1)
    return _share(local_sum / count.float(), (global_sum / count).float()), stats[1], stats[2:]


def ring_sum(local: torch.Tensor, sp: SequenceParallel | None) -> torch.Tensor:
    """``local`` (any shape, this rank's partial sums) summed over the ring, with this rank's gradient share.

    VALUE: the sum over the ring's ranks (float64 all-reduce, returned in ``local``'s dtype), the same on every rank.
    GRADIENT: that of ``local`` alone, so the parameter gradients of a loss computed from the value identically on
    every rank sum over the ring to the one-process gradient (``causal_lm_loss``'s contract). One all-reduce over
    ``sp.group``, outside autograd."""
    if sp is None or sp.sp_size == 1:
        return local
    total = local.detach().double()
    dist.all_reduce(total, group=sp.group)
    return _share(local, total.to(local.dtype))


def _share(local: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in forward, ``local``'s gradient in backward: a ring rank's share of a global quantity."""
    return local + (value - local).detach()


def head_chunks(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk: int,
                ignore_index: int) -> Iterator[tuple]:
    """The LM head, ``chunk`` rows at a time: per chunk ``(start, x rows, fp32 logits, log-sum-exp, valid, target)``.

    ``x2`` (N, h), ``labels`` (N,). The logits are computed in the model's dtype and then made fp32 (as
    ``causal_lm_loss`` does with full logits); ``target`` (n, 1) has ignored labels clamped to 0 (use ``valid``)."""
    for s in range(0, x2.shape[0], chunk):
        xc, yc = x2[s:s + chunk], labels[s:s + chunk]
        logits = F.linear(xc, weight, bias).float()
        yield s, xc, logits, torch.logsumexp(logits, dim=-1), yc != ignore_index, yc.clamp(min=0).unsqueeze(1)


def head_gradients(logits: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
                   row_scale: torch.Tensor | None, xc: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor | None,
                   dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """Add one chunk's gradients of ``sum_t row_scale[t] * cross_entropy_t`` to ``dx`` (this chunk's rows, written),
    ``dw`` (V, h fp32) and ``db`` (V fp32); ``row_scale`` None is 1. Overwrites ``logits`` (the softmax in place)."""
    grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
    grad.scatter_add_(1, target, -valid.to(grad.dtype).unsqueeze(1))  # minus the one-hot target
    scale = valid.to(grad.dtype) if row_scale is None else torch.where(valid, row_scale, 0.0)
    grad.mul_(scale.unsqueeze(1))  # ignored targets have no gradient
    g = grad.to(xc.dtype)
    if dx is not None:
        torch.mm(g, weight, out=dx)
    if dw is not None:
        if g.dtype == torch.float32:
            dw.addmm_(g.t(), xc)
        else:  # a half-precision product per chunk, summed in fp32
            dw += torch.mm(g.t(), xc)
    if db is not None:
        db += grad.sum(0)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Sum of token cross-entropies of ``x @ W.T + b`` (fp32), chunk by chunk; gradients made in forward.

    Why not DeepSpeed's ``TiledFusedLogitsLoss``: it also makes gradients in forward, but pushes the weight's
    gradient into ``.grad`` there with an incoming gradient of 1 and scales only dL/dx by the real incoming gradient
    in backward. Every factor applied after it (the mean over valid tokens, ds_ring's ZeRO-3 factor sp_size,
    DeepSpeed's 1/gradient_accumulation_steps, an fp16 loss scale) then misses the LM head's weight (measured: with
    the sum-then-divide recipe of ArcticTraining the weight's gradient is n_valid times too large). Here dL/dW is
    returned from backward like any other gradient, scaled by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk, ignore_index, grad_enabled):
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])  # evaluation: the loss only
        dx = torch.empty_like(x2) if need_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s, xc, logits, lse, valid, target in head_chunks(x2, weight, bias, labels, chunk, ignore_index):
            total += torch.where(valid, lse - logits.gather(1, target).squeeze(1), 0.0).sum()
            if need_x or need_w or need_b:
                head_gradients(logits, lse, valid, target, None, xc, weight,
                               dx[s:s + len(xc)] if need_x else None, dw, db)
        ctx.grads = (dx, dw, db)
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("chunked_causal_lm_loss: backward ran twice through the same loss; its gradients are "
                               "made once in forward (retain_graph is not supported)")
        dx, dw, db = ctx.grads
        ctx.grads = None
        if dx is not None:
            dx = dx.mul_(g).view(ctx.x_shape)
        if dw is not None:
            dw = dw.mul_(g).to(ctx.w_dtype)
        if db is not None:
            db = db.mul_(g).to(ctx.b_dtype)
        return dx, dw, db, None, None, None, None
