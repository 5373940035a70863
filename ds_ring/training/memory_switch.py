"""The memory options of a long-sequence training step, switched on together by ``optimize_memory``.

At long sequences a training step's memory is mostly outside attention (issue 11): the (B, L, V) logits and their
fp32 copy and gradient, the MLP's (B, L, intermediate) activations, and what each layer keeps for backward. Five
options cut them, each selectable alone:

* ``checkpointing``: transformers' activation checkpointing (non-reentrant) keeps only each decoder layer's input;
* ``chunked_loss``: the model's forward, given ``shift_labels``, returns ``ds_ring.chunked_causal_lm_loss`` of its
  final hidden states (no logits at all);
* ``tiled_mlp``: every decoder layer's MLP runs through DeepSpeed's ``TiledMLP`` (ALST), ``mlp_chunk_tokens`` rows at
  a time in forward and again in backward; with checkpointing, the layer's recompute stops before the tiles wherever
  nothing after the MLP saves a tensor (Llama-like layers), so they run twice a step, not three times;
* ``lean_norms``: every RMSNorm with transformers' Llama formula (Llama, Mistral, Qwen2/3, ...) keeps its input and
  one fp32 scale per row for backward instead of its fp32 upcast and normalised input (``training/norms.py``); the
  forward is bit-identical; norms with another formula are left as they are and named on rank 0;
* ``offload_checkpoints``: DeepSpeed's ``CheckpointHiddenStatesOffload`` (ALST) keeps the checkpointed layer inputs
  in pinned host memory (the name says which offload: ``ds_ring.plan``'s ``offload_optimizer`` / ``offload_params``
  are DeepSpeed's ZeRO offloads); it acts only on an accelerator (DeepSpeed skips tensors that are not on one), and runs inside
  ``offload_context(model)`` around each step's forward and backward.

``ds_ring.plan`` predicts the per-rank memory of a step with any combination of them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.groups import SequenceParallel
from .loss import chunked_causal_lm_loss, next_token_targets
from .model_state import MEMORY, MemoryOptions, RingState, attach, detach_if_empty, state_of
from .norms import is_llama_rms_norm, lean_rms_norm_forward

# Config keys that change the logits after the LM head; the chunked loss computes plain ``lm_head(h)`` logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


# transformers' late 5.x releases call it "activation checkpointing" and keep the "gradient_checkpointing_*" names as
# deprecated aliases; the declared floor (5.10.1) has only those: use the new names where they exist.
def _checkpointing_on(model: nn.Module) -> bool:
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if on is None else on)


def optimize_memory(
    model: nn.Module,
    sp: SequenceParallel | None = None,
    *,
    checkpointing: bool = True,
    chunked_loss: bool = True,
    tiled_mlp: bool = True,
    offload_checkpoints: bool | str = "auto",
    lean_norms: bool = True,
    loss_chunk_tokens: int | None = None,
    mlp_chunk_tokens: int | None = None,
    **renamed: Any,
) -> nn.Module:
    """Switch ``model`` (a transformers causal LM) to the long-sequence memory options in place; return it.

    All options on (the default) is the one switch; turn single ones off to select the others alone. Call it before
    ``deepspeed.initialize``; ``restore_memory(model)`` undoes it. ``sp`` (the ring) is needed by the chunked loss:
    the forward then returns ``causal_lm_loss``'s value and gradient share (``out.loss``; ``out.logits`` is None)
    when called with ``shift_labels`` from ``ds_ring.shard_batch``. Run each step's forward and backward inside
    ``with ds_ring.offload_context(model):`` (a no-op unless checkpoint offload is active).
    """
    opts = _checked_options(model, renamed, checkpointing=checkpointing, chunked_loss=chunked_loss,
                            tiled_mlp=tiled_mlp, offload_checkpoints=offload_checkpoints, lean_norms=lean_norms,
                            loss_chunk_tokens=loss_chunk_tokens, mlp_chunk_tokens=mlp_chunk_tokens)
    mlps = _token_wise_mlps(model) if tiled_mlp else []
    if chunked_loss:
        _check_plain_lm_head(model)
    state = attach(model)
    state.memory, state.sp = opts, sp
    if checkpointing and not _checkpointing_on(model):
        _enable_checkpointing(model, state)
    if chunked_loss:
        state.swap(model, "forward", types.MethodType(_chunked_loss_forward, model), MEMORY)
    if mlps:
        state.mlp_chunk_tokens = mlp_chunk_tokens or model.config.get_text_config().hidden_size
        base = getattr(model, "base_model", model)  # also reached when the decoder is called on its own
        state.record(MEMORY, base.register_forward_pre_hook(_agree_on_tiles, with_kwargs=True).remove)
        for mlp in mlps:
            state.swap(mlp, "forward", types.MethodType(_tiled_mlp_forward, mlp), MEMORY)
    if lean_norms:
        _lean_norms(model, state)
    return model


def _lean_norms(model: nn.Module, state: RingState) -> None:
    """Every RMSNorm of ``model`` with the Llama formula runs ``norms.rms_norm``; the others are named on rank 0."""
    others = set()
    for module in model.modules():
        if is_llama_rms_norm(module):
            state.swap(module, "forward", types.MethodType(lean_rms_norm_forward, module), MEMORY)
        elif type(module).__name__.lower().endswith("rmsnorm"):
            others.add(type(module).__name__)
    if others and (not dist.is_initialized() or dist.get_rank() == 0):
        warnings.warn(f"optimize_memory(lean_norms=True): {sorted(others)} compute RMSNorm with another formula than "
                      "transformers' Llama RMSNorm and keep their own forward (and what it saves for backward)",
                      stacklevel=3)


def _checked_options(model: nn.Module, renamed: dict[str, Any], **options: Any) -> MemoryOptions:
    """``optimize_memory``'s arguments, refused before anything changes if they cannot work."""
    if renamed:
        raise TypeError(f"optimize_memory: unexpected keyword argument(s) {sorted(renamed)}"
                        + ("; offload is now called offload_checkpoints" if "offload" in renamed else ""))
    opts = MemoryOptions(**options)
    if getattr(state_of(model), "memory", None) is not None:
        raise ValueError("optimize_memory: the model is already optimized; call ds_ring.restore_memory(model) first")
    if opts.offload_checkpoints not in (True, False, "auto"):
        raise ValueError(f"optimize_memory: offload_checkpoints must be True, False or 'auto', got "
                         f"{opts.offload_checkpoints!r}")
    if (opts.offload_checkpoints is True and not opts.checkpointing
            and not _checkpointing_on(model)):
        raise ValueError("optimize_memory: offload_checkpoints=True moves the checkpointed layer inputs to the host "
                         "and needs checkpointing=True (or activation checkpointing already enabled on the model)")
    for name in ("loss_chunk_tokens", "mlp_chunk_tokens"):
        v = getattr(opts, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"optimize_memory: {name} must be a positive int or None, got {v!r}")
    if opts.tiled_mlp:
        try:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP  # noqa: F401
        except ImportError as e:
            raise ImportError("optimize_memory(tiled_mlp=True) runs DeepSpeed's TiledMLP (deepspeed.runtime."
                              "sequence_parallel.ulysses_sp, DeepSpeed 0.19 tested): upgrade deepspeed or pass "
                              "tiled_mlp=False") from e
    return opts


