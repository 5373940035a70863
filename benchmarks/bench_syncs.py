"""Collectives and host syncs per model forward and backward: a patched Llama on 2 CPU ranks (gloo).

Counted independently of ds_ring's own counters, so the same script measures any version of the library:
  * collectives: calls of torch.distributed's collectives (all_gather, all_reduce, ...), wrapped in this process;
  * host syncs: tensor -> host reads (item, tolist, __bool__, equal, nonzero, ...) seen by a TorchFunctionMode in
    forward, and by a TorchDispatchMode in backward (function modes are not active inside the autograd engine;
    there a read shows as aten._local_scalar_dense, equal or nonzero). On CPU they cost little, on CUDA each one
    stalls the host until the stream drains, which is what breaks the overlap of transfers and compute.
    transformers' own reads (its mask building) are in the counts too; the layer-count column shows what grows
    with depth.

    python benchmarks/bench_syncs.py            # 2 and 4 layers, batch with and without padding
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, finish, print_table  # noqa: E402

from ds_ring.tools.launch import PRELOAD, spawn_local  # noqa: E402

SYNCS = {"item", "tolist", "__bool__", "equal", "nonzero", "__int__", "__float__", "__index__", "allclose"}
COLLECTIVES = ("all_gather", "all_reduce", "all_gather_object", "broadcast", "reduce_scatter", "barrier",
               "all_to_all", "all_to_all_single")


class _Syncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


class _BackwardSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "equal", "nonzero", "_assert_async"):
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


def _count_collectives() -> Counter:
    counts = Counter()
    for name in COLLECTIVES:
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            counts[_name] += 1
            return _fn(*a, **k)

        setattr(dist, name, wrapped)
    return counts


def _job(rank: int, world: int, layers: int, padded: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_ring

    collectives = _count_collectives()
    sp = ds_ring.init_sequence_parallel(world, layout="zigzag")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
    model = ds_ring.patch(LlamaForCausalLM(cfg), sp=sp)
    ids = torch.randint(1, 128, (2, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 100:] = 0
    local = ds_ring.shard_batch({"input_ids": ids, "attention_mask": mask, "labels": ids}, sp)
    labels = local.pop("shift_labels")
    for _ in range(2):  # warm-up (plans, caches), then the counted step
        collectives.clear()
        with _Syncs() as fwd_syncs:
            logits = model(**local).logits
        fwd = dict(collectives)
        loss = ds_ring.causal_lm_loss(logits, labels, sp)
        collectives.clear()
        with _BackwardSyncs() as bwd_syncs:
            loss.backward()
        bwd = dict(collectives)
    return {"fwd_collectives": fwd, "fwd_syncs": dict(fwd_syncs.count), "bwd_collectives": bwd,
            "bwd_syncs": dict(bwd_syncs.count)}


def main(argv=None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    rows, raw = [], []
    for layers in ((2,) if args.quick else (2, 4)):
        for padded in (False, True):
            # --quick: ranks fork from a preloaded server (see _common.run_ranks); the counts do not depend on it
            r = spawn_local(_job, 2, layers, padded, preload=PRELOAD if args.quick else ())[0]
            raw.append({"layers": layers, "padded": padded, **r})
            rows.append([layers, "yes" if padded else "no", sum(r["fwd_collectives"].values()),
                         sum(r["fwd_syncs"].values()), sum(r["bwd_collectives"].values()),
                         sum(r["bwd_syncs"].values()),
                         ", ".join(f"{k} {v}" for k, v in sorted({**r["fwd_collectives"]}.items()))])
    print_table("Per model forward / backward at P=2 (rank 0): collectives and host syncs",
                ["layers", "padding", "fwd collectives", "fwd syncs", "bwd collectives", "bwd syncs",
                 "fwd collectives by name"], rows)
    finish(args, "bench_syncs", {"results": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
