"""Block kernels: dense attention on one (query rows x key rows) sub-block, returning out and the log-sum-exp.

Forward returns ``out`` (B, H, M, D) in the input dtype and ``lse`` (B, H, M) in fp32, so blocks can be merged with
online softmax. Backward takes the FINAL out and lse of the rows (after all blocks were merged): then each block's
dq/dk/dv are exact partial sums and blocks add up. A row with no allowed key in a block gets lse = -inf and out = 0.

Which kernel serves a block is decided in one place, ``block_path`` (its docstring holds the table). The CPU and
memory-efficient paths build masks from global positions (segment, causal, window) and the key-padding mask, tile
by tile over query rows, so no (M x N) mask is materialised for large blocks; blocks with no row/column constraint
pass no mask or a broadcast (B, 1, 1, N) padding mask, and the causal diagonal block uses the kernel's causal flag.
The Flex path (flex.py) turns the same facts, document ids included, into one mask_mod and a cached BlockMask;
``fused_documents`` says when a packed chunk's diagonal block is one piece with a document term for it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import flex
from .pairs import AllowedPairs


class _Override:
    """A choice of this module that a ``with`` block replaces in this process (tests, benchmarks' A/B runs); outside
    every such block the tables below decide. Set (even to None) is told apart from unset: for ``causal_cut`` None
    means "no cut", not "the table"."""

    def __init__(self) -> None:
        self._values: list = []

    @contextlib.contextmanager
    def __call__(self, value):
        self._values.append(value)
        try:
            yield
        finally:
            self._values.pop()

    @property
    def is_set(self) -> bool:
        return bool(self._values)

    @property
    def value(self):
        return self._values[-1] if self._values else None


# Force one block path for every block (tests, benchmarks): "flex", or "auto" / unset for ``block_path``'s table.
FORCE_ENV = "DS_RING_KERNEL"
_forced = _Override()
PATHS = ("cpu", "flash", "efficient", "flex")


def force_path(path: str | None):
    """Run every block on ``path`` ("flex"; None = the table) inside the block, in this process."""
    if path is not None and path not in PATHS:
        raise ValueError(f"force_path: unknown block path {path!r}: use one of {PATHS} or None")
    return _forced(path)


def forced_path() -> str | None:
    """The forced path: ``force_path`` in this process, else the environment variable DS_RING_KERNEL."""
    if _forced.value is not None:
        return _forced.value
    env = os.environ.get(FORCE_ENV, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in PATHS:
        raise ValueError(f"{FORCE_ENV}={env!r} is not a block path: use one of {PATHS} or auto")
    return env


# Causal diagonal blocks the CPU path cuts (schedule.cut_causal_diagonals): (min_rows, max_rows, max_gathered_rows).
# Blocks of at most max_rows rows (max_gathered_rows for blocks whose rows are gathered by index: dilation classes
# whose segment length is not a multiple of the rate; each cut level gathers their rows again; evenly spaced rows are
# strided views and take max_rows) are cut into their two causal halves plus the dense off-diagonal quarter,
# recursively while a half keeps at least min_rows rows. Measured at S=8192 (docs/performance.md, section 2).
CPU_CAUSAL_CUT = (128, 1024, 512)
_cut_override = _Override()


def causal_cut(rows: tuple[int, ...] | None):
    """Use ``rows`` = (min_rows, max_rows[, max_gathered_rows = max_rows]) (None: no cut) instead of the table's
    causal cut inside the block, in this process (tests on small shapes)."""
    if rows is not None and not (isinstance(rows, tuple) and len(rows) in (2, 3) and 1 <= rows[0] <= min(rows[1:])):
        raise ValueError(f"causal_cut: rows must be (min_rows, max_rows[, max_gathered_rows]) with 1 <= min_rows <= "
                         f"the maxima, got {rows!r}")
    return _cut_override(None if rows is None else (rows + rows[1:])[:3])


def causal_cut_rows(device: torch.device | str) -> tuple[int, int, int] | None:
    """(min_rows, max_rows, max_gathered_rows) of the causal diagonal blocks the schedule cuts for the path that serves them on
    ``device``, or None: only the ``cpu`` path gains (block_path's table says why)."""
    if _cut_override.is_set:
        return _cut_override.value
    forced = forced_path()
    if torch.device(device).type == "cpu" and forced in (None, "cpu"):
        return CPU_CAUSAL_CUT
    return None


# Head dims FlexAttention's CUDA kernels are generated for here (checked by benchmarks/gpu_check.py).
_FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)


def _flex_takes(dtype: torch.dtype, head_dim: int) -> bool:
    """The CUDA Flex path's dtypes and head dims (block_path's table)."""
    return dtype != torch.float64 and head_dim in _FLEX_HEAD_DIMS


_fuse_override = _Override()


def fuse_documents(enabled: bool | None):
    """Use ``enabled`` (True: one piece per packed chunk's diagonal block with the document ids as a term; False:
    one piece per document run; None: the table) instead of ``fused_documents``' choice inside the block, in this
    process (tests, benchmarks/gpu_check.py's A/B)."""
    return _fuse_override(enabled)


def fused_documents(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a packed chunk's diagonal block (a chunk's queries against its own keys, several documents) is ONE
    piece carrying the chunk's document ids as a term of its mask (one fused Flex call whose BlockMask skips the
    empty tiles between documents) rather than one piece per document run (one kernel call each): True where the
    Flex path serves those blocks, i.e. on CUDA for the dtypes and head dims Flex takes, or when ``flex`` is forced.
    The ``cpu`` path keeps the per-document pieces (contiguous row ranges, read as views: no mask at all), as do
    ``flash`` and ``efficient`` when forced. Documents.schedule asks this once per forward, as the schedule asks
    ``causal_cut_rows``."""
    if _fuse_override.value is not None:
        return _fuse_override.value
    forced = forced_path()
    if forced is not None:
        return forced == "flex"
    return torch.device(device).type == "cuda" and _flex_takes(dtype, head_dim)


def block_path(q: torch.Tensor, pairs: AllowedPairs, key_padding: torch.Tensor | None) -> str:
    """Which kernel serves one block: the single place where the choice is made.

    ==========  =====================  ==========================================================  ============
    device      dtype                  block                                                       path
    ==========  =====================  ==========================================================  ============
    CPU         any                    any (masks tiled over query rows)                           ``cpu``
    CUDA        fp16 / bf16, D % 8 = 0  dense or causal diagonal, no key padding                   ``flash``
    CUDA        fp16 / bf16 / fp32,    anything else: key padding, segment, window, causal         ``flex``
                D in 16..256 (2^k)     off-diagonal, a packed chunk's diagonal block with its
                                       document ids as a term (dilation classes are pieces)
    CUDA        fp64, other D          anything flash does not take                                ``efficient``
    any         any                    ``DS_RING_KERNEL=flex`` or ``force_path("flex")``           ``flex``
    ==========  =====================  ==========================================================  ============

    Packed documents (``fused_documents`` decides, from the same facts, before the schedule is built): where Flex
    serves a chunk's block with itself, that block is ONE piece over the chunk whose mask compares the runs'
    document ids (one fused call, the BlockMask skipping the empty tiles between documents); elsewhere (the ``cpu``
    path, fp64 / other D on CUDA, a forced ``flash`` / ``efficient``) one piece per document run, a dense or causal
    diagonal block (views on the CPU, ``flash`` on CUDA). Dilated and segmented patterns always keep per-document
    pieces (each document's dilation classes gathered from its own start). Blocks between two chunks share at most
    one document: one piece, no term.

    Causal diagonal blocks, cut or not (``causal_cut_rows``: the schedule cuts them into their causal halves plus the
    dense off-diagonal quarter, schedule.cut_causal_diagonals):

    =============  =============================================================================================
    path           cut
    =============  =============================================================================================
    ``cpu``        blocks of 256..1024 rows (256..512 when the rows are gathered by index, not strided views),
                   halves down to 128 rows: the kernel tiles keys in 512 columns and skips only whole tiles
                   above the diagonal, so a causal block of <= 512 rows costs the full square and one of 1024
                   rows 0.77 of it (benchmarks/bench_causal_blocks.py); cut, the causal patterns made of such
                   blocks run faster at S=8192 (docs/performance.md, section 2); blocks of 2048 rows measured no
                   faster cut, gathered blocks of 1024 rows slower (each level gathers their rows again)
    ``flash``      none: the CUDA kernel skips causal tiles of its own (128 rows or fewer)
    ``flex``       none: the BlockMask skips 128 x 128 blocks above the diagonal (a document-termed piece is never
                   a causal diagonal: never cut on any path)
    ``efficient``  none: fp64 / odd head dims only, not timed
    =============  =============================================================================================

    ``cpu``: aten's CPU flash kernel with an additive mask. ``flash``: PyTorch's CUDA flash kernel (1.00-1.03x SDPA
    flash on an H100). ``efficient``: the memory-efficient kernel with a materialised additive bias (2.5x the flash
    kernel for padded rows on an H100, hence Flex where it can). ``flex``: FlexAttention with the block's mask_mod
    and a BlockMask cached with the plan (flex.py); eager and unfused on CPU (tests). The CUDA rows follow
    benchmarks/gpu_check.py, which times each path.
    """
    forced = forced_path()
    if forced is not None:
        return forced
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        raise NotImplementedError(f"ds_ring has no block kernel for device {q.device.type!r}: use CPU or CUDA")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and q.shape[-1] % 8 == 0 and key_padding is None and not pairs.has_rowcol:
        return "flash"
    if _flex_takes(q.dtype, q.shape[-1]):
        return "flex"
    return "efficient"


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _simple_mask(causal_diag: bool, kp: torch.Tensor | None, dtype: torch.dtype, num_rows: int):
    """For blocks without row/column constraints: (additive mask or None, is_causal, row_has_key or None)."""
    if kp is None:
        return None, causal_diag, None
    add = _additive(kp[:, None, None, :], dtype)
    if causal_diag:  # row i sees keys 0..i: it has one iff a real key is among them
        row_any = (kp.cumsum(-1) > 0)[:, None, :]
    else:
        row_any = kp.any(-1)[:, None, None].expand(-1, 1, num_rows)
    return add, causal_diag, row_any


def _fix_empty_rows(out, lse, row_any):
    if row_any is None:
        return out, lse
    lse = lse.masked_fill(~row_any, float("-inf"))
    return out.masked_fill(~row_any[..., None], 0.0), lse


def _fwd(path, q, k, v, attn_mask, is_causal, scale):
    if path == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )
    return _cuda_fwd(path, q, k, v, attn_mask, is_causal, scale)


def _bwd(path, dout, q, k, v, out, lse, attn_mask, is_causal, scale):
    if path == "cpu":
        lse = lse.to(torch.promote_types(q.dtype, torch.float32))  # the CPU kernel's lse is fp64 for fp64 inputs
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )
    return _cuda_bwd(path, dout, q, k, v, out, lse, attn_mask, is_causal, scale)


# CUDA: PyTorch's flash kernel (fp16/bf16, no mask) or its memory-efficient kernel (any float dtype, additive bias).
# Both return the log-sum-exp and take the final out/lse in backward. Neither groups query heads, so K/V are expanded
# here, after communication (they travel with Hkv heads).


def _expand_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))


def _cuda_bias(attn_mask, q, k):
    """The efficient kernel wants a (B, H, M, N) bias whose rows start 16-element aligned: pad N, then view."""
    if attn_mask is None:
        return None
    n = attn_mask.shape[-1]
    padded = attn_mask.new_zeros(*attn_mask.shape[:-1], -(-n // 16) * 16)
    padded[..., :n] = attn_mask
    return padded[..., :n].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _cuda_fwd(path, q, k, v, attn_mask, is_causal, scale):
    k, v = _expand_kv(q, k, v)
    if path == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
        return out, lse
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _cuda_bias(attn_mask, q, k), True, 0.0, is_causal, scale=scale
    )[:2]
    return out, lse[..., : q.shape[2]]


def _cuda_bwd(path, dout, q, k, v, out, lse, attn_mask, is_causal, scale):
    hkv = k.shape[1]
    k, v = _expand_kv(q, k, v)
    if path == "flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, is_causal, None, None,
            scale=scale,
        )
    else:
        pad = -(-q.shape[2] // 32) * 32 - q.shape[2]  # the kernel's lse rows are padded to 32
        lse = torch.nn.functional.pad(lse, (0, pad)).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        # The kernel's bf16/fp16 backward reads its inputs in the (B, M, H, D) memory layout that its forward
        # produces; plain (B, H, M, D)-contiguous tensors gave wrong dq/dk on an H100 (benchmarks/gpu_check.py).
        dout, q, k, v, out = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (dout, q, k, v, out))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, _cuda_bias(attn_mask, q, k), out, lse, seed, seed, 0.0, [True, True, True, False],
            is_causal, scale=scale,
        )
    if dk.shape[1] != hkv:  # fold the expanded heads back onto their kv head
        dk = dk.view(dk.shape[0], hkv, -1, *dk.shape[2:]).sum(2)
        dv = dv.view(dv.shape[0], hkv, -1, *dv.shape[2:]).sum(2)
    return dq, dk, dv


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pairs: AllowedPairs, scale: float,
    key_padding: torch.Tensor | None = None, path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B', Hq, M, D), k/v (B', Hkv, N, D) with Hq % Hkv == 0 -> out (B', Hq, M, D), lse (B', Hq, M) fp32.

    B' = B * G when ``pairs`` batches G segment blocks; ``key_padding`` (B', N) bool, True = real token.
    ``path``: the block path (``block_path`` decides when None).
    """
    path = path or block_path(q, pairs, key_padding)
    if path == "flex":
        return flex.forward(q, k, v, pairs, scale, key_padding)
    M = q.shape[2]
    if not pairs.has_rowcol:
        add, is_causal, row_any = _simple_mask(pairs.causal_diag, key_padding, q.dtype, M)
        out, lse = _fwd(path, q, k, v, add, is_causal, scale)
        return _fix_empty_rows(out, lse, row_any)
    outs, lses = [], []
    t = pairs.tile_rows(q.shape[0])
    for i in range(0, M, t):
        rows = slice(i, min(i + t, M))
        allowed = pairs.allowed(rows, q.shape[0], key_padding)
        out, lse = _fwd(path, q[:, :, rows], k, v, _additive(allowed, q.dtype), False, scale)
        out, lse = _fix_empty_rows(out, lse, allowed.any(-1))
        outs.append(out)
        lses.append(lse)
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 2), torch.cat(lses, 2))


