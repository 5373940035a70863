"""Packed documents as a term of the FlexAttention mask: where the Flex path serves a chunk's diagonal block
(``kernels.fused_documents``), the block is ONE piece over the whole chunk carrying its runs' document ids
(documents.DocumentPieces), instead of one piece per document run. Checked: the schedule's piece counts (one piece
per diagonal block on the Flex path, one per run on the CPU path, per run for dilated patterns), the choice's
table, and the op (P = 1 in one process, P = 2..4 on real gloo ranks; both layouts, causal or not, window, GQA, key
padding or none) against each document run alone through the float64 definition, forward and gradients, in fp32 to
1e-5, on the forced Flex path (eager on the CPU) and on the CPU kernel given the same pieces (AllowedPairs.allowed
honours the term)."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from reference import each_document_alone

import ds_ring
from ds_ring.op import engine, kernels
from ds_ring.op.documents import Documents, local_runs, summaries
from ds_ring.op.layouts import get_layout
from ds_ring.op.pattern import Pattern
from ds_ring.parallel.sharding import shard_sequence

S = 48  # divisible by 2P for P = 1..4 (zigzag)
# Row 0: one-token documents, a run of four documents inside one chunk, a document spanning chunks; row 1 its own.
LENGTHS = ([5, 1, 14, 1, 1, 9, 17], [3, 2, 1, 30, 4, 1, 1, 6])


def _ids() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in LENGTHS])


def _documents(ids: torch.Tensor, world: int, rank: int, layout: str) -> Documents:
    """The Documents every rank of a ``world`` ring would agree on, as seen by ``rank``, built in this process."""
    C = get_layout(layout).chunks_per_rank
    shards = [ids[:, get_layout(layout).positions(S // world, world, r)] for r in range(world)]
    rows = [summaries(s, C)[0].tolist() for s in shards]
    return Documents.from_rows(rows, local_runs(shards[rank].tolist(), C), C, ids.shape[0])


def _diagonal_pieces(world: int, layout: str, pattern: Pattern):
    """(pieces with a document term, pieces per (rank, chunk, row) of every chunk's block with itself, runs per
    (rank, chunk, row)) over the whole ring."""
    ids, C = _ids(), get_layout(layout).chunks_per_rank
    L = S // world
    n = L // C
    termed, per_block, runs = 0, {}, {}
    for r in range(world):
        docs = _documents(ids, world, r, layout)
        sched = docs.schedule(pattern, get_layout(layout), L, r, ids.shape[0], "cpu", 4, 0, dtype=torch.float32,
                              head_dim=8)
        for pc in sched.steps[0].pieces:
            termed += pc.q_doc is not None
            rows = torch.arange(L)[pc.q_idx] if pc.q_idx is not None else torch.arange(L)
            keys = torch.arange(L)[pc.k_idx] if pc.k_idx is not None else torch.arange(L)
            qc, kc = set((rows // n).tolist()), set((keys // n).tolist())
            if qc == kc and len(qc) == 1:
                key = (r, min(qc), pc.batch)
                per_block[key] = per_block.get(key, 0) + 1
        for c in range(C):
            for b in range(ids.shape[0]):
                runs[r, c, b] = len(docs.runs[c][b])
                per_block.setdefault((r, c, b), 0)
    return termed, per_block, runs


def test_fused_documents_table():
    """Where the document term is used: the Flex path (CUDA, its dtypes and head dims; or forced), not the CPU path,
    nor a forced flash / efficient path; fuse_documents overrides."""
    assert not kernels.fused_documents("cpu", torch.float32, 64)
    assert kernels.fused_documents("cuda", torch.bfloat16, 128) and kernels.fused_documents("cuda", torch.float32, 64)
    assert not kernels.fused_documents("cuda", torch.float64, 64)  # the efficient path: per-document pieces
    assert not kernels.fused_documents("cuda", torch.float16, 72)
    with kernels.force_path("flex"):
        assert kernels.fused_documents("cpu", torch.float32, 8)
    with kernels.force_path("efficient"):
        assert not kernels.fused_documents("cuda", torch.bfloat16, 128)
    with kernels.fuse_documents(True):
        assert kernels.fused_documents("cpu", torch.float32, 64)
    with kernels.force_path("flex"), kernels.fuse_documents(False):
        assert not kernels.fused_documents("cpu", torch.float32, 8)


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")])
def test_diagonal_block_is_one_piece_on_flex(world, layout):
    """On the forced Flex path a chunk's block with itself is ONE piece (with the document term where it holds more
    than one run); on the CPU path one piece per run; a dilated pattern keeps its per-document pieces on Flex."""
    causal = Pattern.make(None, None, True)
    with kernels.force_path("flex"):
        termed, per_block, runs = _diagonal_pieces(world, layout, causal)
    assert all(v == 1 for v in per_block.values()), per_block
    assert termed == sum(r > 1 for r in runs.values()) > 0
    with kernels.causal_cut((2, 64)):  # a cut that would split causal diagonals: never a document-termed piece
        with kernels.fuse_documents(True):
            termed_cut, per_block_cut, _ = _diagonal_pieces(world, layout, causal)
        assert termed_cut == termed and all(v == 1 for k, v in per_block_cut.items() if runs[k] > 1)
    termed, per_block, runs = _diagonal_pieces(world, layout, causal)  # the CPU path: per-document pieces
    assert termed == 0 and per_block == runs
    with kernels.force_path("flex"):
        termed, per_block, _ = _diagonal_pieces(world, layout, Pattern.make([8, 16], [1, 2], True))
    assert termed == 0 and max(per_block.values()) > 1


# (layout, causal, window, (Hq, Hkv), padding): together both layouts, causal or not, windows, GQA (and MHA), key
# padding or none; few per P (spawning ranks and the eager Flex backward on the CPU are what the tests cost)
ONE_PROCESS = [("contiguous", True, None, (4, 2), "holes"), ("zigzag", False, 7, (4, 4), None),
               ("contiguous", True, 5, (4, 2), None)]
CASES = {
    2: [("zigzag", True, 7, (4, 1), "right"), ("contiguous", False, None, (4, 2), "holes")],
    3: [("zigzag", False, 7, (4, 4), None)],
    4: [("zigzag", True, None, (4, 2), "holes")],
}


def _inputs(case, seed):
    hq, hkv = case[3]
    pad = case[4]
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(2, h, S, 8, generator=g) for h in (hq, hkv, hkv, hq))
    kpm = None
    if pad == "holes":
        kpm = torch.rand(2, S, generator=g) > 0.3
    elif pad == "right":
        kpm = torch.ones(2, S, dtype=torch.bool)
        kpm[0, S - 11 :] = False
    return q, k, v, dout, kpm


def _run(rank, world, cases, path, fuse):
    """This rank's (out, dq, dk, dv) per case and how many pieces with a document term it computed."""
    termed = [0]
    original = engine._allowed_pairs

    def counting(piece):
        termed[0] += piece.q_doc is not None
        return original(piece)

    engine._allowed_pairs = counting
    results = []
    try:
        with kernels.force_path(path), kernels.fuse_documents(fuse):
            for i, case in enumerate(cases):
                q, k, v, dout, kpm = _inputs(case, 100 * world + i)
                layout, causal, window = case[:3]
                ql, kl, vl = (shard_sequence(t, 2, layout=layout).requires_grad_() for t in (q, k, v))
                out = ds_ring.ring_dilated_attention(
                    ql, kl, vl, causal=causal, window=window, layout=layout,
                    key_padding_mask=None if kpm is None else shard_sequence(kpm, 1, layout=layout),
                    document_ids=shard_sequence(_ids(), 1, layout=layout))
                out.backward(shard_sequence(dout, 2, layout=layout))
                results.append([t.detach() for t in (out, ql.grad, kl.grad, vl.grad)])
    finally:
        engine._allowed_pairs = original
    return results, termed[0]


