"""Log-probabilities of the labels over the ring: per token (this rank's shard) and per sequence or document (summed
over the ring), for preference and RL objectives (DPO and its relatives, GRPO-style per-token losses).

Labels are ``shift_labels`` from ``ds_ring.shard_batch``: the target of position i is ``labels[i + 1]``, shifted
BEFORE sharding (transformers' ``ForCausalLMLoss`` rule), ``ignore_index`` where there is no target (prompt, padding,
the last position). Two forms with one contract, as for the loss: from logits (B, L, V), or with ``lm_head=`` from the
final hidden states (B, L, h) chunk by chunk, never holding more than one chunk's logits (the chunked LM head of
``training/loss.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.groups import SequenceParallel
from .loss import call_as_forward, check_chunk_tokens, head_chunks, head_gradients, lm_head_chunk, ring_sum


def token_logprobs(
    x: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    lm_head: nn.Module | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token log-probability of each target, (B, L) fp32, for THIS RANK'S SHARD; 0 where the target is ignored.

    ``x``: logits (B, L, V), or with ``lm_head`` (a linear layer, weight (V, h)) the hidden states (B, L, h) that
    feed it. ``shift_labels`` (B, L) from ``ds_ring.shard_batch``. Differentiable; computed in fp32 (log-sum-exp of
    the fp32 logits, as ``causal_lm_loss`` does).

    For per-token objectives (GRPO-style: ratios, clipping, KL to a reference per token): the tokens of one sequence
    are spread over the ring's ranks, so anything that mixes tokens of a sequence (a sum, a mean over the completion,
    a count) must be summed over the ring (``sequence_logprobs`` for sums; ``ds_ring.causal_lm_loss`` shows the mean
    rule). A loss that is a sum over tokens of a per-token function needs no communication: each rank's loss is its
    share, and its parameter gradients are its share of the ring's gradient (summed over the ring by the trainer).

    The chunked form keeps (B, L, h) hidden states and recomputes each chunk's logits in backward (four LM-head
    matmuls instead of three: the incoming gradient is per token, so, unlike the loss, the gradients cannot be made
    in forward without one (V, h) weight gradient per token group).
    """
    if x.shape[:-1] != shift_labels.shape:
        raise ValueError(f"token_logprobs: x {tuple(x.shape)} must be (B, L, V or h) for shift_labels "
                         f"{tuple(shift_labels.shape)} (B, L)")
    labels = shift_labels.to(x.device)
    if lm_head is None:
        logits = x.float()
        valid = labels != ignore_index
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, picked - torch.logsumexp(logits, dim=-1), 0.0)
    check_chunk_tokens(chunk_tokens, "token_logprobs")
    flat = labels.reshape(-1)

    def head_logprobs(h: torch.Tensor) -> torch.Tensor:  # reads the weight when lm_head's hooks have gathered it
        chunk = lm_head_chunk(lm_head, chunk_tokens, "token_logprobs")
        return _ChunkedTokenLogprobs.apply(h, lm_head.weight, getattr(lm_head, "bias", None), flat, chunk,
                                           ignore_index)

    # as lm_head's forward: under ZeRO-3 DeepSpeed gathers its weight around it and around its backward
    return call_as_forward(lm_head, head_logprobs, x).view(labels.shape)


def sequence_logprobs(
    x: torch.Tensor,
    shift_labels: torch.Tensor,
    sp: SequenceParallel | None,
    *,
    lm_head: nn.Module | None = None,
    document_ids: torch.Tensor | None = None,
    num_documents: int | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Sum of the log-probabilities of each sequence's targets over the WHOLE (sharded) sequence, fp32.

    Returns (B,) per row, or with ``document_ids`` (B, L) (packed rows: ``shard_batch``'s global ids, numbered from 0
    along each row) (B, D) per document, D = ``num_documents`` (default: 1 + the largest id over the ring; the ids
    are checked over the ring in one small all-reduce and a host read). A document id that holds no target (the padding
    ``shard_batch`` adds is a document of its own) sums to 0. ``x``, ``lm_head``, ``shift_labels``, ``chunk_tokens`` as
    for ``token_logprobs``; ``sp=None``: one rank.

    Contract (that of ``causal_lm_loss``):
    - VALUE: the ring's sums, identical on every rank of the ring (one float64 all-reduce of B x D numbers);
    - GRADIENT: this rank's share, the gradient of its partial sums. A loss computed from the sums identically on
      every rank of the ring (DPO's, for one) then has parameter gradients that SUM over the ring to the one-process
      gradient; do not average them over the ring.
    """
    tok = token_logprobs(x, shift_labels, lm_head=lm_head, ignore_index=ignore_index, chunk_tokens=chunk_tokens)
    if document_ids is None:
        return ring_sum(tok.sum(1), sp)
    if document_ids.shape != shift_labels.shape:
        raise ValueError(f"sequence_logprobs: document_ids {tuple(document_ids.shape)} must match shift_labels "
                         f"{tuple(shift_labels.shape)}")
    ids = document_ids.to(tok.device).long()
    # the largest id and minus the smallest over the ring: every rank sees the same D and the same error
    bounds = torch.stack([ids.max(), -ids.min()]) if ids.numel() else ids.new_zeros(2)
    if sp is not None and sp.sp_size > 1:
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=sp.group)
    top, bottom = (int(v) for v in bounds.tolist())
    num_documents = top + 1 if num_documents is None else num_documents
    if -bottom < 0 or top >= num_documents:
        raise ValueError(f"sequence_logprobs: document_ids span [{-bottom}, {top}] over the ring; they must lie in "
                         f"[0, num_documents={num_documents})")
    local = tok.new_zeros(tok.shape[0], num_documents).scatter_add(1, ids, tok)
    return ring_sum(local, sp)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Per-token log-probabilities of ``x @ W.T + b`` (fp32), chunk by chunk; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk, ignore_index):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.zeros(x2.shape[0], dtype=torch.float32, device=x.device)
        for s, _, logits, lse, valid, target in head_chunks(x2, weight, bias, labels, chunk, ignore_index):
            out[s:s + len(valid)] = torch.where(valid, logits.gather(1, target).squeeze(1) - lse, 0.0)
        ctx.save_for_backward(x, weight, bias, labels)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, labels = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2 = x.reshape(-1, x.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if need_b and bias is not None else None
        g = g.float()
        for s, xc, logits, lse, valid, target in head_chunks(x2, weight, bias, labels, ctx.chunk, ctx.ignore_index):
            # d log p / d logits = onehot - softmax = -(d cross-entropy / d logits): scale each row by -g
            head_gradients(logits, lse, valid, target, -g[s:s + len(xc)], xc, weight,
                           dx[s:s + len(xc)] if need_x else None, dw, db)
        return (None if dx is None else dx.view(x.shape), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None)