def _enable_checkpointing(model: nn.Module, state: RingState) -> None:
    """transformers' activation checkpointing (non-reentrant), recorded so that undoing it leaves nothing behind:
    ``activation_checkpointing_disable`` keeps the flags and checkpoint functions it set on the modules, and the
    forward hook that makes the input embeddings' output require grad (it removes that one only under PEFT)."""
    hooks_before = list(getattr(model, "_require_grads_hooks", None) or [])
    if hasattr(model, "activation_checkpointing_enable"):
        enable = functools.partial(model.activation_checkpointing_enable,
                                   activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:  # the declared floor's names (see _checkpointing_on)
        enable = functools.partial(model.gradient_checkpointing_enable,
                                   gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    state.record_attributes(model, MEMORY, enable)
    for hook in getattr(model, "_require_grads_hooks", None) or []:
        if hook not in hooks_before:
            state.record(MEMORY, hook.remove)
    state.record(MEMORY, disable)  # undone first: then the attributes, the hooks


PARTS = ("checkpointing", "chunked_loss", "tiled_mlp", "offload_checkpoints", "lean_norms")


def parse_memory_options(text: str) -> dict[str, bool | str] | None:
    """A command-line spelling of the options: ``"long"`` (all on, checkpoint offload on an accelerator), ``"off"``
    (None: do not call ``optimize_memory``), or a comma list of ``checkpointing, chunked_loss, tiled_mlp,
    offload_checkpoints, lean_norms`` (the others off). Returns ``optimize_memory``'s keyword arguments."""
    text = text.strip().lower()
    if text == "off":
        return None
    if text == "long":
        return dict(checkpointing=True, chunked_loss=True, tiled_mlp=True, offload_checkpoints="auto", lean_norms=True)
    parts = [p.strip().replace("-", "_") for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        renamed = "; offload is now called offload_checkpoints" if "offload" in unknown else ""
        raise ValueError(f"memory options {text!r}: use 'long', 'off' or a comma list of {', '.join(PARTS)} "
                         f"(unknown: {unknown}{renamed})")
    return {p: p in parts for p in PARTS}


def restore_memory(model: nn.Module) -> nn.Module:
    """Undo ``optimize_memory`` (``ds_ring.unpatch`` undoes it too, with the rest of what ds_ring did)."""
    state = state_of(model)
    if state is None or state.memory is None:
        raise ValueError("restore_memory: the model was not optimized with ds_ring.optimize_memory")
    state.undo(MEMORY)
    detach_if_empty(model)
    return model


def offload_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context one training step's forward AND backward run in: DeepSpeed's ``CheckpointHiddenStatesOffload``
    when ``offload_checkpoints`` is on for ``model`` and its parameters are on an accelerator, else a no-op.

    One offload manager per model, reused every step (as DeepSpeed recommends).
    """
    state = state_of(model)
    opts: MemoryOptions | None = None if state is None else state.memory
    if opts is None or opts.offload_checkpoints is False:
        return contextlib.nullcontext()
    on_accelerator = next(model.parameters()).device.type != "cpu"
    if not on_accelerator:
        if opts.offload_checkpoints is True and not state.offload_warned:
            warnings.warn("ds_ring.offload_context: the model is on the CPU; DeepSpeed's checkpoint offload only moves "
                          "tensors off an accelerator, so nothing is offloaded", stacklevel=2)
            state.offload_warned = True
        return contextlib.nullcontext()
    if state.offload_manager is None:
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )

        state.offload_manager = get_checkpoint_hidden_states_offloading_ctx_manager()
    return state.offload_manager


# ----- chunked loss ------------------------------------------------------------------------------------------------

def _check_plain_lm_head(model: nn.Module) -> None:
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight") or getattr(model, "base_model", model) is model:
        raise NotImplementedError(f"optimize_memory(chunked_loss=True): {name} is not a causal LM with a base model "
                                  "and a linear LM head (get_output_embeddings()); pass chunked_loss=False")
    cfg = model.config.get_text_config()
    for key in _LOGIT_TRANSFORMS:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"optimize_memory(chunked_loss=True): {name} transforms its logits after the "
                                      f"LM head (config.{key}={getattr(cfg, key)}), which the chunked loss does not "
                                      "do; pass chunked_loss=False")


def _chunked_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                          shift_labels=None, labels=None, **kwargs):
    """Forward of a model with the chunked loss: with ``shift_labels`` (or ``labels`` on one rank), the decoder runs
    and ``out.loss`` is ``chunked_causal_lm_loss`` of its last hidden states (``out.logits`` is None); without
    labels, the model's own forward (logits for evaluation or generation)."""
    state = state_of(self)
    sp = state.sp
    if shift_labels is None and labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, **kwargs)
    if kwargs.pop("num_items_in_batch", None) is not None:
        raise NotImplementedError("the chunked loss averages over the ring's valid tokens (causal_lm_loss's "
                                  "contract); num_items_in_batch is not supported")
    if shift_labels is None:
        if sp is not None and sp.sp_size > 1:
            raise ValueError("with a ring of several ranks pass shift_labels (from ds_ring.shard_batch), not labels: "
                             "a shard cannot shift its labels alone")
        shift_labels = next_token_targets(labels)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, **kwargs)
    loss = chunked_causal_lm_loss(out[0], self.get_output_embeddings(), shift_labels, sp,
                                  chunk_tokens=state.memory.loss_chunk_tokens)
    return CausalLMOutputWithPast(loss=loss, logits=None)


# ----- tiled MLP ---------------------------------------------------------------------------------------------------

def _token_wise_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's ``mlp``: dense, token-wise MLPs only (a MoE block routes and returns more than a tensor)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    name = type(model).__name__
    mlps = [layer.mlp for layer in model.modules()
            if isinstance(layer, GradientCheckpointingLayer) and isinstance(getattr(layer, "mlp", None), nn.Module)]
    if not mlps:
        raise NotImplementedError(f"optimize_memory(tiled_mlp=True): no decoder layer of {name} has an `mlp` module; "
                                  "pass tiled_mlp=False")
    for mlp in mlps:
        cls = type(mlp).__name__
        if any(k in cls.lower() for k in ("moe", "sparse", "expert")):
            raise NotImplementedError(f"optimize_memory(tiled_mlp=True): {name}'s {cls} is a mixture of experts, "
                                      "which TiledMLP does not tile; pass tiled_mlp=False")
    return mlps


def _plain_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, x)


