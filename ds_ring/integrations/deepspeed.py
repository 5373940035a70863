"""DeepSpeed ZeRO with sequence parallelism: config loading/validation and an ``initialize`` that makes gradients exact.

How DeepSpeed 0.19 reduces gradients when given ds_ring's mpu (measured, see tests/test_deepspeed_exactness.py):
ZeRO-0/1/2 sum over the ranks of a ring and average over the data-parallel rings, which is ds_ring's gradient rule
(``ds_ring.parallel.gradients``); ZeRO-3 (reduce-scatter path) averages over all sp_size x dp_size ranks, so it needs
the rule's loss factor (sp_size) before ``engine.backward``. ``initialize`` applies it inside ``engine.backward``;
the loss value you log is untouched.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..parallel.gradients import loss_factor
from ..parallel.groups import SequenceParallel, new_group
from ..parallel.lifecycle import on_teardown, release_captured_default_group
from ..training.model_state import state_of
from .transformers import unsplit_layers

__all__ = ["ConfigError", "DeepSpeedMPU", "load_config", "check_config", "check_sequence_length", "gradient_factor",
           "initialize", "release_gathered_parameters"]


class DeepSpeedMPU:
    """ds_ring's groups in DeepSpeed's ``mpu`` protocol, the one of its own sequence parallelism (deepspeed 0.19:
    runtime/sequence_parallel/parallel_state_sp.py, utils/groups.py, runtime/engine.py, runtime/zero/*).

    ZeRO partitions parameters and reduces gradients over the sequence-data-parallel group (every rank of every
    ring). Measured on deepspeed 0.19.8, two things must hold:

    - no ``get_data_parallel_group``: ZeRO-3 partitions parameters over it when present, so with it the ring ranks
      kept unreduced per-rank gradients (DeepSpeed's own mpu lacks it for this reason); the batch size then counts
      world_size / sp_size data-parallel ranks, as it should.
    - the model-parallel group is this rank alone, not the ring: parameters are replicated over the ring, and with
      the ring as model-parallel group ZeRO-1/2 counted gradient-norm terms only on ring rank 0 (a wrong norm, so
      wrong clipping) and each ring rank looked for its own ``mp_rank_XX`` checkpoint file.
    """

    def __init__(self, sp: SequenceParallel):
        """Collective (every rank, in the same order): makes this rank's single-rank model-parallel group."""
        self.sp = sp
        self._self_group = new_group([[r] for r in range(dist.get_world_size())])

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        """Marker DeepSpeed looks for (``hasattr``) to treat this as a sequence-parallel mpu; groups already exist."""
        raise RuntimeError("the groups are created by ds_ring.init_sequence_parallel; do not call this")

    def get_sequence_parallel_group(self):
        return self.sp.group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp.sp_rank

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.sp.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


@on_teardown
def release_references() -> None:
    """Drop what DeepSpeed (0.19.8) keeps for the life of the process after ``engine.destroy()``; called by
    ``ds_ring.teardown`` so that the model, and the process groups its parameters hold, can be freed:

    - ``deepspeed.utils.groups.mpu``, the mpu given to ``initialize`` (when it is ours: it holds the groups);
    - ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``: ZeRO-3 pushes the top module at set-up and
      never pops it;
    - the ``functools.lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release``, which keeps every
      coordinator it was called with (and through it the parameters).

    Modules that are not imported are left alone.
    """
    ds_groups = sys.modules.get("deepspeed.utils.groups")
    if isinstance(getattr(ds_groups, "mpu", None), DeepSpeedMPU):
        ds_groups.mpu = None
    stack = getattr(sys.modules.get("deepspeed.runtime.zero.parameter_offload"), "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()
    coordinator = getattr(sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator"),
                          "PartitionedParameterCoordinator", None)
    fn = vars(coordinator).get("_PartitionedParameterCoordinator__params_to_release") if coordinator else None
    for f in (fn, *(c.cell_contents for c in getattr(fn, "__closure__", None) or ())):  # lru_cache under a wrapper
        if hasattr(f, "cache_clear"):
            f.cache_clear()


class ConfigError(ValueError):
    """A DeepSpeed/ds_ring configuration that cannot train correctly; the message names the key and the fix."""


def _walk_auto(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_auto(v, f"{prefix}.{k}" if prefix else k)
    elif node == "auto":
        yield prefix


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        config = config[p]
    config[last] = value


def load_config(config: str | os.PathLike | dict, fill: dict[str, Any] | None = None) -> dict:
    """Read a DeepSpeed config (path or dict, copied) and replace its ``"auto"`` values from ``fill``.

    ``fill`` maps dotted keys (``"train_micro_batch_size_per_gpu"``, ``"bf16.enabled"``) to values; keys of ``fill``
    that the config does not mark ``"auto"`` are ignored (the file wins). Remaining ``"auto"`` values are an error.
    """
    if isinstance(config, dict):
        config = json.loads(json.dumps(config))
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist: pass a path to a JSON file, e.g. "
                              "ds_config/zero3.json")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e}") from None
    fill = fill or {}
    left = []
    for key in list(_walk_auto(config)):
        if key in fill:
            _set(config, key, fill[key])
        else:
            left.append(key)
    if left:
        raise ConfigError(f"DeepSpeed config has unfilled \"auto\" values for {left}: give them values in the config "
                          f"(only {sorted(fill) or 'nothing'} is filled in by this script)")
    return config


def check_config(config: dict, sp: SequenceParallel) -> None:
    """Raise ``ConfigError`` for configs that would not train, or not train exactly, under sequence parallelism."""
    left = list(_walk_auto(config))
    if left:
        raise ConfigError(f"DeepSpeed config has unfilled \"auto\" values for {left}: use ds_ring.load_config(path, "
                          "fill={...}) or write the values into the config")
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ConfigError("DeepSpeed config is missing zero_optimization.stage: add "
                          '"zero_optimization": {"stage": 1|2|3} (see ds_config/zero*.json)')
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero['stage']!r}")
    if not any(k in config for k in ("train_micro_batch_size_per_gpu", "train_batch_size")):
        raise ConfigError("DeepSpeed config needs train_micro_batch_size_per_gpu (or train_batch_size): add "
                          '"train_micro_batch_size_per_gpu": 1')
    # ZeRO-3 without reduce-scatter reduces small buckets by a SUM over the ring and large ones by an average, so no
    # single loss factor makes both exact.
    if zero["stage"] == 3 and sp.sp_size > 1 and not zero.get("reduce_scatter", True):
        raise ConfigError("zero_optimization.reduce_scatter=false with ZeRO-3 and sp_size > 1 mixes two gradient "
                          "scalings inside DeepSpeed: remove the key or set it to true")
    if config.get("sequence_parallel_size", sp.sp_size) != sp.sp_size:
        raise ConfigError(f"sequence_parallel_size={config['sequence_parallel_size']} in the DeepSpeed config "
                          f"disagrees with sp_size={sp.sp_size}: remove the key (ds_ring passes its groups as mpu)")


def check_sequence_length(seq_len: int, sp: SequenceParallel, *, pad: bool) -> int:
    """The length every sequence is brought to: ``seq_len`` rounded up to what the layout can shard.

    With ``pad=False`` a length that does not shard is a ``ConfigError``.
    """
    lay = sp.sequence_layout
    err = lay.seq_len_error(seq_len, sp.sp_size)
    if err and not pad:
        raise ConfigError(f"{err}; padding is off: use a length divisible by {lay.divisor(sp.sp_size)} or enable "
                          "padding")
    return lay.padded_length(seq_len, sp.sp_size)


def gradient_factor(config: dict, sp: SequenceParallel) -> float:
    """Loss multiplier making DeepSpeed's reduced gradient exact with ``ds_ring.causal_lm_loss`` (see module doc):
    the gradient rule's factor for the ranks each stage averages over."""
    averaged_over = sp.world_size if config["zero_optimization"]["stage"] == 3 else sp.dp_size
    return loss_factor(sp, averaged_over)


# What the memory switch sets in a ZeRO-3 config: release every gathered parameter once its module's next use is more
# than two decoder layers' parameters away in the step's module trace, and fetch none ahead. Why: with a stable module
# trace (ds_ring's step calls the same modules in the same order every step) ZeRO-3 keeps a parameter gathered while
# its next use is within stage3_max_reuse_distance (default 10^9 elements: for most models, the whole step) and
# prefetches stage3_prefetch_bucket_size elements ahead. Measured (benchmarks/bench_timeline.py, P=2, 16k tokens):
# that kept 210 MiB per rank of gathered parameters through the step peak that DeepSpeed ALST does not hold (its trace
# is invalidated every step, so DeepSpeed releases after each use). Why two layers and not 0: under checkpointing a
# layer's recompute is followed at once by its backward, which walks the same modules in reverse, so a module's next
# use lies at most two layers' parameters ahead; a distance of 0 gathered every layer three times per step (forward,
# recompute, backward) and the LM head once per loss chunk (1.21x the step time at 4k on the loaded 2-core box), two
# layers gather a layer twice and the head once per pass, and hold at most the layer at work, as the release does
# (the release's cost then below the noise; docs/performance.md section 11). A layer's forward and its backward (and
# the embedding's, and between steps) are the whole model apart: released, as before.
def release_after_use(model: torch.nn.Module | None = None) -> dict[str, int]:
    """The ZeRO-3 settings of the memory switch for ``model``: ``stage3_max_reuse_distance`` = twice the parameter
    elements of its largest decoder layer (``integrations.transformers.unsplit_layers``; 0 when ``model`` names none
    or is None), ``stage3_prefetch_bucket_size`` = 0."""
    layers = unsplit_layers(model) if model is not None else []
    # ds_numel: a parameter already partitioned by zero.Init holds an empty tensor and its full size there
    largest = max((sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for m in layers), default=0)
    return {"stage3_max_reuse_distance": 2 * largest, "stage3_prefetch_bucket_size": 0}


def release_gathered_parameters(config: dict, model: torch.nn.Module | None = None) -> dict[str, tuple[Any, int]]:
    """Set :func:`release_after_use` of ``model`` in a ZeRO-3 ``config`` (in place); return ``{key: (old value, new
    value)}`` for the keys it changed (nothing for ZeRO-0/1/2, which do not partition parameters)."""
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return {}
    changed = {}
    for key, value in release_after_use(model).items():
        if zero.get(key) != value:
            changed[key] = (zero.get(key, "DeepSpeed's default"), value)
            zero[key] = value
    return changed


def initialize(
    model: torch.nn.Module,
    sp: SequenceParallel,
    config: str | os.PathLike | dict,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    model_parameters=None,
    lr_scheduler=None,
    fill: dict[str, Any] | None = None,
    release_parameters: bool | None = None,
    **kwargs,
):
    """``deepspeed.initialize`` with ds_ring's groups as ``mpu`` and exact gradients for every ZeRO stage.

    Returns DeepSpeed's tuple ``(engine, optimizer, dataloader, lr_scheduler)``. ``engine.backward(loss)`` multiplies
    ``loss`` by :func:`gradient_factor` before DeepSpeed's backward; pass the loss from ``ds_ring.causal_lm_loss``.
    Use ``ds_ring.sp_dataloader`` for data (every rank of a ring must see the same samples).
    ``release_parameters``: under ZeRO-3, release a gathered parameter unless its module is used again within two
    decoder layers, and prefetch none (:func:`release_after_use`, said on rank 0 when it changes the config); None:
    when the model has ``ds_ring.optimize_memory``'s switch on.
    """
    import deepspeed

    config = load_config(config, fill)
    check_config(config, sp)
    if release_parameters is None:
        release_parameters = getattr(state_of(model), "memory", None) is not None  # optimize_memory's switch is on
    if release_parameters:
        changed = release_gathered_parameters(config, model)
        if changed and (not dist.is_initialized() or dist.get_rank() == 0):
            print("ds_ring memory switch: ZeRO-3 releases a gathered parameter unless it is used again within two "
                  "decoder layers ("
                  + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                  + "; pass release_parameters=False to keep them)", file=sys.stderr, flush=True)
    engine, opt, loader, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model_parameters, lr_scheduler=lr_scheduler,
        config=config, mpu=DeepSpeedMPU(sp) if sp.sp_size > 1 or sp.dp_size > 1 else None, **kwargs,
    )
    # deepspeed (imported above, maybe first here, after init_process_group) captures the default group in default
    # arguments; without this, destroy_process_group() cannot free it (see ds_ring.parallel.lifecycle.teardown).
    release_captured_default_group()
    factor = gradient_factor(config, sp)
    if factor != 1.0:
        ds_backward = engine.backward

        def backward(loss: torch.Tensor, *args, **kw):
            return ds_backward(loss * factor, *args, **kw)

        engine.backward = backward
    engine.ds_ring_gradient_factor = factor
    return engine, opt, loader, sched