def _check(world, cases, got, what):
    for i, case in enumerate(cases):
        q, k, v, dout, kpm = _inputs(case, 100 * world + i)
        want = each_document_alone(q, k, v, dout, _ids(), causal=case[1], key_padding_mask=kpm, window=case[2])
        lay = get_layout(case[0])
        for j, name in enumerate(("out", "dq", "dk", "dv")):
            full = torch.empty(want[j].shape)
            for r in range(world):
                full[:, :, lay.positions(S // world, world, r)] = got[r][0][i][j]
            err = ((full.double() - want[j]).norm() / want[j].norm()).item()
            assert err < 1e-5, f"{what} P={world} case {case} {name}: relative error {err:.2e} against each document"


def test_flex_document_term_one_process():
    """P = 1 (one process, no ring: both layouts still cut the row into their chunks): the forced Flex path with the
    document term equals each document run alone, forward and gradients."""
    got = [_run(0, 1, ONE_PROCESS, "flex", None)]
    assert got[0][1] > 0
    _check(1, ONE_PROCESS, got, "flex")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_flex_document_term_matches_each_document_alone(world):
    """The forced Flex path (eager on the CPU) with the document term in effect on every rank equals each document
    run alone, forward and gradients, on real gloo ranks."""
    got = run_distributed(_run, world, CASES[world], "flex", None, timeout_s=600.0)
    assert all(termed > 0 for _, termed in got), [t for _, t in got]
    _check(world, CASES[world], got, "flex")


def test_cpu_kernel_honours_the_document_term():
    """The same document-termed pieces on the CPU kernel (its masks from AllowedPairs.allowed) give the same answer:
    any path serves such a piece (one process, every case above)."""
    cases = ONE_PROCESS + [c for cs in CASES.values() for c in cs]
    got = [_run(0, 1, cases, None, True)]
    assert got[0][1] > 0
    _check(1, cases, got, "cpu kernel")
