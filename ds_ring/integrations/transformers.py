"""Hugging Face integration: ring-dilated attention as a transformers attention implementation.

``import ds_ring`` registers the name ``"ring_dilated"`` with ``transformers.AttentionInterface`` (the attention
function) and with ``transformers.masking_utils.AttentionMaskInterface`` (the mask builder, which hands the attention
function this rank's 2D key-padding mask (B, L_local) or None). Without a mask entry transformers would pass
``attention_mask=None`` and padding would be lost.

Each rank feeds the model its own shard of input_ids / attention_mask and the GLOBAL position_ids
(``ds_ring.shard_batch`` makes all three). K/V and the padding mask travel around the ring inside
``ds_ring.op.attention.ring_dilated_attention``.

``patch`` puts the settings (group, layout, dilated pattern, local mode) on the model's modules as ``_ds_ring``, so
two models in one process can use different patterns, and installs a forward pre-hook that runs the ring's
agreement ONCE per model forward (shapes, options, global positions, which shards are padded) and passes its facts to
every attention layer through the forward's keyword arguments (``ds_ring_facts``), which transformers hands down to
the attention function and gradient checkpointing replays. A model switched with ``attn_implementation=
"ring_dilated"`` and no ``patch`` call uses the defaults (dense pattern over the WORLD group, contiguous layout) and
agrees once per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..op.agreement import RingFacts, agree, code, exchange
from ..op.attention import ring_dilated_attention
from ..op.comm import group_size_rank
from ..op.documents import (
    DECREASE,
    PACKING_KEYS,
    agreement_fields,
    document_ids_from,
    from_agreement,
    local_documents,
)
from ..op.layouts import get_layout
from ..op.ulysses import gather_block
from ..parallel.groups import SequenceParallel

ATTN_IMPLEMENTATION = "ring_dilated"
FACTS_KWARG = "ds_ring_facts"  # the forward kwarg that carries the agreement down to the attention layers

# kwargs that change the attention result in ways the ring op does not implement.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping (e.g. Gemma2 attn_logit_softcapping)",
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position bias (position_bias)",
}
# Packed rows are read by patch()'s forward hook (or shard_batch); reaching the attention function they were missed.
_PACKING_KWARGS_LATE = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "document_ids")


@dataclass(frozen=True)
class RingSettings:
    """Per-model settings read by the attention function from ``module._ds_ring``."""

    group: dist.ProcessGroup | None = None  # None: WORLD (or a single process when not initialised)
    layout: str = "contiguous"
    segment_lengths: tuple[int, ...] | None = None  # None: dense (exact ring attention)
    dilation_rates: tuple[int, ...] | None = None
    local: bool = False  # True: the rank's tensors are the whole sequence (unsharded eval/generation)
    ulysses_group: dist.ProcessGroup | None = None  # two-dimensional: this rank's Ulysses group; group is the ring

    def __deepcopy__(self, memo):  # immutable, and process groups are handles: a copied model shares its ring
        return self


_DEFAULT = RingSettings()


def _model_name(module: nn.Module) -> str:
    return type(module).__name__


def ring_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask builder for "ring_dilated": the 2D key-padding mask (B, kv_length) bool, or None without one.

    Unlike transformers' ``flash_attention_mask`` it does not test ``mask.all()`` (a host sync per mask): which
    shards are padded is decided once per forward by the agreement.
    """
    return None if attention_mask is None else attention_mask[:, -kv_length:]


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

    ``attention_mask`` is the 2D key-padding mask from ``ring_mask`` (True = real token) or None. Lk > L only in
    local mode (decoding with a KV cache: the queries are the keys' last positions).
    """
    s: RingSettings = getattr(module, "_ds_ring", _DEFAULT)
    name = _model_name(module)
    for kw, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(kw) is not None:
            raise NotImplementedError(
                f"{name}: {feature} is not supported by ring_dilated attention; use another attn_implementation "
                f"for this model"
            )
    late = [kw for kw in _PACKING_KWARGS_LATE if kwargs.get(kw) is not None]
    if late:
        raise NotImplementedError(
            f"{name}: packed-row kwargs {late} reached ring_dilated attention without being read: call "
            f"ds_ring.patch(model) (its forward hook turns them into document boundaries) and pass them to the "
            f"model's forward"
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
    facts: RingFacts | None = kwargs.get(FACTS_KWARG)
    local = _is_local(s)
    if not local and query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"{name}: ring attention got {query.shape[2]} queries for {key.shape[2]} keys (a KV cache with past "
            f"tokens); decode on an unsharded input under ds_ring.local_attention(model) or patch(model, local=True)"
        )
    if not local and facts is None and key_padding_mask is None:
        # Agreed per call (no pre-hook): every rank must hand the op the same kind of argument, and ring_mask gives
        # None on a rank without a 2D mask. (With the forward's facts, a rank without padding may pass None.)
        key_padding_mask = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    out = ring_dilated_attention(
        query, key, value,
        segment_lengths=s.segment_lengths, dilation_rates=s.dilation_rates, causal=causal,
        key_padding_mask=key_padding_mask, window=sliding_window, scale=scaling,
        group=s.group, layout=s.layout, local=local, facts=facts, ulysses_group=s.ulysses_group,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _forward_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if x is None else x


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a patched model: decide the ring's facts once for the whole forward (one collective, one
    host sync; a second small exchange for packed rows) and pass them to every attention layer as the
    ``ds_ring_facts`` keyword argument. Packed documents come as ``document_ids`` (from ``ds_ring.shard_batch``) or,
    on one rank, as transformers passes them: restarting ``position_ids`` (no cache), ``seq_idx`` or
    ``cu_seq_lens_*``; these keys are consumed here."""
    s: RingSettings = model._ds_ring
    x = _forward_input(args, kwargs)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or FACTS_KWARG in kwargs:
        return None
    B, L = x.shape[:2]
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    packing = {k: kwargs.pop(k) for k in PACKING_KEYS if k in kwargs}
    if _is_local(s):
        two_d = isinstance(mask, torch.Tensor) and mask.dim() == 2
        no_cache = kwargs.get("past_key_values") is None
        ids = document_ids_from({**packing, "position_ids": position_ids if no_cache else None}, (B, L))
        who = f"{_model_name(model)} under ring_dilated attention"
        docs = None if ids is None else local_documents(ids, get_layout("contiguous"), who)
        # with a KV cache the keys are the mask's columns (past + new tokens)
        facts = RingFacts(1, B, mask.shape[1] if two_d else L, (two_d and not bool(mask.all()),), docs)
    else:
        facts = _agree_forward(model, s, x, B, L, mask, position_ids, packing)
    kwargs[FACTS_KWARG] = facts
    return args, kwargs


def _ulysses(s: RingSettings) -> tuple[int, int]:
    """(u, this rank's index) in the Ulysses group; (1, 0) without one."""
    if s.ulysses_group is None:
        return 1, 0
    return dist.get_world_size(s.ulysses_group), dist.get_rank(s.ulysses_group)


def _is_local(s: RingSettings) -> bool:
    """The rank's tensors are the whole sequence: local mode, or a "ring" of one rank without Ulysses."""
    return s.local or (group_size_rank(s.group)[0] == 1 and _ulysses(s)[0] == 1)


def _agree_forward(model, s: RingSettings, x, B, L, mask, position_ids, packing) -> RingFacts:
    """The ring's agreement for one model forward: equal shapes, model and settings on every rank; which shards are
    padded; where packed documents begin and end; and whether a shard runs with the model's default local positions
    arange(L) instead of global ones (RoPE and learned position embeddings would silently see wrong positions).

    Two-dimensional: first inside the Ulysses group (its verdict is returned, not raised; then the block's mask and
    document ids are gathered once for the forward), then over the ring with that verdict, so a bad rank anywhere
    makes every rank raise."""
    name = _model_name(model)
    who = f"{name} under ring_dilated attention"
    ids = packing.get("document_ids")
    (ring, r), (u, j) = group_size_rank(s.group), _ulysses(s)
    world, rank = ring * u, r * u + j  # this rank on the sequence-parallel grid
    lay = get_layout(s.layout, u)
    errs = []
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L)):
        errs.append(f"attention_mask must be this rank's (batch, local_len) = {(B, L)} 0/1 key-padding mask, got "
                    f"{tuple(getattr(mask, 'shape', ()))}")
    if set(packing) - {"document_ids"}:
        errs.append(f"{sorted(set(packing) - {'document_ids'})} describe the whole packed row: pass the batch "
                    "through ds_ring.shard_batch, which turns them into this shard's document_ids")
    if ids is not None and (not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (B, L)):
        errs.append(f"document_ids must be this rank's (batch, local_len) = {(B, L)} ids from ds_ring.shard_batch")
    if ids is not None and position_ids is None:
        errs.append("packed rows need their restarting position_ids: pass the position_ids ds_ring.shard_batch "
                    "returns")
    err = lay.local_len_error(L, world)
    if err:
        errs.append(err)
    # Flags are computed on the device and read with the agreement. A rank whose global positions are not
    # arange(L) but that got arange(L) (or nothing: the model then uses arange(L)) got no global ones; positions
    # that restart inside one of its ranges without document_ids are packed rows that bypassed shard_batch.
    wrong = restart = 0
    if not err and ids is None:
        ranges = lay.ranges(L, world, rank)
        if ranges != [(0, L)]:
            wrong = 1 if position_ids is None else (position_ids == torch.arange(L, device=position_ids.device)).all()
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == L:
            jumps = position_ids[:, 1:] - position_ids[:, :-1] != 1
            at = 0
            for a, b in ranges[:-1]:  # a jump between two ranges of the layout is no restart
                at += b - a
                jumps[:, at - 1] = False
            restart = jumps.any()
    param = next(model.parameters(), None)
    same = {"batch": B, "local_len": L, "model, config and ring settings": model._ds_ring_fingerprint,
            "parameter dtype / autocast": (str(getattr(param, "dtype", None)),
                                           torch.is_autocast_enabled(x.device.type)),
            "has document_ids": int(ids is not None)}
    flags = {"default position_ids": wrong, "restarting position_ids": restart}
    block_len, block_mask = L, mask
    if u > 1:
        errs, rows = exchange(s.ulysses_group, errors=errs, same={**same, "has attention_mask": int(mask is not None)},
                              mine=flags, device=x.device, scope="Ulysses group")
        flags = {k: max(row[k] for row in rows) for k in flags}  # the group's, carried to the ring
        if not errs:
            block_len = u * L
            block_mask = None if mask is None else gather_block(mask.bool(), s.ulysses_group, u)
            ids = None if ids is None else gather_block(ids, s.ulysses_group, u)
    ring_lay = get_layout(s.layout)
    # every rank sends the same keys (the row's size must not depend on the inputs); values default to 0
    mine, vectors = {"padded": (block_mask == 0).any() if isinstance(block_mask, torch.Tensor) and not errs else 0,
                     **flags, DECREASE: 0}, {}
    if ids is not None and not errs:
        doc_mine, vectors = agreement_fields(ids, ring_lay.chunks_per_rank)
        mine.update(doc_mine)
    rows = agree(s.group, who=who, errors=errs, same=same, mine=mine, device=x.device, vectors=vectors)
    for flag, why in (("default position_ids", f"got position_ids = arange({L}), the model's default for an "
                       "unsharded input, instead of their global positions"),
                      ("restarting position_ids", "got position_ids that restart inside the shard (packed "
                       "documents?) but no document_ids")):
        where = [p for p, row in enumerate(rows) if row[flag]]
        if where:
            raise ValueError(f"{name}: shards of the ring (world {world}, layout {lay.name!r}) {why} (ring "
                             f"position(s) {where}); pass the batch through ds_ring.shard_batch and the model the "
                             "position_ids (and document_ids) it returns")
    docs = None if ids is None else from_agreement(rows, ids, ring_lay, block_len, who)
    block_mask = None if u == 1 or block_mask is None else block_mask.bool()
    return RingFacts(ring, B, block_len, tuple(bool(row["padded"]) for row in rows), docs, block_mask)


