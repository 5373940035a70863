"""ds_ring: exact ring attention and LongNet dilated attention over sequence-parallel ranks, for Hugging Face models
trained with DeepSpeed ZeRO."""

from .attention import ring_dilated_attention
from .comm import count_comm
from .groups import SequenceParallel, init_distributed, init_sequence_parallel
from .sharding import gather_sequence, shard_sequence

__version__ = "0.1.0"
