"""The FlexAttention block path: one fused, block-sparse kernel for any block the plan makes.

A block's facts (global positions of its rows and keys, segment length, causal, window, document ids; the G
segment blocks batched along the batch dimension) become ONE ``mask_mod``; its ``BlockMask`` (which 128 x 128
tiles are empty, full or partial) is made once per (block, batch size, device) and kept on the block's
``AllowedPairs``, which the plan holds: never per call or step. The key-padding mask is data, not structure: a
padded call uses the cached tile structure without full tiles and a mask_mod that also reads the padding (a shallow
copy per call, no block-sparsity work).

Packed documents: a chunk's block with itself is one piece whose mask compares the document ids of its rows and keys
(``kernels.fused_documents``, documents.DocumentPieces), so a chunk of several documents is one fused call whose
BlockMask skips the empty tiles between them, not one call per document. Document structure is data of the call:
those pieces come from ``Documents.schedule``, built once per forward and reused by every layer and the backward,
so their BlockMasks are made once per forward (per step of the training loop), never per step of the ring loop.
The dilation class of a head needs no term: the plan's pieces already gather one class's heads, rows and keys into
dense sub-blocks (a rate r costs 1/r^2 of the dense FLOPs), and the kernel masks inside them; under a dilated
pattern packed rows keep one piece per document, each counting its classes from its own start.

Forward returns out and the log-sum-exp in natural log (fp32; fp64 for fp64 inputs) for the ring's merge. The
backward takes the rows' FINAL out and lse (after every block was merged), as the other block kernels do: it calls
FlexAttention's backward operator directly, because its autograd would use the block's own out/lse. GQA runs
without expanding K/V (``enable_gqa``; the operator reads query head i against kv head i // (Hq / Hkv)).

CUDA: forward and backward are compiled once per shape (``torch.compile``, fullgraph, static shapes). CPU: the
eager, unfused form (it materialises the block's scores: small shapes only, for tests; torch.compile on CPU serves
inference only).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch._higher_order_ops.flex_attention import flex_attention as _flex_fwd_op
from torch._higher_order_ops.flex_attention import (
    flex_attention_backward as _flex_bwd_op,
)
from torch.nn.attention import flex_attention as _flex

from .pairs import AllowedPairs

_LN2 = math.log(2.0)
TILE = 128  # FlexAttention's tile: BlockMask sparsity is decided per TILE x TILE tile
# Compiled kernels kept per function: one per (block shape, dtype, segment/causal/window facts). A dilated pattern
# makes a few dozen shapes; past dynamo's default of 8 per function a fullgraph compile raises
# FailOnRecompileLimitHit (checked on the CPU: tests/test_kernels.py).
MAX_COMPILED_SHAPES = 128


def mask_mod(pairs: AllowedPairs):
    """The block's ``mask_mod(b, h, i, t)``: query row i and key row t of batch entry b may interact.

    Batch entry b is segment block g = b % G (the engine folds (B, G) into B * G, index b * G + g), so one BlockMask
    of batch G serves any B (FlexAttention reads the mask's batch modulo its size)."""
    q_pos, k_pos, G = pairs.q_pos, pairs.k_pos, pairs.q_pos.shape[0]
    seg, causal, window, q_doc, k_doc = pairs.seg, pairs.causal, pairs.window, pairs.q_doc, pairs.k_doc

    def allowed(b, h, i, t):
        g = b % G if G > 1 else 0
        qp, kp = q_pos[g, i], k_pos[g, t]
        ok = qp >= 0  # every row: a tensor of the right shape to build on
        if seg is not None:
            ok = ok & ((qp // seg) == (kp // seg))
        if causal:
            ok = ok & (kp <= qp)
        if window is not None:
            ok = ok & ((qp - kp) < window)
        if q_doc is not None:  # a packed chunk's diagonal block: only pairs inside one document
            ok = ok & (q_doc[g, i] == k_doc[g, t])
        return ok

    return allowed


def block_mask(pairs: AllowedPairs, device: torch.device, key_padding: torch.Tensor | None) -> _flex.BlockMask:
    """The BlockMask of ``pairs`` (with ``key_padding``, (B * G, N) bool, in its mask_mod when given).

    The tile structure is made on first use and kept on ``pairs`` (so with the plan): one for unpadded calls, with
    full tiles (no mask evaluated), and one where every non-empty tile is partial, so that the mask_mod, which then
    also reads the key padding, runs on every tile. A padded call only swaps the mask_mod of a shallow copy: no
    block-sparsity work per call."""
    padded = key_padding is not None
    key = ("flex", str(device), padded)
    cache = pairs.cache
    if key not in cache:
        G, M, N = pairs.q_pos.shape[0], pairs.q_pos.shape[1], pairs.k_pos.shape[1]
        # On CUDA the mask is evaluated tile by tile in a compiled kernel, so no (M x N) mask is materialised even
        # for long blocks; on CPU the eager form materialises it (test shapes only).
        cache[key] = _flex.create_block_mask(cache.setdefault("mask_mod", mask_mod(pairs)), G if G > 1 else None, None, M, N, device=device,
                                             BLOCK_SIZE=TILE, _compile=torch.device(device).type == "cuda",
                                             separate_full_blocks=not padded)
    bm = cache[key]
    if not padded:
        return bm
    # the same structural function every call: a compiled kernel guards on the mask_mod's code and reads the
    # tensors it closes over (positions, this call's padding) as inputs, so a new padding mask does not recompile
    structural = cache.setdefault("mask_mod", mask_mod(pairs))
    bm = copy.copy(bm)
    bm.mask_mod = lambda b, h, i, t: structural(b, h, i, t) & key_padding[b, t]
    return bm


def _identity(score, b, h, i, t):
    return score


def _options(q, k, v) -> dict:
    # FlexAttention's own defaults (backend, log-sum-exp output), as its front door fills them in
    return _flex._apply_kernel_options(q, k, v, True, None)


def _forward_eager(q, k, v, bm, scale):
    out, lse2, _ = _flex_fwd_op(q, k, v, _identity, bm.as_tuple(), scale, _options(q, k, v), (), ())
    return out, lse2 * _LN2  # the operator's statistics are base 2


@functools.cache
def _forward_compiled(backend="inductor"):
    def fwd(q, k, v, bm, scale):
        return _flex.flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=True,
                                    return_aux=_flex.AuxRequest(lse=True))

    return torch.compile(fwd, backend=backend, fullgraph=True, dynamic=False)


def _backward_call(dout, q, k, v, out, lse2, bm_tuple, scale, options):
    dq, dk, dv, _ = _flex_bwd_op(q, k, v, out, lse2, dout, None, _identity, None, bm_tuple, scale, options, (), ())
    return dq, dk, dv


@functools.cache
def _backward_compiled(backend="inductor"):
    return torch.compile(_backward_call, backend=backend, fullgraph=True, dynamic=False)


def _backend(q: torch.Tensor, compile_backend):
    """The torch.compile backend to run with, None = eager: inductor on CUDA, eager on the CPU (compiled Flex on the
    CPU serves inference only); tests pass a backend to capture the compiled graphs on the CPU."""
    return compile_backend or ("inductor" if q.device.type == "cuda" else None)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pairs: AllowedPairs, scale: float,
            key_padding: torch.Tensor | None = None, compile_backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B', Hq, M, D), k/v (B', Hkv, N, D) -> out (B', Hq, M, D), lse (B', Hq, M) fp32 (natural log; -inf and
    out 0 for a row with no allowed key). ``key_padding``: (B', N) bool, True = real token."""
    bm = block_mask(pairs, q.device, key_padding)
    backend = _backend(q, compile_backend)
    if backend is not None:
        with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_SHAPES):
            out, aux = _forward_compiled(backend)(q, k, v, bm, scale)
        return out, aux.lse
    return _forward_eager(q, k, v, bm, scale)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, pairs: AllowedPairs, scale: float, key_padding: torch.Tensor | None = None,
             compile_backend=None):
    """Partial dq (B', Hq, M, D), dk/dv (B', Hkv, N, D) of the block given the rows' final ``out`` and ``lse``
    (natural log, finite)."""
    bm = block_mask(pairs, q.device, key_padding)
    lse2 = (lse / _LN2).to(torch.promote_types(q.dtype, torch.float32)).contiguous()
    backend = _backend(q, compile_backend)
    args = (dout, q, k, v, out, lse2, bm.as_tuple(), scale, _options(q, k, v))
    if backend is None:
        return _backward_call(*args)
    with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_SHAPES):
        return _backward_compiled(backend)(*args)