def _fingerprint(model: nn.Module, s: RingSettings) -> int:
    """Equal on two ranks iff they run the same model class, config and ring settings: then every layer's shapes and
    options agree too, which is what lets the layers skip their own agreement."""
    return code((type(model).__name__, model.config.to_json_string(use_diff=False), s.layout, s.segment_lengths,
                 s.dilation_rates, _ulysses(s)[0]))


# Token mixers that carry state along the sequence. Run shard by shard they would silently see only their shard,
# so a model holding any is refused. layer_types names them in the config (Qwen3-Next "linear_attention",
# Falcon-H1 "hybrid", ...); module classes catch the rest (Mamba/Jamba/Bamba/Zamba mixers, gated delta nets, short
# convolutions). torch's nn.Conv1d runs along the sequence (GPT-2's Conv1D is a linear layer, another class).
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "attention", "global", "local"}
_RECURRENT_CLASS_WORDS = ("Mamba", "Mixer", "DeltaNet", "LinearAttention", "ShortConv", "Rwkv", "RWKV", "Recurrent",
                          "Retention", "SSM")


def _non_attention_mixers(model: nn.Module) -> list[str]:
    found = []
    for cfg in [model.config, *(getattr(model.config, k, None) for k in ("text_config",))]:
        types = getattr(cfg, "layer_types", None) or []
        found += sorted({f"layer_types '{t}'" for t in types if t not in _ATTENTION_LAYER_TYPES})
    names = {type(m).__name__ for m in model.modules()}
    found += sorted(n for n in names if any(w in n for w in _RECURRENT_CLASS_WORDS))
    if "Conv1d" in names:
        found.append("Conv1d (a convolution along the sequence)")
    return found


