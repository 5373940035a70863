"""Causal diagonal blocks cut into causal halves + the dense off-diagonal quarter (schedule.cut_causal_diagonals): the
cut pieces cover exactly the pairs of the uncut ones, and the op on them equals the float64 definition and the uncut
schedule, forward and gradients, on one process and on a ring of real ranks. Small shapes use a small cut through
``kernels.causal_cut``; the default is the measured one (docs/performance.md, section 2)."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from reference import dense_reference, each_document_alone

import ds_ring
from ds_ring.op import kernels
from ds_ring.op.layouts import get_layout
from ds_ring.op.pattern import Pattern
from ds_ring.op.schedule import make_schedule
from ds_ring.parallel.sharding import shard_sequence


def test_cut_is_decided_per_block_path():
    """Only the CPU kernel's path cuts, with the measured default; CUDA paths and a forced Flex path do not."""
    assert kernels.causal_cut_rows("cpu") == kernels.CPU_CAUSAL_CUT
    assert kernels.causal_cut_rows("cuda") is None
    with kernels.force_path("flex"):
        assert kernels.causal_cut_rows("cpu") is None
    with kernels.causal_cut((4, 32)):
        assert kernels.causal_cut_rows("cpu") == (4, 32, 32)
    with kernels.causal_cut((4, 32, 16)):
        assert kernels.causal_cut_rows("cpu") == (4, 32, 16)
    with pytest.raises(ValueError, match="min_rows"):
        with kernels.causal_cut((8, 4)):
            pass


def _pairs(schedule, heads):
    """Sorted (head, query position, key position) of every pair the pieces compute (causal and window applied)."""
    out = []
    for st in schedule.steps:
        for pc in st.pieces:
            qp, kp = pc.q_pos[:, :, None], pc.k_pos[:, None, :]
            ok = torch.ones(qp.shape[0], qp.shape[1], kp.shape[2], dtype=torch.bool)
            if pc.seg is not None:
                ok &= qp // pc.seg == kp // pc.seg
            if pc.causal:
                ok &= kp <= qp
            if pc.window is not None:
                ok &= qp - kp < pc.window
            g, i, t = ok.nonzero().unbind(1)
            for h in range(pc.head_start, heads, pc.head_step):
                out.append(torch.stack([torch.full_like(i, h), pc.q_pos[g, i], pc.k_pos[g, t]], 1))
    pairs = torch.cat(out)
    return pairs[torch.argsort(pairs[:, 0] * 10**8 + pairs[:, 1] * 10**4 + pairs[:, 2])]


@pytest.mark.parametrize("segs,rates,window", [(None, None, None), ([16, 32, 64], [1, 2, 4], None),
                                               ([20], [1], None), ([24, 64], [1, 3], 9)])
def test_cut_pieces_compute_each_pair_once(segs, rates, window):
    """The cut schedule computes exactly the (head, query, key) pairs of the uncut one, each once, with more pieces
    (the cut happened; a window masks its blocks, so only blocks it cannot reach are cut), and every causal
    diagonal block left has fewer rows than twice the minimum."""
    H, L, P = 4, 64, 2
    for layout in ("contiguous", "zigzag"):
        source = Pattern.make(segs, rates, causal=True, window=window).pieces(get_layout(layout), L, P, H)
        for rank in range(P):
            with kernels.causal_cut(None):
                plain = make_schedule(source, rank)
            with kernels.causal_cut((3, 64)):
                cut = make_schedule(source, rank)
            more = sum(map(len, (s.pieces for s in cut.steps))) - sum(map(len, (s.pieces for s in plain.steps)))
            assert more > 0 if window is None else more >= 0
            assert torch.equal(_pairs(cut, H), _pairs(plain, H))
            assert all(pc.q_pos.shape[1] < 6 for st in cut.steps for pc in st.pieces if pc.causal_diag)


