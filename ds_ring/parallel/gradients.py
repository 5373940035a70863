"""The gradient rule of sequence parallelism, the one home every engine (DDP, DeepSpeed ZeRO, FSDP2) takes it from.

A ring's ranks each run a shard of the same sequences, and ``ds_ring.causal_lm_loss`` gives each its SHARE of the
ring's gradient: the shares SUM to the gradient one process would get on the whole sequences. The rings are the
data-parallel ranks: their gradients are AVERAGED. Over the whole world that is

    reduced gradient = (sum of every rank's gradient) / number of rings  (sp.dp_size)

Engines reduce with their own divisor (DDP and FSDP2: the number of ranks; ZeRO-3: every rank; ZeRO-1/2 given
ds_ring's mpu: the rings), so each applies the rule in the way it allows:

- an engine that lets us choose the divisor uses :func:`gradient_divisor` (FSDP2's gradient divide factor with sum
  reductions, :func:`ddp_comm_hook`);
- an engine that averages over ``n`` ranks with no say in it gets the loss multiplied by :func:`loss_factor`
  (``n / dp_size``) before its backward (DeepSpeed ZeRO-3: ``sp_size``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import SequenceParallel

__all__ = ["ddp_comm_hook", "gradient_divisor", "loss_factor"]


def gradient_divisor(sp: SequenceParallel) -> int:
    """What the SUM of every rank's gradient is divided by: the number of rings (data-parallel ranks)."""
    return sp.dp_size


def loss_factor(sp: SequenceParallel, averaged_over: int) -> float:
    """Loss multiplier for an engine that divides the sum of the gradients by ``averaged_over`` ranks: with it the
    engine's result is the rule's (sum / :func:`gradient_divisor`)."""
    if averaged_over < 1 or averaged_over > sp.world_size:
        raise ValueError(f"averaged_over={averaged_over} must be between 1 and the world size {sp.world_size}")
    return averaged_over / gradient_divisor(sp)


def ddp_comm_hook(divisor, bucket):
    """DDP communication hook: ``model.register_comm_hook(gradient_divisor(sp), ddp_comm_hook)``. ``divisor`` (int)
    is the hook state, ``bucket`` a ``dist.GradBucket``; returns a ``Future[Tensor]``. No annotations: DDP checks
    them, and this module's are strings. One all-reduce (SUM) over every rank of the bucket divided by ``divisor``
    first (DDP's own hook divides by the number of ranks)."""
    buf: torch.Tensor = bucket.buffer().div_(divisor)
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])
