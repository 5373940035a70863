"""Block kernels: the parts of the CUDA path whose logic runs on CPU, and the CPU kernel against the definition."""

from __future__ import annotations

import torch

from reference import dense_reference

from ds_ring.op import kernels
from ds_ring.op.kernels import BlockMask, block_backward, block_forward


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
    monkeypatch.setattr(kernels, "MASK_TILE_ELEMENTS", 64)  # forces tiles of 16 rows
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 50, 8, generator=g, dtype=torch.float64) for _ in range(4))
    kpm = torch.rand(2, 50, generator=g) > 0.3
    pos = torch.arange(50)[None]
    mask = BlockMask(pos, pos, seg=None, causal=True, window=9, causal_diag=False, key_padding=kpm)
    out, lse = block_forward(q, k, v, mask, 8 ** -0.5)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    ref = dense_reference(qd, kd, vd, causal=True, key_padding_mask=kpm, window=9)
    ref.backward(do)
    assert torch.allclose(out, ref, atol=1e-12)
    grads = block_backward(do, q, k, v, out, lse.masked_fill(lse == float("-inf"), 0.0), mask, 8 ** -0.5)
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert torch.allclose(got.double(), want, atol=1e-10)