def _check_supported(model: nn.Module) -> None:
    """transformers' own answer to "can this model take a registered attention function?", and what the ring op
    does not implement."""
    mixers = _non_attention_mixers(model)
    if mixers:
        raise NotImplementedError(
            f"{_model_name(model)}: not all of its token mixers are attention ({', '.join(mixers)}): layers that "
            f"carry state along the sequence (linear attention, Mamba, convolutions) would run on each shard alone "
            f"and give wrong results, so ds_ring refuses the model; use a model whose layers are all attention"
        )
    supported = getattr(type(model), "is_backend_compatible", None)
    if supported is None or not supported():
        raise NotImplementedError(
            f"{_model_name(model)}: its attention does not dispatch through transformers.AttentionInterface "
            f"({_model_name(model)}.is_backend_compatible() is not True), so ring_dilated attention cannot be plugged "
            f"in; use a model family that supports attn_implementation (Llama, Mistral, Qwen2/3, GPT-2, GPT-NeoX, "
            f"BERT, ...)"
        )
    for m in model.modules():
        if getattr(m, "is_cross_attention", False):
            raise NotImplementedError(
                f"{_model_name(model)}: cross-attention ({_model_name(m)}) is not supported by ring_dilated attention"
            )


def _set_settings(model: nn.Module, settings: RingSettings | None) -> None:
    # On every module: the attention function only sees the module it runs for, and reading the setting from that
    # module needs no list of which classes are attention modules.
    for m in model.modules():
        if settings is None:
            m.__dict__.pop("_ds_ring", None)
        else:
            m._ds_ring = settings


