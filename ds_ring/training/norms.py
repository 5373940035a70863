"""Lean RMSNorm: the same forward as transformers' Llama-family ``RMSNorm``, keeping less for backward.

transformers' RMSNorm (Llama, Mistral, Qwen2/3 and every model that copies it) computes

    y = weight * (x32 * rsqrt(mean(x32 ** 2, -1) + eps)).to(x.dtype),    x32 = x.to(float32)

as separate ops, so autograd keeps, per norm and token row of h elements: the fp32 upcast of x (in bf16/fp16: a copy,
4 bytes per element) and the normalised input in x's dtype (another full (B, L, h) tensor), besides x itself. At long
sequences that is two to three hidden-sized tensors per norm, two norms per layer, alive through each layer's
recompute and backward (``benchmarks/bench_timeline.py``: 64 MiB at the step's peak at 16k tokens per rank of the
bench shape, fp32). ``rms_norm`` keeps only x (which the layer holds anyway: the layer input or the residual sum)
and one fp32 scale per row, recomputes the normalised input in backward, and runs both passes over tiles of rows so
that their fp32 temporaries are one tile's (Liger's and Apex's fused RMSNorms keep
the same; neither is a dependency here, and their kernels are CUDA-only).

The forward is the same expression in the same precision, so outputs are bit-identical to the module's; gradients
follow autograd's dtypes step by step (the weight gradient in the output's dtype, the normalised input's gradient
rounded to x's dtype as ``.to`` does, the input gradient from fp32), equal to the module's up to rounding.
"""

from __future__ import annotations

import inspect
import textwrap

import torch
from torch import nn

# The forward these norms must have, word for word (transformers' LlamaRMSNorm; models copy it with "Copied from" or
# a modular file, so the text is the same). A norm whose forward differs (Gemma's (1 + weight), a hub kernel, an
# offset, a different cast order) is left as it is.
_REFERENCE_FORWARD = '''
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
'''


def _normalised_source(fn) -> str | None:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    return "\n".join(line.rstrip() for line in src.strip().splitlines() if line.strip())


_REFERENCE = "\n".join(line for line in _REFERENCE_FORWARD.strip().splitlines() if line.strip())


def is_llama_rms_norm(module: nn.Module) -> bool:
    """True when ``module``'s forward is transformers' Llama RMSNorm forward (same text) and it has a ``weight``
    tensor and a float ``variance_epsilon`` (the weight's shape is not read: under ZeRO-3 it may be partitioned here)."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and isinstance(getattr(module, "variance_epsilon", None), float)
            and _normalised_source(type(module).forward) == _REFERENCE)


# Rows per tile: forward and backward run over tiles of about this many elements, so their fp32 temporaries (the
# upcast input, the normalised input, its gradient) are one tile's, not the shard's: measured at 80k tokens per
# ring of 2 (bench_longest --at 81920), an untiled backward's temporaries made the post-attention norm's backward the
# step's peak (5 hidden-sized fp32 tensors above its start).
TILE_ELEMENTS = 1 << 20


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.shape[-1]
        rows = x.reshape(-1, h)
        out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)  # all that is kept besides x
        step = max(1, TILE_ELEMENTS // h)
        for i in range(0, rows.shape[0], step):  # row-wise ops: each row's result does not depend on the tiling
            x32 = rows[i:i + step].to(torch.float32)
            r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            rstd[i:i + step] = r
            out[i:i + step] = weight * (x32 * r).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out.view(*x.shape[:-1], h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        h = x.shape[-1]
        rows, grads = x.reshape(-1, h), grad.reshape(-1, h)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(rows) if want_x else None
        grad_w = torch.zeros(h, dtype=torch.float32, device=x.device) if want_w else None
        step = max(1, TILE_ELEMENTS // h)
        for i in range(0, rows.shape[0], step):
            g, r = grads[i:i + step], rstd[i:i + step]
            n = rows[i:i + step].to(torch.float32) * r  # the normalised input, recomputed
            if want_w:
                # autograd of `weight * n.to(dtype)`: grad * n in the output's dtype, summed over the rows
                grad_w += (g * n.to(x.dtype)).sum(0, dtype=torch.float32)
            if want_x:
                # the normalised input's gradient is rounded to x's dtype (the `.to(input_dtype)` of the forward)
                dn = (g * weight).to(x.dtype).to(torch.float32)
                grad_x[i:i + step] = r * (dn - n * (dn * n).mean(-1, keepdim=True))
        return (None if grad_x is None else grad_x.view_as(x),
                None if grad_w is None else grad_w.to(weight.dtype), None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm of ``x`` (..., h) with ``weight`` (h,), keeping x and a (..., 1) fp32 scale."""
    return _RMSNorm.apply(x, weight, eps)


def lean_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Bound as a norm module's ``forward`` by ``optimize_memory(lean_norms=True)``; runs inside the module's call, so
    ZeRO-3's hooks gather the weight around it as around the original forward."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)
