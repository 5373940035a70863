"""The ring op on real ranks (gloo) against the dense float64 definition: forward and dq, dk, dv."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from reference import dense_reference, each_document_alone

import ds_ring
from ds_ring.op import kernels
from ds_ring.op.attention import attend
from ds_ring.parallel.sharding import shard_sequence

S = 48  # divisible by 2P for P = 1..4, so zigzag works everywhere

# (segment_lengths, dilation_rates): dense, LongNet-style geometric, segments crossing shard boundaries at odd
# places, segments shorter than a shard, dilation larger than the number of heads.
PATTERNS = [
    (None, None),
    ([8, 16, None], [1, 2, 4]),
    ([7, 20], [1, 3]),
    ([5, 11, 29], [2, 1, 2]),
    ([12], [8]),
]


def _padding(kind: str, B: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    kpm = torch.ones(B, S, dtype=torch.bool)
    if kind == "right":
        for b in range(B):
            kpm[b, S - 3 - 9 * b:] = False
    elif kind == "left":
        for b in range(B):
            kpm[b, : 5 + 13 * b] = False
    elif kind == "holes":
        kpm = torch.rand(B, S, generator=gen) > 0.35
    elif kind == "allpad":  # a fully padded sequence next to a normal one
        kpm[0] = False
    return kpm


def _cases():
    cases = []
    i = 0
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for pi, (segs, rates) in enumerate(PATTERNS):
                pad = ["none", "right", "left", "holes", "allpad"][(i + pi) % 5]
                window = [None, 9, None, 30][i % 4]
                Hq, Hkv = [(4, 4), (4, 2), (6, 2), (4, 1)][i % 4]
                cases.append(dict(layout=layout, causal=causal, segs=segs, rates=rates, pad=pad, window=window,
                                  Hq=Hq, Hkv=Hkv, dtype=torch.float32, seed=i))
                i += 1
    # Packed documents (dense pattern): crossing shard boundaries, starting exactly on them (12/16/24 divide S for
    # P = 4/3/2), shorter than a shard, and rows with different documents; with padding, windows, GQA.
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for docs, pad, window in (("cross", "right", None), ("aligned", "none", 9), ("short", "holes", None)):
                cases.append(dict(layout=layout, causal=causal, segs=None, rates=None, pad=pad, window=window,
                                  Hq=4, Hkv=2, dtype=torch.float32, seed=200 + i, docs=docs))
                i += 1
    for layout, causal in (("zigzag", True), ("contiguous", False)):  # bfloat16 accumulates in fp32
        cases.append(dict(layout=layout, causal=causal, segs=[8, 16, None], rates=[1, 2, 4], pad="holes",
                          window=None, Hq=4, Hkv=2, dtype=torch.bfloat16, seed=100 + i))
        i += 1
    return cases


def _documents(kind: str | None, B: int, gen: torch.Generator) -> torch.Tensor | None:
    """(B, S) global document ids, non-decreasing: each row its own packing."""
    if kind is None:
        return None
    rows = []
    for b in range(B):
        if kind == "cross":
            lengths = [[10, 5, 20, 13], [30, 18]][b % 2]
        elif kind == "aligned":
            lengths = [[12, 12, 24], [16, 16, 16]][b % 2]
        else:  # short: 2..7 tokens each
            lengths = []
            while sum(lengths) < S:
                lengths.append(int(torch.randint(2, 8, (1,), generator=gen)))
            lengths[-1] -= sum(lengths) - S
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def _inputs(case, B=2, D=8):
    gen = torch.Generator().manual_seed(1234 + case["seed"])
    q = torch.randn(B, case["Hq"], S, D, generator=gen)
    k = torch.randn(B, case["Hkv"], S, D, generator=gen)
    v = torch.randn(B, case["Hkv"], S, D, generator=gen)
    dout = torch.randn(B, case["Hq"], S, D, generator=gen)
    return q, k, v, dout, _padding(case["pad"], B, gen), _documents(case.get("docs"), B, gen)


def _run_cases(rank, world, cases, overlap, path=None):
    with kernels.force_path(path):
        return _run_cases_on_path(world, cases, overlap)


def _run_cases_on_path(world, cases, overlap):
    results = []
    for case in cases:
        q, k, v, dout, kpm, docs = _inputs(case)
        dt, lay = case["dtype"], case["layout"]
        shard = lambda t, dim: shard_sequence(t, dim, layout=lay)  # noqa: E731
        ql, kl, vl = (shard(t, 2).to(dt).requires_grad_() for t in (q, k, v))
        out = attend(  # the op's internal entry: overlap is a benchmark knob, not a public argument
            ql, kl, vl, case["segs"], case["rates"], case["causal"],
            None if kpm is None else shard(kpm, 1), case["window"], layout=lay, overlap=overlap,
            document_ids=None if docs is None else shard(docs, 1),
        )
        out.backward(shard(dout, 2).to(dt))
        results.append([t.detach().float() for t in (out, ql.grad, kl.grad, vl.grad)])
    return results


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check(world, results, cases):
    for ci, case in enumerate(cases):
        q, k, v, dout, kpm, docs = _inputs(case)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = dense_reference(qd, kd, vd, case["segs"], case["rates"], case["causal"], kpm, case["window"],
                              document_ids=docs)
        ref.backward(dout.double())
        tol = 1e-5 if case["dtype"] == torch.float32 else 2e-2
        for name, dim, full in (("out", 2, ref), ("dq", 2, qd.grad), ("dk", 2, kd.grad), ("dv", 2, vd.grad)):
            idx = ["out", "dq", "dk", "dv"].index(name)
            pieces = [results[r][ci][idx] for r in range(world)]
            full_got = _assemble(pieces, world, case["layout"])
            err = _rel(full_got, full.detach())
            assert err < tol, f"P={world} case {case} {name}: relative error {err:.2e} >= {tol}"
        if kpm is not None:  # rows with no key are exactly 0
            dead = ~kpm.any(-1)
            if dead.any():
                full_out = _assemble([results[r][ci][0] for r in range(world)], world, case["layout"])
                assert torch.all(full_out[dead] == 0) and torch.isfinite(full_out).all()


def _assemble(pieces, world, layout):
    from ds_ring.op.layouts import get_layout

    L = pieces[0].shape[2]
    out = torch.empty(pieces[0].shape[0], pieces[0].shape[1], L * world, pieces[0].shape[3])
    for r, p in enumerate(pieces):
        out[:, :, get_layout(layout).positions(L, world, r)] = p
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_dense_reference(world):
    cases = _cases()
    results = run_distributed(_run_cases, world, cases, True)
    _check(world, results, cases)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_flex_path_matches_dense_reference(world):
    """Every block on the FlexAttention path (its eager, unfused form on CPU: about 0.2 s per block call, so the
    cases are shared out): forward and gradients. Every case at P=1; at P=2 and 3 a third of the cases each, at P=4
    (four ranks on the CI's two cores) half of the last third. ``DS_RING_KERNEL=flex python -m pytest
    tests/test_ring_attention.py`` runs every case at every P on it."""
    cases = _cases() if world == 1 else _cases()[world - 2 :: 3] if world < 4 else _cases()[2::6]
    results = run_distributed(_run_cases, world, cases, True, "flex", timeout_s=1200.0)
    _check(world, results, cases)


def test_matches_dense_reference_without_overlap():
    cases = _cases()[::3]
    results = run_distributed(_run_cases, 2, cases, False)
    _check(2, results, cases)


@pytest.mark.parametrize("path", [None, "flex"])
def test_single_process_is_sdpa(path):
    """segment_lengths=None is exact full attention, identical to torch's SDPA."""
    with kernels.force_path(path):
        _single_process_is_sdpa()


def _single_process_is_sdpa():
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    for causal in (False, True):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = ds_ring.ring_dilated_attention(q, k, v, causal=causal)
        assert _rel(out, ref.double()) < 1e-6


@pytest.mark.parametrize("path", [None, "flex"])
def test_float64_forward_and_backward(path):
    """float64 inputs run the whole path in float64 (a regression: the backward once mixed in float32)."""
    with kernels.force_path(path):
        _float64_forward_and_backward()


def _float64_forward_and_backward():
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(2, h, 40, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    kpm = torch.rand(2, 40, generator=g) > 0.3
    for kw in (dict(), dict(causal=True, key_padding_mask=kpm), dict(segment_lengths=[8, 20], dilation_rates=[1, 2])):
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        out = ds_ring.ring_dilated_attention(ql, kl, vl, **kw)
        out.backward(do)
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
        ref = dense_reference(qd, kd, vd, kw.get("segment_lengths"), kw.get("dilation_rates"), kw.get("causal", False),
                              kw.get("key_padding_mask"))
        ref.backward(do)
        assert out.dtype == torch.float64
        for a, b in ((out, ref), (ql.grad, qd.grad), (kl.grad, kd.grad), (vl.grad, vd.grad)):
            assert _rel(a, b.detach()) < 1e-10


# Dilated patterns on packed rows: every document gets exactly what it would get alone (segments and dilation classes
# counted from its own start), against each document run alone through the float64 definition.
DOC_PATTERNS = [([8, 16, None], [1, 2, 4]), ([7, 20], [1, 3]), ([12], [8])]


def _dilated_document_cases():
    cases, i = [], 0
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for (segs, rates), docs in zip(DOC_PATTERNS, ("short", "cross", "aligned")):
                pad = ["none", "holes", "right"][i % 3]
                cases.append(dict(layout=layout, causal=causal, segs=segs, rates=rates, pad=pad,
                                  window=[None, 9][i % 2], Hq=4, Hkv=2, dtype=torch.float32, seed=300 + i, docs=docs))
                i += 1
    return cases


@pytest.mark.parametrize("world,path", [(1, None), (2, None), (3, None), (4, None), (1, "flex"), (2, "flex")])
def test_dilated_packed_rows_match_each_document_alone(world, path):
    """Dilated patterns on packed rows (both layouts, causal or not, padding, windows, GQA) equal each document run
    alone, forward and gradients; on the CPU kernel every case at every P, on the Flex path (eager on CPU: slow)
    half of the cases at P=1 and the other half at P=2."""
    cases = _dilated_document_cases()
    if path == "flex":
        cases = cases[world - 1 :: 2]
    results = run_distributed(_run_cases, world, cases, True, path, timeout_s=1200.0)
    for ci, case in enumerate(cases):
        q, k, v, dout, kpm, docs = _inputs(case)
        alone = each_document_alone(q, k, v, dout, docs, case["segs"], case["rates"], case["causal"], kpm,
                                    case["window"])
        for idx, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"), alone)):
            got = _assemble([results[r][ci][idx] for r in range(world)], world, case["layout"])
            err = _rel(got, want)
            assert err < 1e-5, f"P={world} case {case} {name}: relative error {err:.2e} against each document alone"
