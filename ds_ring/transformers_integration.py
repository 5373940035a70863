"""Hugging Face integration: ring-dilated attention as a transformers attention implementation.

``import ds_ring`` registers the name ``"ring_dilated"`` with ``transformers.AttentionInterface`` (the attention
function) and with ``transformers.masking_utils.AttentionMaskInterface`` (the mask builder). The mask entry is
``flash_attention_mask``: it hands the attention function this rank's 2D key-padding mask (B, L_local), or None when
nothing is padded. Without a mask entry transformers would pass ``attention_mask=None`` and padding would be lost.

Each rank feeds the model its own shard of input_ids / attention_mask and the GLOBAL position_ids
(``ds_ring.shard_batch`` makes all three). K/V and the padding mask travel around the ring inside
``ds_ring.attention.ring_dilated_attention``.

Settings (group, layout, dilated pattern, local mode) live on each attention module as ``module._ds_ring``, so two
models in one process can use different patterns. A model switched with ``attn_implementation="ring_dilated"`` and
no ``patch`` call uses the defaults: dense pattern over the WORLD group, contiguous layout.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .attention import ring_dilated_attention
from .groups import SequenceParallel
from .sharding import check_layout, group_size_rank, shard_positions

ATTN_IMPLEMENTATION = "ring_dilated"

# kwargs that change the attention result in ways the ring op does not implement.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping (e.g. Gemma2 attn_logit_softcapping)",
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position bias (position_bias)",
    "cu_seq_lens_q": "packed varlen sequences (cu_seq_lens_q)",
    "cu_seq_lens_k": "packed varlen sequences (cu_seq_lens_k)",
}


@dataclass(frozen=True)
class RingSettings:
    """Per-model settings read by the attention function from ``module._ds_ring``."""

    group: dist.ProcessGroup | None = None  # None: WORLD (or a single process when not initialised)
    layout: str = "contiguous"
    segment_lengths: tuple[int, ...] | None = None  # None: dense (exact ring attention)
    dilation_rates: tuple[int, ...] | None = None
    local: bool = False  # True: the rank's tensors are the whole sequence (unsharded eval/generation)


_DEFAULT = RingSettings()


def _model_name(module: nn.Module) -> str:
    return type(module).__name__


def ring_dilated_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. q (B, Hq, L, D), k/v (B, Hkv, Lk, D) -> ((B, L, Hq, D), None).

    ``attention_mask`` is the 2D key-padding mask from ``flash_attention_mask`` (True/1 = real token) or None.
    """
    s: RingSettings = getattr(module, "_ds_ring", _DEFAULT)
    name = _model_name(module)
    for kw, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(kw) is not None:
            raise NotImplementedError(
                f"{name}: {feature} is not supported by ring_dilated attention; use another attn_implementation "
                f"for this model"
            )
    if dropout and dropout > 0:
        raise NotImplementedError(
            f"{name}: attention dropout {dropout} in training is not supported by ring_dilated attention: set the "
            f"config's attention dropout (attention_dropout / attn_pdrop / attention_probs_dropout_prob) to 0"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"{name}: a {attention_mask.dim()}D attention mask reached ring_dilated attention; only the 2D "
            f"(batch, seq) key-padding mask is supported: pass attention_mask as (batch, seq) 0/1"
        )
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    key_padding_mask = None if attention_mask is None else attention_mask.bool()
    world, rank = group_size_rank(s.group)
    local = s.local or world == 1
    lq, lk = query.shape[2], key.shape[2]

    if not local:
        if lq != lk:
            raise NotImplementedError(
                f"{name}: ring attention got {lq} queries for {lk} keys (a KV cache with past tokens); decode on an "
                f"unsharded input under ds_ring.local_attention(model) or patch(model, local=True)"
            )
        _check_global_positions(module, kwargs.get("position_ids"), lq, s, world, rank)
        if key_padding_mask is None:
            # flash_attention_mask gives None on a rank whose shard has no padding while another rank's shard may be
            # padded: every rank must hand the ring the same kind of argument.
            key_padding_mask = torch.ones(key.shape[0], lk, dtype=torch.bool, device=key.device)
    elif lq != lk:
        if lq > lk:
            raise ValueError(f"{name}: {lq} queries for {lk} keys; queries must be the last positions of the keys")
        # Decoding with a KV cache: the queries are the last lq positions of the key sequence. Pad the queries at
        # the front so the op sees one whole sequence (exact for every pattern; costs lk x lk work per step).
        query = torch.nn.functional.pad(query, (0, 0, lk - lq, 0))

    out = ring_dilated_attention(
        query, key, value,
        segment_lengths=s.segment_lengths, dilation_rates=s.dilation_rates, causal=causal,
        key_padding_mask=key_padding_mask, window=sliding_window, scale=scaling,
        group=s.group, layout=s.layout, local=local,
    )  # fmt: skip
    return out[:, :, lk - lq :].transpose(1, 2).contiguous(), None