# (segment_lengths, dilation_rates, window, padding, Hq, Hkv, B, S): dense, segments, odd block lengths (unequal
# halves), LongNet dilation, window, key padding, GQA, one and two batch rows (B = 1 folds blocks as strided views).
CASES = [
    (None, None, None, False, 4, 4, 1, 96),
    ([24], [1], None, True, 4, 2, 2, 96),
    ([16, 32, None], [1, 2, 4], None, False, 4, 2, 1, 96),
    ([7, 45], [1, 3], None, True, 6, 2, 1, 90),
    ([30, 90], [1, 2], 11, False, 4, 1, 2, 90),
    (None, None, None, True, 2, 2, 1, 77),
]


def _inputs(seed, B, Hq, Hkv, S, padding):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(B, Hq, S, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, S, 8, generator=g) for _ in range(2))
    kpm = torch.rand(B, S, generator=g) > 0.3 if padding else None
    return q, k, v, dout, kpm


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("cut", [(4, 64), (3, 200, 16), (16, 48)])
def test_cut_matches_definition_and_uncut(cut):
    """One process: the op with cut causal blocks equals the float64 definition and the uncut op, forward and
    gradients, on fresh random inputs."""
    for ci, (segs, rates, window, padding, Hq, Hkv, B, S) in enumerate(CASES):
        q, k, v, dout, kpm = _inputs(100 + ci + 31 * cut[0], B, Hq, Hkv, S, padding)
        got = {}
        for name, rows in (("cut", cut), ("plain", None)):
            ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
            with kernels.causal_cut(rows):
                out = ds_ring.ring_dilated_attention(ql, kl, vl, segs, rates, causal=True, key_padding_mask=kpm,
                                                     window=window, local=True)
                out.backward(dout)
            got[name] = (out, ql.grad, kl.grad, vl.grad)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = dense_reference(qd, kd, vd, segs, rates, True, kpm, window)
        ref.backward(dout.double())
        for name, a, b, r in zip(("out", "dq", "dk", "dv"), got["cut"], got["plain"], (ref, qd.grad, kd.grad, vd.grad)):
            assert _rel(a, r.detach()) < 1e-5, f"case {ci} {name}: cut vs float64"
            assert _rel(a, b) < 1e-5, f"case {ci} {name}: cut vs uncut"


def _ring_job(rank, world, layout, cases):
    results = []
    with kernels.causal_cut((3, 64)):
        for segs, rates, seed, docs in cases:
            q, k, v, dout, kpm = _inputs(seed, 2, 4, 2, 96, True)
            shard = lambda t, dim: shard_sequence(t, dim, layout=layout)  # noqa: E731
            ql, kl, vl = (shard(t, 2).requires_grad_() for t in (q, k, v))
            out = ds_ring.ring_dilated_attention(ql, kl, vl, segs, rates, causal=True, key_padding_mask=shard(kpm, 1),
                                                 layout=layout, document_ids=None if docs is None else shard(docs, 1))
            out.backward(shard(dout, 2))
            results.append([t.detach() for t in (out, ql.grad, kl.grad, vl.grad)])
    return results


def test_cut_on_a_ring_matches_definition():
    """Two gloo ranks, both layouts, dense / LongNet / packed documents (each document's causal block is cut): the
    cut schedules equal the float64 definition (each document alone for packed rows)."""
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 9, 40, 17]))[None].expand(2, -1).clone()
    cases = [(None, None, 11, None), ([16, 32, None], [1, 2, 4], 12, None), (None, None, 13, docs)]
    for layout in ("contiguous", "zigzag"):
        results = run_distributed(_ring_job, 2, layout, cases, timeout_s=600.0)
        for ci, (segs, rates, seed, dids) in enumerate(cases):
            q, k, v, dout, kpm = _inputs(seed, 2, 4, 2, 96, True)
            if dids is None:
                qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
                ref = dense_reference(qd, kd, vd, segs, rates, True, kpm)
                ref.backward(dout.double())
                want = (ref.detach(), qd.grad, kd.grad, vd.grad)
            else:
                want = each_document_alone(q, k, v, dout, dids, segs, rates, True, kpm)
            for j, name in enumerate(("out", "dq", "dk", "dv")):
                got = torch.empty_like(want[j], dtype=torch.float32)
                for r in range(2):
                    got[:, :, get_layout(layout).positions(48, 2, r)] = results[r][ci][j]
                assert _rel(got, want[j]) < 1e-5, f"{layout} case {ci} {name}"
