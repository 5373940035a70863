"""The memory planner: per-rank memory of one training step from a model's config, and the longest sequence that fits.

``ds_ring.plan(config, seq_len, sp_size=..., zero_stage=..., device_memory=...)`` and ``ds-ring plan --model ...``.
Every term is derived from the config's shapes (hidden h, intermediate i, layers n, heads, vocabulary V), the ring
(L = S / P local tokens), the dtype (e bytes) and DeepSpeed's own byte accounting, plus four constants measured on
CPU (``benchmarks/bench_longest.py`` checks the whole prediction against measured steps at two model shapes).

A step's peak is the largest of three moments:

* **loss**: the end of forward: everything kept for backward (checkpoints, or every layer's activations) plus the
  loss's working set (full logits path, or the chunked loss's chunk, dL/dx and fp32 dL/dW);
* **layer backward**: the first recomputed layer's backward: checkpoints plus one layer's working set, the largest
  of its RMSNorm backward, attention backward (``ds_ring.memory_estimate``: ring op, ring buffers) and MLP backward;
* **optimizer step**: the optimizer's temporaries.

Under ZeRO-3 the gathered parameters are added to the first two (DeepSpeed keeps a parameter gathered while it is
used again within ``stage3_max_reuse_distance``, so a model under ``stage3_max_live_parameters`` stays gathered for
the whole step; under the memory switch ``ds_ring.deepspeed_initialize`` releases each after use, leaving the LM head
at the loss and one layer in its backward), and the gradient being reduce-scattered to the layer backward.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..op.layouts import get_layout
from ..training.loss import LOSS_CHUNK_ELEMENTS
from .op_memory import KERNELS, memory_estimate

# Measured constants (fp32 on CPU, benchmarks/bench_longest.py fits them; see docs/planner.md):
# bytes per local token and vocabulary entry at the peak of the full-logits loss (the LogSoftmax backward holds the
# fp32 log-probabilities, the incoming gradient and the outgoing one: three V-vectors of 4 bytes).
LOSS_BYTES_PER_LOGIT = 12.0
# fp32 hidden-sized vectors per local token that a checkpointed layer's backward holds beyond the checkpoints, at its
# largest (the input RMSNorm's backward, which runs in fp32: gradient streams, normalised input, pow temporaries).
LAYER_BACKWARD_HIDDEN = 7.8
# The same with lean norms (training/norms.py: no normalised input kept; forward and backward over tiles of rows, so
# their fp32 temporaries are one tile's): one norm's forward + backward alone peaks at 2.25 hidden-sized fp32 tensors
# (the module's: 6; ds_ring.measure_peak_bytes, 16k rows, h = 1024), plus the gradient streams counted in the constant
# above. At the bench_longest shape the MLP phase is the larger one, so the plan's step peak does not depend on it.
LAYER_BACKWARD_HIDDEN_LEAN = 4.0
# Intermediate-sized tensors per token in one MLP tile's recompute + backward (gate, up, activation, product and
# their gradients), and in an untiled MLP's backward beyond its 4 saved ones.
MLP_TILE_INTERMEDIATE = 6.0
MLP_BACKWARD_INTERMEDIATE = 3.0

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder (RMSNorm, RoPE, GQA, gated MLP), read from its config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """``config``: a transformers config, a dict, a config.json path, or a directory holding one."""
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"plan: no model config at {str(config)!r}: pass a config.json or a directory "
                                        "holding one (nothing is downloaded)")
            config = json.loads(path.read_text())
        if not isinstance(config, dict):
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            config = text.to_dict()
        config = config.get("text_config", config)
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in config]
        if missing:
            raise ValueError(f"plan: the config lacks {missing}; the planner models Llama-style decoders (Llama, "
                             "Mistral, Qwen2/3), whose configs have these keys")
        h, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(hidden=h, intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
                   heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or h // heads, vocab=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)))

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one training step. ``persistent``: held between steps (ZeRO partitions); ``step``: the
    terms at the step's peak moment ``peak_phase``; ``phases``: the step's bytes at each moment; ``host``: what
    offloading puts in host memory."""

    shape: ModelShape
    seq_len: int
    sp_size: int
    dp_size: int
    batch_size: int
    zero_stage: int
    dtype: str
    options: dict[str, Any]
    persistent: dict[str, int]
    moments: dict[str, dict[str, int]]
    host: dict[str, int]
    device_memory: int | None = None
    count_held: bool = True
    longest_seq_len: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def phases(self) -> dict[str, int]:
        """The step's bytes at each moment (above what is held between steps)."""
        return {k: sum(v.values()) for k, v in self.moments.items()}

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.get)

    @property
    def step_peak_bytes(self) -> int:
        """The most one step adds to what is held between steps."""
        return max(self.phases.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.persistent.values()) + self.step_peak_bytes

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return (self.total_bytes if self.count_held else self.step_peak_bytes) <= self.device_memory

    def table(self) -> str:
        """The breakdown as text, as ``ds-ring plan`` prints it."""
        g = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        s = self.shape
        on = [k for k in ("checkpointing", "chunked_loss", "tiled_mlp", "offload_checkpoints", "lean_norms")
              if self.options[k]]
        lines = [
            f"model: hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, {s.heads} heads / "
            f"{s.kv_heads} KV heads of {s.head_dim}, vocabulary {s.vocab}{' (tied)' if s.tied else ''}: "
            f"{s.params / 1e9:.3g}B parameters",
            f"ring of {self.sp_size} ranks x {self.dp_size} data-parallel, ZeRO-{self.zero_stage}, {self.dtype}, "
            f"batch {self.batch_size}, sequence {self.seq_len:,} tokens ({self.seq_len // self.sp_size:,} per rank); "
            f"memory options: {', '.join(on) or 'none'}",
            "",
            "GiB per rank, held between steps:",
        ]
        lines += [f"  {k:<44}{g(v):>8}" for k, v in self.persistent.items()]
        names = list(self.moments)
        rows = list(dict.fromkeys(k for m in self.moments.values() for k in m))
        lines += ["", f"GiB per rank, one step (peak: {self.peak_phase}):"]
        lines += [f"  {'':<44}" + "".join(f"{n:>16}" for n in names)]
        for r in rows:
            if any(self.moments[n].get(r) for n in names):
                lines.append(f"  {r:<44}" + "".join(f"{g(self.moments[n][r]) if r in self.moments[n] else '':>16}"
                                                    for n in names))
        lines.append(f"  {'step total':<44}" + "".join(f"{g(v):>16}" for v in self.phases.values()))
        verdict = ""
        if self.device_memory is not None:
            used = self.total_bytes if self.count_held else self.step_peak_bytes
            verdict = (f"   ({'held + step' if self.count_held else 'step'} {g(used)} of {g(self.device_memory)}: "
                       f"{'fits' if used <= self.device_memory else 'DOES NOT FIT'})")
        lines += ["", f"  {'total (held + step peak)':<44}{g(self.total_bytes):>8}{verdict}"]
        if any(self.host.values()):
            lines += ["  in host memory: " + ", ".join(f"{k} {g(v)}" for k, v in self.host.items() if v)]
        if self.longest_seq_len is not None:
            lines += ["", f"longest sequence that fits {g(self.device_memory)} GiB per rank: "
                      f"{self.longest_seq_len:,} tokens ({self.longest_seq_len // self.sp_size:,} per rank)"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def parse_bytes(text: str | int | float) -> int:
    """``"80GB"`` (10^9), ``"80GiB"`` (2^30), ``"512MiB"``, ``"2e9"`` or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", text)
    if not m:
        raise ValueError(f"device memory {text!r} is not a size like 80GB, 80GiB or 2147483648")
    unit = m.group(2) or "B"
    scale = 1 if unit == "B" else (2 ** (10 * "KMGT".index(unit[0]) + 10) if "i" in unit
                                   else 10 ** (3 * "KMGT".index(unit[0]) + 3))
    return int(float(m.group(1)) * scale)


def _zero_settings(ds_config: Any) -> dict[str, Any]:
    """What the planner reads from a DeepSpeed config (path or dict)."""
    if ds_config is None:
        return {}
    if not isinstance(ds_config, dict):
        ds_config = json.loads(Path(ds_config).read_text())
    z = ds_config.get("zero_optimization", {})
    out = {"zero_stage": z.get("stage", 0),
           "offload_optimizer": z.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"),
           "offload_params": z.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")}
    for key, name in (("reduce_bucket_size", "reduce_bucket_size"),
                      ("stage3_max_live_parameters", "max_live_parameters")):
        if isinstance(z.get(key), (int, float)):
            out[name] = int(z[key])
    if ds_config.get("bf16", {}).get("enabled") is True:
        out["dtype"] = "bf16"
    elif ds_config.get("fp16", {}).get("enabled") is True:
        out["dtype"] = "fp16"
    return out


def plan(
    config: Any,
    seq_len: int | None = None,
    *,
    sp_size: int = 1,
    dp_size: int = 1,
    zero_stage: int | None = None,
    device_memory: int | str | None = None,
    dtype: str | None = None,
    batch_size: int = 1,
    checkpointing: bool = True,
    chunked_loss: bool = True,
    tiled_mlp: bool = True,
    offload_checkpoints: bool = False,
    lean_norms: bool = True,
    offload_optimizer: bool | None = None,
    offload_params: bool | None = None,
    ds_config: Any = None,
    layout: str = "zigzag",
    loss_chunk_tokens: int | None = None,
    mlp_chunk_tokens: int | None = None,
    reduce_bucket_size: int | None = None,
    max_live_parameters: int | None = None,
    release_parameters: bool | None = None,
    kernels: str = "cpu",
    count_held: bool = True,
) -> MemoryPlan:
    """Per-rank memory of one training step (forward, backward, optimizer step) of a causal LM under ds_ring.

    ``config``: the model's transformers config (object, dict, config.json path or directory). ``seq_len``: tokens
    per sequence over the ring of ``sp_size`` ranks; None: the longest that fits ``device_memory``. The memory
    options mirror ``ds_ring.optimize_memory`` (all on by default; ``offload_checkpoints`` is its ``offload`` on an
    accelerator). ZeRO settings come from the arguments, else from ``ds_config`` (a DeepSpeed config: stage,
    offload, bf16, bucket sizes), else ZeRO-3 in bf16 with DeepSpeed's defaults. AdamW is assumed.
    ``count_held=False``: ``device_memory`` caps what one step adds above the memory held between steps (how the CPU
    benchmark measures), not the whole. ``release_parameters``: ZeRO-3 releases each gathered parameter after use
    (what ``ds_ring.deepspeed_initialize`` sets under the memory switch); None: on when any memory option is on.
    ``kernels``: the attention kernel's constants, ``"cpu"`` (measured) or ``"cuda"`` (flash / FlexAttention, counted
    and UNVERIFIED); the RMSNorm and MLP constants are the same on both (transformers' unfused modules; measured on
    CPU only). The plan's notes say which were used.
    """
    shape = ModelShape.from_config(config)
    zs = _zero_settings(ds_config)
    zero_stage = zs.get("zero_stage", 3) if zero_stage is None else zero_stage
    dtype = dtype or zs.get("dtype", "bf16")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"plan: dtype {dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"plan: zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if sp_size < 1 or dp_size < 1 or batch_size < 1:
        raise ValueError("plan: sp_size, dp_size and batch_size must be >= 1")
    if seq_len is None and device_memory is None:
        raise ValueError("plan: give seq_len, device_memory, or both")
    if kernels not in KERNELS:
        raise ValueError(f"plan: kernels must be one of {sorted(KERNELS)}, got {kernels!r}")
    settings = dict(
        shape=shape, sp_size=sp_size, dp_size=dp_size, batch_size=batch_size, zero_stage=zero_stage, dtype=dtype,
        e=_DTYPE_BYTES[dtype],
        options=dict(checkpointing=checkpointing, chunked_loss=chunked_loss, tiled_mlp=tiled_mlp,
                     offload_checkpoints=offload_checkpoints, lean_norms=lean_norms),
        offload_optimizer=zs.get("offload_optimizer", False) if offload_optimizer is None else offload_optimizer,
        offload_params=zs.get("offload_params", False) if offload_params is None else offload_params,
        loss_chunk=loss_chunk_tokens or max(1, LOSS_CHUNK_ELEMENTS // shape.vocab),
        mlp_chunk=mlp_chunk_tokens or shape.hidden,
        reduce_bucket_size=reduce_bucket_size or zs.get("reduce_bucket_size", 500_000_000),
        max_live_parameters=max_live_parameters or zs.get("max_live_parameters", 1_000_000_000),
        release_parameters=(checkpointing or chunked_loss or tiled_mlp or offload_checkpoints or lean_norms)
        if release_parameters is None else release_parameters,
        kernels=kernels,
    )
    grain = get_layout(layout).divisor(sp_size)
    limit = None if device_memory is None else parse_bytes(device_memory)
    longest = None
    if limit is not None:
        longest = _longest(settings, grain, limit, count_held)
        if seq_len is None:
            if longest == 0:
                base = _plan_at(settings, grain)
                raise ValueError(f"plan: not even {grain} tokens fit {limit / 2**30:.2f} GiB per rank (the model "
                                 f"states alone take {sum(base.persistent.values()) / 2**30:.2f} GiB): use more ranks, "
                                 "a higher ZeRO stage or offloading")
            seq_len = longest
    if seq_len % grain:
        raise ValueError(f"plan: seq_len={seq_len} must be a multiple of {grain} (sp_size={sp_size}, "
                         f"layout={layout!r})")
    return replace(_plan_at(settings, seq_len), device_memory=limit, count_held=count_held, longest_seq_len=longest)


def _longest(settings: dict, grain: int, limit: int, count_held: bool) -> int:
    """Largest multiple of ``grain`` whose plan fits ``limit`` (0 if none): the step's bytes grow with S."""
    def fits(k: int) -> bool:
        p = _plan_at(settings, k * grain)
        return (p.total_bytes if count_held else p.step_peak_bytes) <= limit

    if not fits(1):
        return 0
    hi = 2
    while fits(hi):
        hi *= 2
        if hi > 2**40:
            raise ValueError("plan: the step's memory does not grow with the sequence length")
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * grain


