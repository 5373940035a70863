"""Block kernels: the parts of the CUDA path whose logic runs on CPU, and the CPU kernel against the definition."""

from __future__ import annotations

import torch
from reference import dense_reference

from ds_ring.op import kernels
from ds_ring.op import pairs as pairs_module
from ds_ring.op.kernels import block_backward, block_forward
from ds_ring.op.pairs import AllowedPairs


def test_cuda_bias_is_the_mask_with_aligned_rows():
    """The memory-efficient kernel needs 16-element aligned bias rows: the view must hold the mask's values."""
    for n in (5, 16, 37):
        mask = torch.zeros(2, 1, 7, n).masked_fill_(torch.rand(2, 1, 7, n) > 0.5, float("-inf"))
        q, k = torch.empty(2, 3, 7, 8), torch.empty(2, 3, n, 8)
        bias = kernels._cuda_bias(mask, q, k)
        assert bias.shape == (2, 3, 7, n)
        assert bias.stride(2) % 16 == 0
        assert torch.equal(bias, mask.expand(2, 3, 7, n))
    assert kernels._cuda_bias(None, q, k) is None


def test_expand_kv_matches_query_head_grouping():
    q, k, v = torch.empty(1, 6, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ke, ve = kernels._expand_kv(q, k, v)
    for h in range(6):  # query head h reads kv head h // 3
        assert torch.equal(ke[:, h], k[:, h // 3]) and torch.equal(ve[:, h], v[:, h // 3])


def test_block_kernel_with_mask_tiles_matches_definition(monkeypatch):
    """A masked block computed in many small query tiles equals the dense definition, forward and backward."""
    monkeypatch.setattr(pairs_module, "MASK_TILE_ELEMENTS", 64)  # forces tiles of 16 rows
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 50, 8, generator=g, dtype=torch.float64) for _ in range(4))
    kpm = torch.rand(2, 50, generator=g) > 0.3
    pos = torch.arange(50)[None]
    pairs = AllowedPairs(pos, pos, seg=None, causal=True, window=9, causal_diag=False)
    out, lse = block_forward(q, k, v, pairs, 8 ** -0.5, kpm)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    ref = dense_reference(qd, kd, vd, causal=True, key_padding_mask=kpm, window=9)
    ref.backward(do)
    assert torch.allclose(out, ref, atol=1e-12)
    grads = block_backward(do, q, k, v, out, lse.masked_fill(lse == float("-inf"), 0.0), pairs, 8 ** -0.5, kpm)
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert torch.allclose(got.double(), want, atol=1e-10)


def _pairs_reference(q, k, v, q_pos, k_pos, seg, causal, window, kpm, scale):
    """The definition of one (possibly G-batched) block in float64: q (B*G, Hq, M, D), positions (G, M) / (G, N)."""
    G = q_pos.shape[0]
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = torch.ones(G, qp.shape[1], kp.shape[2], dtype=torch.bool)
    if seg is not None:
        ok &= (qp // seg) == (kp // seg)
    if causal:
        ok &= kp <= qp
    if window is not None:
        ok &= (qp - kp) < window
    ok = ok.repeat(q.shape[0] // G, 1, 1)[:, None]  # batch entry b * G + g is segment block g
    if kpm is not None:
        ok = ok & kpm[:, None, None, :]
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~ok, float("-inf"))
    row_any = ok.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~row_any, 0.0), -1) * row_any
    return p @ v.double().repeat_interleave(g, 1), torch.logsumexp(s, -1)


def test_flex_path_matches_definition():
    """The Flex path (eager on CPU) on G-batched segment blocks with GQA, padding (a fully padded row among them),
    segments, causal off the diagonal and windows: out, lse and the partial gradients, fp32 against float64."""
    g = torch.Generator().manual_seed(3)
    B, G, Hq, Hkv, M, N, D = 2, 3, 4, 2, 7, 9, 8
    scale = D ** -0.5
    q_pos = torch.stack([torch.arange(M) * 2 + 20 * i + 5 for i in range(G)])
    k_pos = torch.stack([torch.arange(N) * 2 + 20 * i for i in range(G)])
    for seg, causal, window, padded in ((None, False, None, False), (8, True, None, True), (None, True, 6, True),
                                        (None, False, 5, False)):
        q = torch.randn(B * G, Hq, M, D, generator=g)
        k, v = (torch.randn(B * G, Hkv, N, D, generator=g) for _ in range(2))
        do = torch.randn(B * G, Hq, M, D, generator=g)
        kpm = None
        if padded:
            kpm = torch.rand(B * G, N, generator=g) > 0.4
            kpm[1] = False  # a block with no real key: rows output 0, lse -inf
        pairs = AllowedPairs(q_pos, k_pos, seg=seg, causal=causal, window=window)
        out, lse = block_forward(q, k, v, pairs, scale, kpm, path="flex")
        assert lse.dtype == torch.float32
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = _pairs_reference(qd, kd, vd, q_pos, k_pos, seg, causal, window, kpm, scale)
        assert (out.double() - ref).abs().max() < 1e-5
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5
        assert torch.all(out[~fin] == 0)
        ref.backward(do.double())
        lse_in = lse.masked_fill(lse == float("-inf"), 0.0)
        grads = block_backward(do, q, k, v, out, lse_in, pairs, scale, kpm, path="flex")
        for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
            assert got.shape == want.shape
            assert (got.double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())
        assert ("flex", "cpu", padded) in pairs.cache, "the BlockMask is kept with the block's facts"


