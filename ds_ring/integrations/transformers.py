"""Hugging Face integration: ring-dilated attention as a transformers attention implementation.

``import ds_ring`` registers the name ``"ring_dilated"`` with ``transformers.AttentionInterface`` (the attention
function) and with ``transformers.masking_utils.AttentionMaskInterface`` (the mask builder, which hands the attention
function this rank's 2D key-padding mask (B, L_local) or None). Without a mask entry transformers would pass
``attention_mask=None`` and padding would be lost.

Each rank feeds the model its own shard of input_ids / attention_mask and the GLOBAL position_ids
(``ds_ring.shard_batch`` makes all three). K/V and the padding mask travel around the ring inside
``ds_ring.op.attention.ring_dilated_attention``.

``patch`` keeps the settings (group, layout, dilated pattern, local mode) in the model's ``RingState``
(``ds_ring.training.model_state``: what ds_ring did to the model, on the model and each module), so two models in
one process can use different patterns, and installs a forward pre-hook that runs the ring's
agreement ONCE per model forward (shapes, options, global positions, which shards are padded) and passes its facts to
every attention layer through the forward's keyword arguments (``ds_ring_facts``), which transformers hands down to
the attention function and gradient checkpointing replays. A model switched with ``attn_implementation=
"ring_dilated"`` and no ``patch`` call uses the defaults (dense pattern over the WORLD group, contiguous layout) and
agrees once per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..op.agreement import RingFacts, agree_ring, code
from ..op.attention import attend
from ..op.comm import group_size_rank
from ..op.documents import PACKING_KEYS, document_ids_from
from ..op.layouts import get_layout
from ..parallel.groups import SequenceParallel
from ..training.data import FINGERPRINT_KEY
from ..training.model_state import PATCH, attach, detach_if_empty, state_of

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
    """Per-model settings read by the attention function from the module's ``RingState``."""

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


def _refuse_unsupported(name: str, attention_mask, dropout: float, kwargs: dict) -> None:
    """What the registered attention function does not implement, refused before any work, naming the fix."""
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

    Precision is SDPA's: under ``torch.autocast`` q/k/v may arrive in different dtypes (Llama's RoPE gives fp32 q/k
    and a bf16 v); the op casts them to the autocast dtype and returns the output in it (``follow_autocast``).
    """
    s = _settings(module)
    name = _model_name(module)
    _refuse_unsupported(name, attention_mask, dropout, kwargs)
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
    out = attend(
        query, key, value,
        segment_lengths=s.segment_lengths, dilation_rates=s.dilation_rates, causal=causal,
        key_padding_mask=key_padding_mask, window=sliding_window, scale=scaling,
        group=s.group, layout=s.layout, local=local, facts=facts, ulysses_group=s.ulysses_group,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _settings(module: nn.Module) -> RingSettings:
    """The ring settings the attention function runs ``module`` with: its model's, else the defaults (a model switched
    with ``attn_implementation="ring_dilated"`` and no ``patch``)."""
    state = state_of(module)
    return _DEFAULT if state is None or state.settings is None else state.settings


def _forward_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if x is None else x


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a patched model: decide the ring's facts once for the whole forward (one collective, one
    host sync; a second small exchange for packed rows) and pass them to every attention layer as the
    ``ds_ring_facts`` keyword argument. Packed documents come as ``document_ids`` (from ``ds_ring.shard_batch``) or,
    on one rank, as transformers passes them: restarting ``position_ids`` (no cache), ``seq_idx`` or
    ``cu_seq_lens_*``; these keys are consumed here, as is ``shard_batch``'s fingerprint of the full batch."""
    s: RingSettings = state_of(model).settings
    x = _forward_input(args, kwargs)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or FACTS_KWARG in kwargs:
        return None
    B, L = x.shape[:2]
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    packing = {k: kwargs.pop(k) for k in PACKING_KEYS if k in kwargs}
    fingerprint = kwargs.pop(FINGERPRINT_KEY, None)
    if _is_local(s):
        two_d = isinstance(mask, torch.Tensor) and mask.dim() == 2
        no_cache = kwargs.get("past_key_values") is None
        ids = document_ids_from({**packing, "position_ids": position_ids if no_cache else None}, (B, L))
        # with a KV cache the keys are the mask's columns (past + new tokens)
        facts, _ = agree_ring(None, who=f"{_model_name(model)} under ring_dilated attention", errors=[],
                              must_match={}, layout=get_layout("contiguous"), batch=B,
                              local_len=mask.shape[1] if two_d else L, device=x.device,
                              key_padding_mask=mask.bool() if two_d else None, document_ids=ids, local=True)
    else:
        facts = _agree_forward(model, s, x, B, L, mask, position_ids, packing.get("document_ids"), fingerprint,
                               set(packing) - {"document_ids"})
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


def _input_errors(B: int, L: int, mask, ids, position_ids, whole_row_keys: set[str], lay, world: int) -> list[str]:
    """What is wrong with this rank's model inputs, on its own (no communication)."""
    errs = []
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L)):
        errs.append(f"attention_mask must be this rank's (batch, local_len) = {(B, L)} 0/1 key-padding mask, got "
                    f"{tuple(getattr(mask, 'shape', ()))}")
    if whole_row_keys:
        errs.append(f"{sorted(whole_row_keys)} describe the whole packed row: pass the batch through "
                    "ds_ring.shard_batch, which turns them into this shard's document_ids")
    if ids is not None and (not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (B, L)):
        errs.append(f"document_ids must be this rank's (batch, local_len) = {(B, L)} ids from ds_ring.shard_batch")
    if ids is not None and position_ids is None:
        errs.append("packed rows need their restarting position_ids: pass the position_ids ds_ring.shard_batch "
                    "returns")
    err = lay.local_len_error(L, world)
    return errs + [err] if err else errs


