"""ds_ring: exact ring attention and LongNet dilated attention over sequence-parallel ranks, for Hugging Face models
trained with DeepSpeed ZeRO."""

from .agreement import RingFacts
from .attention import ring_dilated_attention
from .comm import count_comm
from .data import shard_batch, sp_dataloader
from .deepspeed_integration import ConfigError, load_config
from .deepspeed_integration import initialize as deepspeed_initialize
from .groups import SequenceParallel, init_distributed, init_sequence_parallel, teardown
from .layouts import LAYOUTS, Layout, get_layout
from .loss import causal_lm_loss, chunked_causal_lm_loss
from .memory import MemoryEstimate, measure_peak_bytes, memory_estimate
from .memory_options import MemoryOptions, offload_context, optimize_memory, restore_memory
from .modules import RingDilatedAttention, RingDilatedMultiheadAttention
from .planner import plan
from .sharding import gather_sequence, shard_sequence
from .transformers_integration import local_attention, patch, unpatch  # registers attn_implementation="ring_dilated"

__version__ = "0.1.0"

_TRAINER = ("SequenceParallelMixin", "SequenceParallelTrainer")


def __getattr__(name: str):
    # ds_ring.trainer imports transformers.Trainer (and accelerate's training stack): loaded on first use only.
    if name in _TRAINER:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ds_ring' has no attribute {name!r}")

__all__ = [
    "LAYOUTS", "ConfigError", "Layout", "MemoryEstimate", "MemoryOptions", "RingDilatedAttention",
    "RingDilatedMultiheadAttention", "RingFacts", "SequenceParallel", "SequenceParallelMixin",
    "SequenceParallelTrainer",
    "causal_lm_loss", "chunked_causal_lm_loss", "count_comm", "deepspeed_initialize", "gather_sequence", "get_layout",
    "init_distributed", "init_sequence_parallel", "load_config", "local_attention", "measure_peak_bytes",
    "memory_estimate", "offload_context", "optimize_memory", "patch", "plan", "restore_memory",
    "ring_dilated_attention", "shard_batch", "shard_sequence", "sp_dataloader", "teardown", "unpatch",
]

# Imported after init_process_group, transformers (through torch.distributed.nn) has just captured the default group
# in default arguments: undo that, or destroy_process_group() cannot free it (see groups.teardown).
from .groups import release_captured_default_group as _release  # noqa: E402

_release()
del _release