def test_flex_block_mask_is_made_once_per_block():
    """One BlockMask per AllowedPairs, device and padded or not, reused for every call and batch size."""
    pos = torch.arange(12)[None]
    pairs = AllowedPairs(pos, pos, causal=True, causal_diag=True)
    q = torch.randn(1, 2, 12, 8)
    block_forward(q, q, q, pairs, 0.3, path="flex")
    made = dict(pairs.cache)
    for B in (3, 2):
        q = torch.randn(B, 2, 12, 8)
        block_forward(q, q, q, pairs, 0.3, path="flex")
        block_forward(q, q, q, pairs, 0.3, torch.rand(B, 12) > 0.2, path="flex")
    assert pairs.cache.keys() == {("flex", "cpu", False), ("flex", "cpu", True), "mask_mod"}
    assert pairs.cache[("flex", "cpu", False)] is made[("flex", "cpu", False)]


def test_block_path_table():
    """The table of block_path on this machine's device, and the override."""
    pos = torch.arange(4)[None]
    q = torch.empty(1, 2, 4, 8)
    plain, windowed = AllowedPairs(pos, pos), AllowedPairs(pos, pos, window=2)
    assert kernels.block_path(q, plain, None) == "cpu" and kernels.block_path(q, windowed, None) == "cpu"
    with kernels.force_path("flex"):
        assert kernels.block_path(q, plain, None) == "flex"
    assert kernels.block_path(q, plain, None) == "cpu"


def test_flex_compiled_graphs_capture_once():
    """The compiled Flex forward and backward (inductor on CUDA) capture their graphs once per shape: a new padding
    mask each call reuses them (no recompile), and the captured graphs give the eager results. Captured here with a
    backend that runs the graph as it is (Inductor's CPU Flex kernels serve inference only)."""
    from ds_ring.op import flex

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    g = torch.Generator().manual_seed(1)
    pos = torch.arange(20)[None] * 2
    pairs = AllowedPairs(pos, pos + 1, seg=8, causal=True)
    for _ in range(3):
        q, do = (torch.randn(2, 4, 20, 16, generator=g) for _ in range(2))
        k, v = (torch.randn(2, 2, 20, 16, generator=g) for _ in range(2))
        kpm = torch.rand(2, 20, generator=g) > 0.3
        out, lse = flex.forward(q, k, v, pairs, 0.25, kpm, compile_backend=capture)
        ref, ref_lse = flex.forward(q, k, v, pairs, 0.25, kpm)
        assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)
        got = flex.backward(do, q, k, v, out, lse, pairs, 0.25, kpm, compile_backend=capture)
        want = flex.backward(do, q, k, v, out, lse, pairs, 0.25, kpm)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-6)
    assert len(graphs) == 2, f"{len(graphs)} graphs captured for one shape: a padding mask recompiled"


def test_flex_compiled_graphs_serve_many_block_shapes():
    """A dilated pattern makes more block shapes than dynamo's default of 8 compiled graphs per function (past it a
    fullgraph compile raises FailOnRecompileLimitHit): every shape gets its own graph."""
    from ds_ring.op import flex

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    g = torch.Generator().manual_seed(2)
    for n in range(4, 16):  # 12 shapes
        pos = torch.arange(n)[None]
        pairs = AllowedPairs(pos, pos, causal=True, window=3)
        q = torch.randn(1, 2, n, 16, generator=g)
        flex.forward(q, q, q, pairs, 0.25, compile_backend=capture)
    assert len(graphs) == 12