def _plan_at(st: dict, seq_len: int) -> MemoryPlan:
    """The plan of ``st`` (``plan``'s settings) at ``seq_len``: what is held between steps, then the step's three
    moments, each built from the layer's activation sizes."""
    s: ModelShape = st["shape"]
    persistent, host = _held_between_steps(st)
    a = _Activations.of(st, seq_len)
    kept, offloaded = _kept_for_backward(st, a)
    if st["options"]["checkpointing"]:
        host["checkpoints"] = offloaded
    if st["zero_stage"] != 3:
        gathered = gathered_layer = 0
    elif st["release_parameters"]:  # released after each use: only the module at work (LM head; one layer)
        gathered = s.vocab * s.hidden * a.e
        gathered_layer = (s.params - s.vocab * s.hidden * (1 if s.tied else 2) - s.hidden) // s.layers * a.e
    else:  # kept while reused within stage3_max_reuse_distance: the whole model under max_live_parameters
        gathered = gathered_layer = min(s.params, st["max_live_parameters"]) * a.e
    at_loss = {**kept, "final norm": a.norm_post, **_loss(st, a), "ZeRO-3 gathered parameters": gathered}
    parts = _layer_backward_parts(st, a)
    at_layer = _at_layer_backward(st, a, kept, parts, gathered_layer)
    part = s.params // (st["sp_size"] * st["dp_size"]) if st["zero_stage"] >= 1 else s.params
    at_end = _at_backward_end(st, a)
    at_step = {"optimizer step temporaries": 0 if st["offload_optimizer"] else 2 * 4 * part}  # AdamW's, in fp32

    notes = ["one layer's backward, the largest part counts: " + ", ".join(
        f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items())
        + (f"; attention includes {a.att.ring_buffer_bytes / 2**20:,.0f} MiB of K/V ring buffers"
           if st["sp_size"] > 1 else "")]
    notes.append(f"attention kernel constants: {KERNELS[st['kernels']].source}; RMSNorm and MLP constants: "
                 "measured on CPU" + (" (UNVERIFIED on a GPU)" if st["kernels"] != "cpu" else ""))
    if st["options"]["offload_checkpoints"]:
        notes.append("checkpoint offload acts on an accelerator only (DeepSpeed skips host tensors)")
    return MemoryPlan(shape=s, seq_len=seq_len, sp_size=st["sp_size"], dp_size=st["dp_size"],
                      batch_size=st["batch_size"], zero_stage=st["zero_stage"], dtype=st["dtype"],
                      options=st["options"], persistent=persistent,
                      moments={"loss": at_loss, "layer backward": at_layer,
                               **({"backward end": at_end} if at_end else {}), "optimizer step": at_step},
                      host=host, notes=tuple(notes))


