"""ds_ring: exact ring attention and LongNet dilated attention over sequence-parallel ranks, for Hugging Face models
trained with DeepSpeed ZeRO."""

from .attention import ring_dilated_attention
from .comm import count_comm
from .data import shard_batch, sp_dataloader
from .deepspeed_integration import ConfigError, load_config
from .deepspeed_integration import initialize as deepspeed_initialize
from .groups import SequenceParallel, init_distributed, init_sequence_parallel
from .loss import causal_lm_loss, chunked_causal_lm_loss
from .memory import MemoryEstimate, measure_peak_bytes, memory_estimate
from .memory_options import MemoryOptions, offload_context, optimize_memory, restore_memory
from .modules import RingDilatedAttention, RingDilatedMultiheadAttention
from .planner import plan
from .sharding import gather_sequence, shard_sequence
from .transformers_integration import local_attention, patch, unpatch  # registers attn_implementation="ring_dilated"

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "MemoryEstimate", "MemoryOptions", "RingDilatedAttention", "RingDilatedMultiheadAttention",
    "SequenceParallel", "causal_lm_loss", "chunked_causal_lm_loss", "count_comm", "deepspeed_initialize",
    "gather_sequence", "init_distributed", "init_sequence_parallel", "load_config", "local_attention",
    "measure_peak_bytes", "memory_estimate", "offload_context", "optimize_memory", "patch", "plan", "restore_memory",
    "ring_dilated_attention", "shard_batch", "shard_sequence", "sp_dataloader", "unpatch",
]