def _check_global_positions(
    module: nn.Module, position_ids: torch.Tensor | None, local_len: int, s: RingSettings, world: int, rank: int
) -> None:
    """Fail loudly when shards run with the model's default local positions arange(L_local) instead of global ones.

    RoPE and learned position embeddings would silently see wrong positions. Checked once per forward (first layer),
    and agreed over the ring so that every rank raises rather than some waiting in the ring for ever.
    """
    if position_ids is None or getattr(module, "layer_idx", 0) not in (0, None):
        return
    default = torch.arange(local_len, device=position_ids.device)
    expected = shard_positions(local_len, world, rank, s.layout, device=position_ids.device)
    # A rank whose global positions are not arange(L_local) but that got exactly arange(L_local) got no global ones.
    wrong = not torch.equal(expected, default) and torch.equal(position_ids, default.expand_as(position_ids))
    flag = torch.tensor([float(wrong)], device=position_ids.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=s.group)
    if flag.item():
        raise ValueError(
            f"{_model_name(module)}: shards of the ring (world {world}, layout {s.layout!r}) got position_ids = "
            f"arange({local_len}), the model's default for an unsharded input, instead of their global positions; "
            f"pass the position_ids returned by ds_ring.shard_batch"
        )


def _routes_through_interface(cls: type) -> bool:
    # The attention classes that honour attn_implementation look the function up in ALL_ATTENTION_FUNCTIONS.
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that dispatch through transformers' AttentionInterface; error if the model has none."""
    mods = [m for m in model.modules() if _routes_through_interface(type(m))]
    if not mods:
        raise NotImplementedError(
            f"{_model_name(model)}: its attention does not dispatch through transformers.AttentionInterface "
            f"(no module reads ALL_ATTENTION_FUNCTIONS), so ring_dilated attention cannot be plugged in; use a model "
            f"family that supports attn_implementation (Llama, Mistral, Qwen2/3, GPT-2, GPT-NeoX, BERT, ...)"
        )
    for m in mods:
        if getattr(m, "is_cross_attention", False):
            raise NotImplementedError(
                f"{_model_name(model)}: cross-attention ({_model_name(m)}) is not supported by ring_dilated attention"
            )
    return mods


def patch(
    model: nn.Module,
    *,
    sp: SequenceParallel | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    local: bool = False,
) -> nn.Module:
    """Switch ``model`` to ring-dilated attention in place and return it; ``unpatch`` restores it.

    ``sp`` supplies the ring (``sp.group``) and layout (``sp.layout``); ``group``/``layout`` set them directly (WORLD
    and "contiguous" by default). ``segment_lengths``/``dilation_rates`` select a LongNet dilated pattern (None:
    dense, exact attention). ``local=True`` runs exact attention on each rank's tensors as the whole sequence
    (unsharded evaluation / generation); ``ds_ring.local_attention(model)`` does that temporarily.
    """
    if sp is not None:
        if group is not None and group is not sp.group:
            raise ValueError("patch: pass either sp or group, not both (sp.group is the ring)")
        if layout is not None and layout != sp.layout:
            raise ValueError(f"patch: layout={layout!r} disagrees with sp.layout={sp.layout!r}; pass one of them")
        group, layout = sp.group, sp.layout
    layout = layout or "contiguous"
    check_layout(layout)
    if (segment_lengths is None) != (dilation_rates is None):
        raise ValueError("patch: give both segment_lengths and dilation_rates (or neither for the dense pattern)")
    if segment_lengths is not None and len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"patch: segment_lengths {list(segment_lengths)} and dilation_rates {list(dilation_rates)} must have "
            f"the same length"
        )
    mods = _attention_modules(model)
    settings = RingSettings(
        group=group,
        layout=layout,
        segment_lengths=None if segment_lengths is None else tuple(int(x) for x in segment_lengths),
        dilation_rates=None if dilation_rates is None else tuple(int(x) for x in dilation_rates),
        local=local,
    )
    if not hasattr(model, "_ds_ring_previous_attn"):
        model._ds_ring_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for m in mods:
        m._ds_ring = settings
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the attention implementation ``model`` had before ``patch`` and drop the ring settings."""
    if not hasattr(model, "_ds_ring_previous_attn"):
        raise ValueError(f"unpatch: {_model_name(model)} was not patched with ds_ring.patch")
    model.set_attn_implementation(model._ds_ring_previous_attn)
    del model._ds_ring_previous_attn
    for m in model.modules():
        if hasattr(m, "_ds_ring"):
            del m._ds_ring
    return model


@contextlib.contextmanager
def local_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s ring attention treats each rank's input as the whole sequence (exact, no
    communication): for evaluation or ``generate`` on unsharded inputs."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"local_attention: {_model_name(model)} uses attn_implementation="
            f"{model.config._attn_implementation!r}, not {ATTN_IMPLEMENTATION!r}; call ds_ring.patch(model) first"
        )
    mods = _attention_modules(model)
    saved = [getattr(m, "_ds_ring", None) for m in mods]
    for m, s in zip(mods, saved):
        m._ds_ring = replace(s or _DEFAULT, local=True)
    try:
        yield model
    finally:
        for m, s in zip(mods, saved):
            if s is None:
                del m._ds_ring
            else:
                m._ds_ring = s


def register() -> None:
    """Register "ring_dilated" with transformers' attention and mask dispatch (done by ``import ds_ring``)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_dilated_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


register()