def _position_flags(L: int, position_ids, ranges: list[tuple[int, int]]) -> dict[str, int | torch.Tensor]:
    """Whether this shard runs on the model's default local positions arange(L) although its global ones are not
    (``default``: the model then uses arange(L) when given nothing), and whether its positions restart inside one of
    its ranges (packed rows that bypassed shard_batch: no document_ids). Computed on the device and read with the
    agreement."""
    wrong = restart = 0
    if ranges != [(0, L)]:
        wrong = 1 if position_ids is None else (position_ids == torch.arange(L, device=position_ids.device)).all()
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == L:
        jumps = position_ids[:, 1:] - position_ids[:, :-1] != 1
        at = 0
        for a, b in ranges[:-1]:  # a jump between two ranges of the layout is no restart
            at += b - a
            jumps[:, at - 1] = False
        restart = jumps.any()
    return {_DEFAULT_POSITIONS: wrong, _RESTARTING_POSITIONS: restart}


_DEFAULT_POSITIONS, _RESTARTING_POSITIONS = "default position_ids", "restarting position_ids"
_POSITION_FIXES = {
    _DEFAULT_POSITIONS: "got position_ids = arange({L}), the model's default for an unsharded input, instead of "
                        "their global positions",
    _RESTARTING_POSITIONS: "got position_ids that restart inside the shard (packed documents?) but no document_ids",
}


def _agree_forward(model, s: RingSettings, x, B, L, mask, position_ids, ids, fingerprint, whole_row_keys) -> RingFacts:
    """The ring's agreement for one model forward (``op.agreement.agree_ring`` with the model's entries): equal
    shapes, model and settings on every rank; one full batch per ring (``shard_batch``'s fingerprint); which shards
    are padded; where packed documents begin and end; and whether a shard runs with the model's default local
    positions arange(L) instead of global ones (RoPE and learned position embeddings would silently see wrong
    positions). Under two-dimensional SP the Ulysses group agrees first and the block's mask is gathered once for
    the forward."""
    name = _model_name(model)
    (ring, r), (u, j) = group_size_rank(s.group), _ulysses(s)
    world, rank = ring * u, r * u + j  # this rank on the sequence-parallel grid
    lay = get_layout(s.layout, u)  # the grid's (u > 1) cut of the sequence; the ring's is lay.ring
    errs = _input_errors(B, L, mask, ids, position_ids, whole_row_keys, lay, world)
    flags = {} if errs or ids is not None else _position_flags(L, position_ids, lay.ranges(L, world, rank))
    param = next(model.parameters(), None)
    must_match = {"batch": B, "local_len": L, "model, config and ring settings": state_of(model).fingerprint,
                  "parameter dtype / autocast": (str(getattr(param, "dtype", None)),
                                                 torch.is_autocast_enabled(x.device.type))}
    facts, raised = agree_ring(
        s.group, who=f"{name} under ring_dilated attention", errors=errs, must_match=must_match,
        layout=lay.ring if u > 1 else lay, batch=B, local_len=L, device=x.device,
        key_padding_mask=None if errs or mask is None else mask.bool(), document_ids=None if errs else ids,
        flags={**dict.fromkeys(_POSITION_FIXES, 0), **flags}, batch_fingerprint=fingerprint,
        ulysses_group=s.ulysses_group,
    )  # fmt: skip
    for flag, why in _POSITION_FIXES.items():
        if raised[flag]:
            raise ValueError(f"{name}: shards of the ring (world {world}, layout {lay.name!r}) {why.format(L=L)} "
                             f"(ring position(s) {raised[flag]}); pass the batch through ds_ring.shard_batch and "
                             "the model the position_ids (and document_ids) it returns")
    return facts


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
    state = attach(model)
    if state.settings is None:  # first patch: remember what to restore, hook the forward once
        state.record(PATCH, functools.partial(model.set_attn_implementation, model.config._attn_implementation))
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
        if takes_kwargs:  # else each layer agrees for itself
            state.record(PATCH, model.register_forward_pre_hook(_before_forward, with_kwargs=True).remove)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    state.settings, state.fingerprint = settings, _fingerprint(model, settings)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo everything ds_ring did to ``model``: the attention implementation it had before ``patch``, the ring
    settings and forward hook, and ``optimize_memory``'s options (swapped forwards, checkpointing, hooks) and the
    Trainer's overrides if any. The model is then as it was before."""
    state = state_of(model)
    if state is None or state.settings is None:
        raise ValueError(f"unpatch: {_model_name(model)} was not patched with ds_ring.patch")
    state.undo()
    detach_if_empty(model)
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
    state = attach(model)  # a model switched by attn_implementation alone has none
    saved = state.settings
    state.settings = dataclasses.replace(saved or _DEFAULT, local=True)
    try:
        yield model
    finally:
        state.settings = saved
        detach_if_empty(model)


def register() -> None:
    """Register "ring_dilated" with transformers' attention and mask dispatch (done by ``import ds_ring``)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_dilated_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ring_mask)


register()


def unsplit_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers marks as not to be split (``model._no_split_modules``: the decoder layers), in module
    order; empty when the model names none. The unit FSDP2 shards one by one (accelerate's transformer-based wrap
    uses the same) and the unit of ZeRO-3's reuse distance under the memory switch."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]