def block_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    pairs: AllowedPairs, scale: float, key_padding: torch.Tensor | None = None, path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial gradients of one block given the rows' final ``out`` and ``lse`` (fp32, finite).

    Returns dq (B, Hq, M, D) and dk/dv (B, Hkv, N, D), in the input dtype (dk/dv in fp32 when tiled).
    """
    path = path or block_path(q, pairs, key_padding)
    if path == "flex":
        return flex.backward(dout, q, k, v, out, lse, pairs, scale, key_padding)
    M = q.shape[2]
    if not pairs.has_rowcol:
        add, is_causal, _ = _simple_mask(pairs.causal_diag, key_padding, q.dtype, M)
        return _bwd(path, dout, q, k, v, out, lse, add, is_causal, scale)
    t = pairs.tile_rows(q.shape[0])
    dqs, dk, dv = [], None, None
    for i in range(0, M, t):
        rows = slice(i, min(i + t, M))
        add = _additive(pairs.allowed(rows, q.shape[0], key_padding), q.dtype)
        dq_t, dk_t, dv_t = _bwd(path, dout[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows], add,
                                False, scale)
        dqs.append(dq_t)
        acc = torch.promote_types(dk_t.dtype, torch.float32)
        dk = dk_t.to(acc) if dk is None else dk.add_(dk_t)
        dv = dv_t.to(acc) if dv is None else dv.add_(dv_t)
    if len(dqs) == 1:
        return dqs[0], dk_t, dv_t
    return torch.cat(dqs, 2), dk, dv
