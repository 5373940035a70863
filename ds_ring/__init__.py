"""ds_ring: exact ring attention and LongNet dilated attention over sequence-parallel ranks, for Hugging Face models
trained with DeepSpeed ZeRO.

The package is in layers, each a folder that imports only from the folders below it (docs/design.md draws them):

    tools         CLI, demo, bench, local spawner
    integrations  transformers patch, DeepSpeed, FSDP2, Trainer
    planning      op memory estimate, step planner, cost model
    training      batch sharding, losses, log-probabilities, the memory switch
    parallel      process groups, lifecycle (start, teardown), sequence sharding
    op            the ring attention op: layouts, communication, kernels, schedule, documents, agreement, engine,
                  Ulysses, front door

This module re-exports the public names; ``ds_ring.<name>`` is the supported way to reach them.
"""

from .op.agreement import RingFacts
from .op.attention import ring_dilated_attention
from .op.comm import count_comm
from .op.layouts import LAYOUTS, Layout, get_layout
from .op.modules import RingDilatedAttention, RingDilatedMultiheadAttention
from .parallel.groups import SequenceParallel, init_sequence_parallel
from .parallel.lifecycle import init_distributed, teardown
from .parallel.sharding import gather_sequence, shard_sequence
from .training.data import shard_batch, sp_dataloader
from .training.logprobs import sequence_logprobs, token_logprobs
from .training.loss import causal_lm_loss, chunked_causal_lm_loss
from .training.memory_switch import MemoryOptions, offload_context, optimize_memory, restore_memory
from .planning.op_memory import MemoryEstimate, measure_peak_bytes, memory_estimate
from .planning.step_planner import plan
from .integrations.deepspeed import ConfigError, load_config
from .integrations.deepspeed import initialize as deepspeed_initialize
from .integrations.fsdp2 import fully_shard
from .integrations.transformers import local_attention, patch, unpatch  # registers attn_implementation="ring_dilated"

__version__ = "0.1.0"

_TRAINER = ("SequenceParallelMixin", "SequenceParallelTrainer")


def __getattr__(name: str):
    # integrations.trainer imports transformers.Trainer (and accelerate's training stack): loaded on first use only.
    if name in _TRAINER:
        from .integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ds_ring' has no attribute {name!r}")


__all__ = [
    "LAYOUTS", "ConfigError", "Layout", "MemoryEstimate", "MemoryOptions", "RingDilatedAttention",
    "RingDilatedMultiheadAttention", "RingFacts", "SequenceParallel", "SequenceParallelMixin",
    "SequenceParallelTrainer",
    "causal_lm_loss", "chunked_causal_lm_loss", "count_comm", "deepspeed_initialize", "fully_shard", "gather_sequence",
    "get_layout",
    "init_distributed", "init_sequence_parallel", "load_config", "local_attention", "measure_peak_bytes",
    "memory_estimate", "offload_context", "optimize_memory", "patch", "plan", "restore_memory",
    "ring_dilated_attention", "sequence_logprobs", "shard_batch", "shard_sequence", "sp_dataloader", "teardown",
    "token_logprobs", "unpatch",
]

# Imported after init_process_group, transformers (through torch.distributed.nn) has just captured the default group
# in default arguments: undo that, or destroy_process_group() cannot free it (see parallel.lifecycle.teardown).
from .parallel.lifecycle import release_captured_default_group as _release  # noqa: E402

_release()
del _release