def _tiled_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    state = state_of(self)
    tiles = state.mlp_tiles or math.ceil(x.shape[-2] / state.mlp_chunk_tokens)
    if tiles <= 1:
        return _plain_mlp(self, x)
    # Two nodes where DeepSpeed's TiledMLP is one: _SaveInput keeps x, _TiledFromSaved computes the tiles. Why: a
    # checkpointed layer's recompute (non-reentrant, early stop on) ends at the last tensor the layer saved. TiledMLP
    # saves x after it has run every tile, so the recompute runs the whole MLP once more just to reach that save, and
    # the MLP runs three times a step ("trice", in its docstring). Saved first, x is the layer's last saved tensor
    # whenever nothing after the MLP saves one (Llama, Mistral, Qwen: a residual add), and the recompute stops before
    # the tiles: the MLP runs twice, as in a step without checkpointing. Where something after it saves (Gemma's
    # post-feedforward norm), the recompute goes on through the tiles as before, so the result is exact either way.
    params = [p for p in self.parameters() if p.requires_grad]
    if params and torch.is_grad_enabled() and not x.requires_grad:
        # everything before the MLP frozen: autograd sees the weights only through x (they are not the Function's
        # inputs), so without this the MLP's own trainable weights would silently get no gradient
        x = x.detach().requires_grad_(True)
    saved = _SaveInput.apply(x)
    return _TiledFromSaved.apply(self, saved, tiles, params)


