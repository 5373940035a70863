"""Packed documents: a packed row against its documents run as separate calls, and the traffic of a ring.

Time (one process, CPU): causal attention fwd+bwd over a row of S tokens packed with documents of about S/16
tokens (random lengths around the mean, a fresh packing per size), three ways, interleaved:
  * packed    ``ring_dilated_attention(q, k, v, causal=True, document_ids=ids)`` on the whole row;
  * separate  the same op once per document on that document's rows (what each document alone costs);
  * unmasked  the same row without document masking (what a path that ignores packing would spend, wrongly).
Traffic (2 and 4 CPU ranks, counted by ``ds_ring.count_comm``): the K/V bytes each rank sends, against the bytes of
the rows of the documents that cross its shard boundaries (what they need) and against whole shards.

    python benchmarks/bench_packing.py             # S = 8192, documents of ~S/16; traffic at P = 2 and 4
    python benchmarks/bench_packing.py --quick     # seconds
"""

from __future__ import annotations

import torch

import _common as C
import ds_ring

TARGET = 1.5  # packed / separate, issue 9


def packing(S: int, mean: int, gen: torch.Generator) -> torch.Tensor:
    """Document lengths summing to S, uniform in [mean/2, 3 mean/2]."""
    lengths = []
    while sum(lengths) < S:
        lengths.append(int(torch.randint(mean // 2, mean * 3 // 2 + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - S
    return torch.tensor([n for n in lengths if n > 0])


def time_rows(args, dtype):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for S in args.seq_lens:
        lengths = packing(S, S // args.docs, gen)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        B, H, D = 1, args.heads, args.head_dim
        q, k, v = (torch.randn(B, H, S, D, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, S, D, dtype=dtype)

        def packed():
            o = ds_ring.ring_dilated_attention(q, k, v, causal=True, document_ids=ids)
            return torch.autograd.grad(o, (q, k, v), g)

        # each document as its own tensors, as a batch of separate documents would hold them
        spans = list(zip(starts[:-1].tolist(), starts[1:].tolist()))
        docs = [[t[:, :, a:b].detach().clone().requires_grad_(True) for t in (q, k, v)] + [g[:, :, a:b].clone()]
                for a, b in spans]

        def separate():
            out = []
            for qd, kd, vd, gd in docs:
                o = ds_ring.ring_dilated_attention(qd, kd, vd, causal=True)
                out.append(torch.autograd.grad(o, (qd, kd, vd), gd))
            return out

        def unmasked():
            o = ds_ring.ring_dilated_attention(q, k, v, causal=True)
            return torch.autograd.grad(o, (q, k, v), g)

        res = C.bench_interleaved({"packed": packed, "separate": separate, "unmasked": unmasked}, args.warmup,
                                  args.repeat)
        t = {n: r["median"] for n, r in res.items()}
        rows.append(dict(S=S, documents=len(lengths), packed_s=t["packed"], separate_s=t["separate"],
                         unmasked_s=t["unmasked"], ratio=t["packed"] / t["separate"],
                         unmasked_ratio=t["unmasked"] / t["separate"], raw=res))
        print(f"S={S}: {len(lengths)} documents: packed {t['packed'] * 1e3:.1f} ms, separate "
              f"{t['separate'] * 1e3:.1f} ms, unmasked {t['unmasked'] * 1e3:.1f} ms", flush=True)
    return rows


def _traffic(rank: int, world: int, payload: tuple[int, list[int]]) -> dict:
    S, lengths = payload
    H, D = 4, 64
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    L = S // world
    q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
    local_ids = ds_ring.shard_sequence(ids, 1)
    with ds_ring.count_comm() as fwd:
        ds_ring.ring_dilated_attention(q, k, v, causal=True, document_ids=local_ids)
    return {"sent": fwd.sent_bytes.get("kv", 0), "row_bytes": 2 * H * D * 4}


def traffic_rows(S: int, mean: int, worlds):
    gen = torch.Generator().manual_seed(1)
    lengths = packing(S, mean, gen).tolist()
    ends = torch.tensor(lengths).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    rows = []
    for world in worlds:
        L = S // world
        res = C.run_ranks(_traffic, world, (S, lengths))
        for rank, r in enumerate(res):
            # causal, contiguous: rank p sends to p+1 the rows of the document that crosses their boundary
            boundary = (rank + 1) * L
            need = sum(min(e, boundary) - max(a, boundary - L) for a, e in zip(starts, ends)
                       if a < boundary < e) if rank < world - 1 else 0
            rows.append(dict(world=world, rank=rank, sent_bytes=r["sent"], needed_bytes=need * r["row_bytes"],
                             shard_bytes=L * r["row_bytes"] * (world - 1 - rank)))
    return rows, lengths


def main():
    p = C.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    p.add_argument("--docs", type=int, default=16, help="documents per row on average (mean length S / docs)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--traffic-seq-len", type=int, default=8192)
    args = p.parse_args()
    C.quick_sizes(args, seq_lens=[256], traffic_seq_len=256)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = time_rows(args, C.dtype_of(args.dtype))
    md = C.print_table(
        f"Causal attention fwd+bwd over a packed row, B=1, H={args.heads}, D={args.head_dim}, {args.dtype}, "
        f"torch.set_num_threads({args.threads}); median of {args.repeat} interleaved runs",
        ["S", "documents", "packed (ms)", "separate calls (ms)", "no document mask (ms)", "packed / separate",
         f"target <= {TARGET}", "no mask / separate"],
        [[r["S"], r["documents"], r["packed_s"] * 1e3, r["separate_s"] * 1e3, r["unmasked_s"] * 1e3, r["ratio"],
          "met" if r["ratio"] <= TARGET else "MISSED", r["unmasked_ratio"]] for r in rows])
    traffic, lengths = traffic_rows(args.traffic_seq_len, args.traffic_seq_len // args.docs,
                                   (2,) if args.quick else (2, 4))
    md2 = C.print_table(
        f"K/V bytes sent per rank, causal, contiguous, S={args.traffic_seq_len}, {len(lengths)} documents of "
        f"~S/{args.docs} (all shorter than a shard): against the rows of the documents crossing its boundary",
        ["P", "rank", "sent (KiB)", "needed (KiB)", "sent / needed", "whole shards (KiB)"],
        [[r["world"], r["rank"], r["sent_bytes"] / 1024, r["needed_bytes"] / 1024,
          r["sent_bytes"] / r["needed_bytes"] if r["needed_bytes"] else "-", r["shard_bytes"] / 1024]
         for r in traffic])
    C.finish(args, "bench_packing", dict(threads=args.threads, dtype=args.dtype, target=TARGET, rows=rows, traffic=traffic,
                          traffic_lengths=lengths, table_markdown=md, traffic_markdown=md2))


if __name__ == "__main__":
    main()
