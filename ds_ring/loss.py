"""Sequence-parallel causal-LM loss: the mean over every valid token of the whole (sharded) sequence."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .groups import SequenceParallel


def causal_lm_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, sp: SequenceParallel, *, ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy (computed in fp32) averaged over all valid tokens of the ring's whole sequence.

    ``logits`` (B, L, V) and ``shift_labels`` (B, L) are this rank's shard (``shift_labels`` from
    ``ds_ring.shard_batch``: already shifted, ``ignore_index`` where there is no target).

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
    # float64 keeps the token count exact and the sum stable across many ranks.
    stats = torch.stack([local_sum.detach().double(), (labels != ignore_index).sum().double()])
    if sp.sp_size > 1:
        dist.all_reduce(stats, group=sp.group)
    global_sum, count = stats[0], stats[1].clamp(min=1)
    local_part = local_sum / count.float()
    return local_part + ((global_sum / count).float() - local_part).detach()