class _SaveInput(torch.autograd.Function):
    """Identity that saves its input for ``_TiledFromSaved``'s backward (which unpacks it, once); its own backward
    passes the gradient through without touching what it saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _TiledFromSaved(torch.autograd.Function):
    """DeepSpeed's ``TiledMLP`` forward and backward, run on the input ``_SaveInput`` saved just before (shape
    (B, L, hidden) -> (B, L, hidden)). DeepSpeed's own code does the tiling and the ZeRO gradient bookkeeping; only
    where x is saved differs (see ``_tiled_mlp_forward``)."""

    @staticmethod
    def forward(ctx, mlp: nn.Module, saved: torch.Tensor, tiles: int, params: list[torch.Tensor]) -> torch.Tensor:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        ctx.saver, ctx.tiled = saved.grad_fn, _TiledContext()
        return TiledMLP.forward(ctx.tiled, _plain_mlp, mlp, saved, tiles, params)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        # the saver's node runs after this one and never reads what it saved: this is the one unpack
        ctx.tiled.saved_tensors = ctx.saver.saved_tensors
        try:
            x_grad = TiledMLP.backward(ctx.tiled, grad)[2]
        finally:
            ctx.tiled.saved_tensors = ()  # the node outlives its backward (out.grad_fn): it must not keep x alive
        return None, x_grad, None, None


class _TiledContext:
    """Stands in for the ctx that ``TiledMLP.forward`` fills (fn, self, shards, compute_params) and
    ``TiledMLP.backward`` reads (those and saved_tensors), so that both run outside their own autograd node."""

    saved_tensors: tuple = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:  # _SaveInput has saved x already
        pass


def _agree_on_tiles(base: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder: under ZeRO-3, the number of MLP tiles every rank runs.

    Every tile gathers the MLP's partitioned weights on all ranks of the ZeRO group, so all must run the same number
    of tiles: the longest local length is agreed (one all-gather of one integer per forward), and lengths that
    ``torch.chunk`` would cut into different numbers of tiles raise the same error on every rank.
    """
    state = state_of(base)
    state.mlp_tiles = None
    x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if x is None and args:
        x = args[0]
    if x is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if not any(hasattr(p, "ds_id") for p in base.parameters()):  # not partitioned by ZeRO-3: nothing to agree on
        return
    mine = torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device)
    lengths = torch.empty(dist.get_world_size(), dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(lengths, mine)
    lengths = lengths.tolist()
    tiles = math.ceil(max(lengths) / state.mlp_chunk_tokens)
    counts = {len(range(0, n, math.ceil(n / tiles))) for n in lengths}
    if len(counts) > 1:
        raise ValueError(f"tiled MLP under ZeRO-3: the local sequence lengths {sorted(set(lengths))} would be cut into "
                         f"different numbers of tiles ({sorted(counts)}), and every tile gathers weights on all ranks; "
                         "use equal lengths on every rank or a larger mlp_chunk_tokens")
    state.mlp_tiles = tiles