def _held_between_steps(st: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(device, host) bytes held between steps: DeepSpeed's accounting (its estimators: 2 bytes 16-bit params,
    2 + 4 gradients, 4 fp32 master params, 8 Adam moments; in fp32 the params are the 4-byte copy and there are no
    16-bit grads), partitioned by the ZeRO stage over every rank (ds_ring's mpu: the sequence-data-parallel group)."""
    e, psi, stage = st["e"], st["shape"].params, st["zero_stage"]
    N = st["sp_size"] * st["dp_size"]
    param_b = e * psi
    grad_b = (4 if e == 4 else e + 4) * psi
    optim_b = 12 * psi  # fp32 master copy + two Adam moments
    params_rank = param_b // N if stage == 3 else param_b
    grads_rank = grad_b // N if stage >= 2 else grad_b
    optim_rank = optim_b // N if stage >= 1 else optim_b
    off_p, off_o = st["offload_params"], st["offload_optimizer"]  # offloaded optimizer: its gradients go too
    persistent = {
        "parameters": 0 if off_p else params_rank,
        "gradients": 0 if off_o else grads_rank,
        "optimizer states (fp32 master + Adam)": 0 if off_o else optim_rank,
    }
    if stage >= 2:
        persistent["gradient reduce bucket"] = min(st["reduce_bucket_size"], psi) * e
    host = {"parameters": params_rank if off_p else 0, "gradients": grads_rank if off_o else 0,
            "optimizer states": optim_rank if off_o else 0}
    return persistent, host


@dataclass(frozen=True)
class _Activations:
    """Bytes of one decoder layer's tensors on this rank's shard of T local tokens."""

    T: int  # local tokens (batch x seq_len / P)
    e: int  # bytes per element of the model's dtype
    u: int  # one hidden-sized tensor of the shard
    norm_in: int  # what the input RMSNorm keeps for backward
    norm_post: int  # what the post-attention RMSNorm keeps (its input, the residual sum, is a tensor of its own)
    o_in: int  # o_proj's input
    mlp_saved: int  # what the MLP keeps (0 when tiled: TiledMLP keeps only its input)
    att: Any  # the ring op's MemoryEstimate

    @property
    def norms(self) -> int:
        """Per layer, besides attention and MLP."""
        return self.norm_in + self.norm_post + self.o_in

    @classmethod
    def of(cls, st: dict, seq_len: int) -> _Activations:
        s: ModelShape = st["shape"]
        e, P = st["e"], st["sp_size"]
        T = st["batch_size"] * seq_len // P
        u = T * s.hidden * e
        # RMSNorm (computed in fp32) keeps its normalised input and its output (the next matmul's input), plus an
        # fp32 copy of its input in half precision; the input norm's input is the layer input (the checkpoint).
        # Lean norms (training/norms.py) keep only the output and one fp32 scale per token.
        if st["options"]["lean_norms"]:
            norm_in = T * s.hidden * e + T * 4
        else:
            norm_in = T * s.hidden * (2 * e + (4 if e != 4 else 0))
        att = memory_estimate(seq_len, st["batch_size"], s.heads, s.head_dim, P, num_kv_heads=s.kv_heads,
                              dtype=_torch_dtype(e), communicates=P > 1, kernels=st["kernels"])
        mlp_saved = 0 if st["options"]["tiled_mlp"] else 4 * T * s.intermediate * e  # gate, up, act, product
        return cls(T, e, u, norm_in, norm_in + u, T * s.heads * s.head_dim * e, mlp_saved, att)


def _kept_for_backward(st: dict, a: _Activations) -> tuple[dict[str, int], int]:
    """What the layers keep for backward on the device, and the checkpoints offloaded to the host."""
    n = st["shape"].layers
    if st["options"]["checkpointing"]:
        on_device = min(n, 3) if st["options"]["offload_checkpoints"] else n  # DeepSpeed keeps the newest on device
        return {"checkpoints": on_device * a.u}, (n - on_device) * a.u
    # every layer's activations; in fp32 the input norm keeps the layer input itself
    return {"saved activations: attention": n * a.att.saved_bytes, "saved activations: MLP": n * a.mlp_saved,
            "saved activations: norms, projections": n * (a.norms + (a.u if a.e == 4 else 0))}, 0


def _loss(st: dict, a: _Activations) -> dict[str, int]:
    """The loss's working set at the end of forward: the chunked loss's chunk, dL/dx and fp32 dL/dW, or the full
    logits path."""
    V, h = st["shape"].vocab, st["shape"].hidden
    if st["options"]["chunked_loss"]:
        c = min(a.T, st["loss_chunk"])
        return {"logits / loss (chunk, dL/dx, fp32 dL/dW)": a.u + 4 * V * h + c * V * (8 + (a.e if a.e != 4 else 0))}
    return {"logits / loss (full logits and gradient)": int(LOSS_BYTES_PER_LOGIT * a.T * V)}


def _layer_backward_parts(st: dict, a: _Activations) -> dict[str, int]:
    """The working set of each part of one layer's backward (the recomputed one, under checkpointing)."""
    i, T = st["shape"].intermediate, a.T
    grad_stream = 2 * a.u  # the gradient of the residual stream, and of the branch being differentiated
    # the op's backward peak holds its out and lse already; of what autograd saved, q, k, v and the mask remain
    att_phase = (a.norm_in + a.o_in + a.att.saved_bytes - a.att.output_bytes + a.att.backward_peak_bytes
                 + grad_stream)
    mlp_base = a.norms + a.att.saved_bytes + grad_stream
    if st["options"]["tiled_mlp"]:
        mlp_phase = mlp_base + int(MLP_TILE_INTERMEDIATE * min(T, st["mlp_chunk"]) * i * a.e)
    else:
        mlp_phase = mlp_base + a.mlp_saved + int(MLP_BACKWARD_INTERMEDIATE * T * i * a.e)
    hidden_vectors = LAYER_BACKWARD_HIDDEN_LEAN if st["options"]["lean_norms"] else LAYER_BACKWARD_HIDDEN
    norm_phase = int(hidden_vectors * T * st["shape"].hidden * 4)
    return {"attention (ring op)": att_phase, "MLP": mlp_phase, "RMSNorm": norm_phase}


def _at_layer_backward(st: dict, a: _Activations, kept: dict[str, int], parts: dict[str, int],
                       gathered: int) -> dict[str, int]:
    """The moment of one layer's backward: what is kept (without checkpointing, the other layers' activations),
    the largest part's working set, ZeRO-3's gathered parameters and the gradient being reduce-scattered."""
    s: ModelShape = st["shape"]
    n = s.layers
    if not st["options"]["checkpointing"]:  # the other layers' activations are still held
        kept = {k: v * (n - 1) // n for k, v in kept.items()}
    name, working = max(parts.items(), key=lambda kv: kv[1])
    # The gradient being reduce-scattered: the largest module's, plus, when ZeRO-3 flushes its reduce bucket inside a
    # layer's backward, the bucket's worth of gradients in flight (read off benchmarks/bench_timeline.py at 16k
    # tokens: the first layer's MLP backward holds 283 MiB more than the second's, a 50M-element fp32 bucket and the
    # LM head's gradient arriving into it). When the bucket fills only at the embedding, the flush is a moment of
    # its own (_at_backward_end) and a layer's backward holds its largest module's gradient only.
    if st["zero_stage"] != 3:
        largest_grad = 0
    elif _bucket_flushes_in_layers(st):
        largest_grad = (max(s.vocab * s.hidden, s.hidden * s.intermediate)
                        + min(st["reduce_bucket_size"], s.params)) * a.e
    else:
        largest_grad = s.hidden * s.intermediate * a.e
    return {**kept, "layer backward: " + name: working, "ZeRO-3 gathered parameters": gathered,
            "gradient being reduced": largest_grad}


def _bucket_flushes_in_layers(st: dict) -> bool:
    """Whether ZeRO-3's reduce bucket first fills inside the decoder layers' backward: gradients arrive in backward
    order, the LM head's (untied), then each layer's, then the embedding's (and a tied head's, ready only then)."""
    s: ModelShape = st["shape"]
    head = 0 if s.tied else s.vocab * s.hidden
    layers = s.params - s.vocab * s.hidden * (1 if s.tied else 2) - s.hidden
    return head + layers >= st["reduce_bucket_size"]


def _at_backward_end(st: dict, a: _Activations) -> dict[str, int] | None:
    """The embedding's backward under ZeRO-3 when the reduce bucket first fills there (the checkpoints are spent):
    the embedding's gradient arriving and the bucket flushed, a flattened copy and the reduce-scatter's buffer of
    min(bucket, Ψ) elements each. Measured (benchmarks/bench_timeline.py, hidden 512, 4 layers, 32k vocabulary,
    16k tokens at P=2: Ψ = 44M < the 50M bucket): +402 MiB there, the step's peak; 62.5 + 2 x 169 MiB. None when
    the bucket flushes inside the layers (counted in their backward) or without ZeRO-3."""
    s: ModelShape = st["shape"]
    if st["zero_stage"] != 3 or _bucket_flushes_in_layers(st):
        return None
    return {"gradient being reduced (bucket flush)":
            (s.vocab * s.hidden + 2 * min(st["reduce_bucket_size"], s.params)) * a.e}


def _torch_dtype(e: int):
    import torch

    return torch.float32 if e == 4 else torch.bfloat16
