"""torch FSDP2 (``fully_shard``) with sequence parallelism: ``ds_ring.fully_shard`` and the gradient rule for any
FSDP2 model (``apply_gradient_rule``, also what the Trainer applies under accelerate's FSDP2).

FSDP2 averages gradients over its mesh: the reduce-scatter divides the sum by the number of ranks. A ring's ranks
each hold a SHARE of one gradient (``ds_ring.causal_lm_loss``), so the average divides each ring's gradient by
``sp_size`` (measured: SGD parameters 59 % off one process at SP=2). ``apply_gradient_rule`` sets the rule's divisor
(``ds_ring.parallel.gradients.gradient_divisor``: the number of rings) as every FSDP unit's gradient divide factor.

Why also ``set_force_sum_reduction_for_comms(True)``: with a custom divide factor FSDP2 (torch 2.13,
``_fsdp_collectives._get_gradient_divide_factors``) reduce-scatters with ``ReduceOp.PREMUL_SUM(1 / factor)``, which
gloo does not have (CPU training fails in the first backward). Forced sum reductions make it reduce-scatter (and, on
a 2-D HSDP mesh, all-reduce) with ``ReduceOp.SUM`` and divide by the factor afterwards (fp32/bf16; fp16 splits the
division before and after the sum against overflow): the same result on gloo and NCCL, one extra elementwise
division per reduced shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.gradients import gradient_divisor
from ..parallel.groups import SequenceParallel, _world_device
from ..training.model_state import state_of
from .transformers import RingSettings, unsplit_layers

__all__ = ["apply_gradient_rule", "decoder_layers", "fully_shard"]


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import fully_shard as torch_fully_shard
    except ImportError as e:  # torch < 2.6 has it only under torch.distributed._composable
        raise ImportError(f"ds_ring.fully_shard needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from e
    return FSDPModule, torch_fully_shard


def apply_gradient_rule(model: nn.Module, sp: SequenceParallel) -> int:
    """Give every FSDP2 unit in ``model`` (``model`` itself included) ds_ring's gradient rule: the sum of the ranks'
    gradients divided by the number of rings, with sum reductions (see the module doc). Returns the number of units;
    raises if there is none (the model is not FSDP2) or if this torch lacks the two FSDP2 settings it needs."""
    FSDPModule, _ = _fsdp()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError(f"apply_gradient_rule: {type(model).__name__} has no FSDP2 (fully_shard) module")
    missing = [a for a in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms")
               if not hasattr(units[0], a)]
    if missing:
        raise RuntimeError(f"FSDP2 in torch {torch.__version__} lacks {missing}: ds_ring's gradient rule under FSDP2 "
                           "needs torch >= 2.8")
    divisor = float(gradient_divisor(sp))
    for m in units:
        m.set_gradient_divide_factor(divisor)
        m.set_force_sum_reduction_for_comms(True)
    return len(units)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (``integrations.transformers.unsplit_layers``): the units ``fully_shard`` shards one by
    one; raises when the model names none."""
    layers = unsplit_layers(model)
    if not layers:
        raise ValueError(f"ds_ring.fully_shard: {type(model).__name__} names no decoder layer class in "
                         "_no_split_modules; wrap its layers with torch's fully_shard yourself and call "
                         "ds_ring.integrations.fsdp2.apply_gradient_rule(model, sp)")
    return layers


def fully_shard(model: nn.Module, sp: SequenceParallel, **fully_shard_kwargs: Any) -> nn.Module:
    """torch's ``fully_shard`` on each decoder layer and then on ``model`` (the root: embeddings, final norm, LM head)
    over every rank (the data-parallel x ring ranks), with ds_ring's gradient rule. Returns ``model`` (now an
    ``FSDPModule``; its parameters are DTensor shards).

    ``model`` must be patched for ``sp`` (``ds_ring.patch(model, sp=sp)``) and, if wanted, switched with
    ``ds_ring.optimize_memory`` first. ``fully_shard_kwargs`` go to every ``fully_shard`` call: ``mp_policy``
    (``MixedPrecisionPolicy``), ``offload_policy`` (``CPUOffloadPolicy``), ``reshard_after_forward``, and ``mesh``
    (default: a 1-D mesh over the default group; a 2-D HSDP mesh works too, it must span every rank). Train with
    ``ds_ring.shard_batch`` and ``ds_ring.causal_lm_loss`` as under DDP; gradient clipping on DTensor gradients
    (``torch.nn.utils.clip_grad_norm_``) sees the true norm.
    """
    if not dist.is_initialized():
        raise RuntimeError("ds_ring.fully_shard: torch.distributed is not initialised (FSDP2 needs a process group): "
                           "launch with torchrun / accelerate launch and call ds_ring.init_sequence_parallel first")
    settings = getattr(state_of(model), "settings", None)  # what ds_ring.patch recorded on the model
    if not isinstance(settings, RingSettings) or settings.group is not sp.ring_group or settings.local:
        # unpatched, each rank would run the whole sequence and the rule (sum over the ring) would count it sp times
        raise ValueError("ds_ring.fully_shard: the model is not patched for this sp: call ds_ring.patch(model, sp=sp) "
                         "before ds_ring.fully_shard (and ds_ring.optimize_memory, if used, between the two)")
    FSDPModule, torch_fully_shard = _fsdp()
    if isinstance(model, FSDPModule):  # a state of the model, not a wrong type of argument
        raise ValueError(  # noqa: TRY004
            "ds_ring.fully_shard: the model is already an FSDP2 module; to add ds_ring's gradient rule to a model you "
            "sharded yourself, call ds_ring.integrations.fsdp2.apply_gradient_rule(model, sp)")
    mesh = fully_shard_kwargs.pop("mesh", None)
    if mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        # the default group itself: no new process group, so ranks' group counts (init_sequence_parallel's check)
        # stay equal
        mesh = DeviceMesh.from_group(dist.group.WORLD, _world_device().type)
    elif mesh.size() != sp.world_size:
        raise ValueError(f"ds_ring.fully_shard: mesh has {mesh.size()} ranks but the world has {sp.world_size}: the "
                         "gradient rule needs every rank of every ring in the mesh (pass no mesh for the default)")
    for layer in decoder_layers(model):
        torch_fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    torch_fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    apply_gradient_rule(model, sp)
    return model