def patch(
    model: nn.Module,
    *,
    sp: SequenceParallel | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    local: bool = False,
    ulysses_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Switch ``model`` to ring-dilated attention in place and return it; ``unpatch`` restores it.

    ``sp`` supplies the ring (``sp.group``) and layout (``sp.layout``); ``group``/``layout`` set them directly (WORLD
    and "contiguous" by default). ``segment_lengths``/``dilation_rates`` select a LongNet dilated pattern (None:
    dense, exact attention). ``local=True`` runs exact attention on each rank's tensors as the whole sequence
    (unsharded evaluation / generation); ``ds_ring.local_attention(model)`` does that temporarily.
    ``ulysses_group`` (or ``sp`` made with ``ulysses_size > 1``): two-dimensional sequence parallelism, Ulysses
    all-to-all inside the group and the ring (``group``) across ring positions.
    """
    if sp is not None:
        if group is not None and group is not sp.group:
            raise ValueError("patch: pass either sp or group, not both (sp.group is the ring)")
        if layout is not None and layout != sp.layout:
            raise ValueError(f"patch: layout={layout!r} disagrees with sp.layout={sp.layout!r}; pass one of them")
        group, layout, ulysses_group = sp.ring_group, sp.layout, sp.ulysses_group
    layout = get_layout(layout or "contiguous").name
    if (segment_lengths is None) != (dilation_rates is None):
        raise ValueError("patch: give both segment_lengths and dilation_rates (or neither for the dense pattern)")
    if segment_lengths is not None and len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"patch: segment_lengths {list(segment_lengths)} and dilation_rates {list(dilation_rates)} must have "
            f"the same length"
        )
    _check_supported(model)
    settings = RingSettings(
        group=group,
        layout=layout,
        segment_lengths=None if segment_lengths is None else tuple(int(x) for x in segment_lengths),
        dilation_rates=None if dilation_rates is None else tuple(int(x) for x in dilation_rates),
        local=local,
        ulysses_group=ulysses_group,
    )
    if not hasattr(model, "_ds_ring_previous_attn"):
        model._ds_ring_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _set_settings(model, settings)
    model._ds_ring_fingerprint = _fingerprint(model, settings)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    if takes_kwargs and not hasattr(model, "_ds_ring_hook"):  # else each layer agrees for itself
        model._ds_ring_hook = model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the attention implementation ``model`` had before ``patch`` and drop the ring settings."""
    if not hasattr(model, "_ds_ring_previous_attn"):
        raise ValueError(f"unpatch: {_model_name(model)} was not patched with ds_ring.patch")
    model.set_attn_implementation(model._ds_ring_previous_attn)
    del model._ds_ring_previous_attn, model._ds_ring_fingerprint
    if hasattr(model, "_ds_ring_hook"):
        model._ds_ring_hook.remove()
        del model._ds_ring_hook
    _set_settings(model, None)
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
    _check_supported(model)
    saved = getattr(model, "_ds_ring", None)
    _set_settings(model, dataclasses.replace(saved or _DEFAULT, local=True))
    try:
        yield model
    finally:
        _set_settings(model, saved)


def register() -> None:
    """Register "ring_dilated" with transformers' attention and mask dispatch (done by ``import ds_ring``)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_dilated_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ring_mask)


register()
