"""TRL's ``DPOTrainer`` over ds_ring's rings: the adapter ``SequenceParallelMixin`` uses for it.

Where it hooks in, and why there: TRL 1.x computes every log-probability of a DPO step (policy, reference, the
precomputed reference pass) with one call, ``model(**batch, labels=labels, fused_lm_head=True)``, which runs the
backbone and TRL's chunked LM head and returns per-token fields (``log_probs``, ``entropy``, ``mean_logits``,
``is_top1``, ...) of shape (B, S - 1), never the logits. TRL then builds its losses and metrics from those fields.
So the ring enters at that call and nowhere else, on the policy and the reference model:

- a forward pre-hook shards the full batch (``ds_ring.shard_batch``: global positions, labels shifted BEFORE
  sharding and passed as ``shift_labels``, which TRL's fused head scores without shifting again);
- the backbone and TRL's own fused LM head run on this rank's shard (ring attention; no logits);
- a forward hook all-gathers the per-token fields over the ring back to (B, S - 1) (B x S numbers per field, no
  vocabulary dimension), with ``gather_sequence(replicated_loss=True)``: every rank of the ring computes TRL's
  loss from the same gathered values, and each keeps the gradient of its own shard, which makes the ring's
  parameter gradients shares that sum to the one-process gradient (the mixin's DDP hook and DeepSpeed mpu sum them
  over the ring and average over the rings).

TRL's loss (every ``loss_type``, ``ld_alpha``, WPO weighting), its metrics (rewards/*, logps/*, logits/*, entropy,
token accuracy, num_tokens) and its gathers then run unchanged on ring-wide values; the mixin's ring-aware
``accelerator.gather`` counts each ring once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..parallel.groups import SequenceParallel
from ..parallel.sharding import gather_sequence
from ..training.data import shard_batch
from ..training.loss import LOSS_CHUNK_ELEMENTS
from ..training.memory_switch import optimize_memory
from ..training.model_state import MEMORY, state_of
from .trainer import LossAdapter
from .transformers import patch

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")  # sharded; everything else passes
_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")  # per-token, without gradient


class DPOAdapter(LossAdapter):
    """What ``SequenceParallelMixin`` does differently for ``trl.DPOTrainer`` (see the module docstring).

    Supported: a reference model given as ``ref_model=`` or loaded by TRL, or ``precompute_ref_log_probs=True`` (the
    precompute pass runs over the ring too); padded batches as TRL's ``DataCollatorForPreference`` makes them (chosen
    rows then rejected rows); DDP, ZeRO-2/3, DP x SP, gradient accumulation, the memory switch (``memory=``: its
    chunked loss is not needed, TRL's fused LM head already never builds the logits; checkpointing, the tiled MLP,
    lean norms and offload apply to the policy, the tiled MLP and lean norms to the reference's forward, and TRL's
    head tile is bounded to ds_ring's loss chunk, see ``setup``). Refused at construction: ``compute_metrics`` (TRL
    recomputes full logits for it), PEFT models, MoE router auxiliary losses. TRL 1.x has no padding-free DPO (``padding_free`` falls back to
    padding in TRL itself).
    """

    describes = "the DPO loss and its logged metrics"
    owns_prediction_step = True
    needs_labels = False  # chosen/rejected rows; TRL builds the labels inside its concatenated forward

    def before_init(self, trainer) -> None:
        # TRL runs the reference precompute inside DPOTrainer.__init__, before the rings exist: hold it back (an
        # instance attribute shadows the method) and run it in setup(), over the ring.
        trainer._precompute_ref_logps = lambda dataset, name, batch_size: dataset

    def check(self, trainer, memory) -> None:
        from accelerate.utils import is_peft_model

        refused = [
            ("compute_metrics", trainer.compute_metrics is not None,
             "DPOTrainer recomputes full logits for it; drop compute_metrics (the DPO metrics are logged anyway)"),
            ("a PEFT model", is_peft_model(trainer.model), "merge the adapter or train without PEFT"),
            ("router_aux_loss_coef (MoE auxiliary loss)", trainer.aux_loss_enabled, "set router_aux_loss_coef=0"),
        ]
        for name, bad, fix in refused:
            if bad:
                raise ValueError(f"{type(trainer).__name__}: {name} is not supported under sequence parallelism: "
                                 f"{fix}")

    def memory_options(self, memory: dict[str, Any] | None) -> dict[str, Any] | None:
        """The memory switch for the policy: TRL's fused LM head replaces the chunked loss."""
        return None if memory is None else {**memory, "chunked_loss": False}

    def setup(self, trainer, sp: SequenceParallel, segment_lengths, dilation_rates) -> None:
        """After the mixin has patched the policy (and applied the memory switch) and made accelerate ring-aware.

        With the memory switch on, what the policy's switch cannot reach is bounded too (measured with
        ``benchmarks/bench_longest.py``'s DPO candidate, docs/performance.md section 10b: the longest pair at P=2,
        ZeRO-3, 2 GiB went from 1,536 to 37,120 tokens per sequence with both):

        - the reference model's forward runs while the policy holds its checkpoints, so its MLPs and norms get the
          switch's tiled MLP and lean norms (nothing of it is kept for a backward: no checkpointing needed);
        - TRL's fused LM head projects tiles of ``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE`` tokens (4,096) by up
          to 32,768 vocabulary columns, a module constant it reads in forward and backward, and without Triton (CPU)
          makes several fp32 temporaries of a tile's size: over 4 GiB at a 32k vocabulary, whatever the length. The
          tile is lowered to the rows of ds_ring's own chunked loss (``LOSS_CHUNK_ELEMENTS // V``), said on rank 0
          and put back by ``ds_ring.unpatch`` / ``restore_memory`` of the policy.
        """
        shard_fused_calls(trainer.model, sp)
        policy = getattr(trainer.model, "module", trainer.model)
        state = state_of(policy)
        opts = getattr(state, "memory", None)
        if opts is not None:
            _bound_fused_head_tile(policy, state)
        if trainer.ref_model is not None:
            ref = getattr(trainer.ref_model, "module", trainer.ref_model)  # TRL wraps it in a DeepSpeed engine
            patch(ref, sp=sp, segment_lengths=segment_lengths, dilation_rates=dilation_rates)
            shard_fused_calls(ref, sp)
            if opts is not None and (opts.tiled_mlp or opts.lean_norms):
                optimize_memory(ref, sp, checkpointing=False, chunked_loss=False, offload_checkpoints=False,
                                tiled_mlp=opts.tiled_mlp, lean_norms=opts.lean_norms,
                                mlp_chunk_tokens=opts.mlp_chunk_tokens)
        del trainer._precompute_ref_logps
        if trainer.args.precompute_ref_log_probs:  # what DPOTrainer.__init__ would have done, now over the ring
            args = trainer.args
            trainer.train_dataset = trainer._precompute_ref_logps(
                trainer.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size)
            evald = trainer.eval_dataset
            size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
            if isinstance(evald, dict):
                trainer.eval_dataset = {n: trainer._precompute_ref_logps(d, n, size) for n, d in evald.items()}
            elif evald is not None:
                trainer.eval_dataset = trainer._precompute_ref_logps(evald, "eval", size)

    def compute_loss(self, trainer, model, inputs, return_outputs, num_items_in_batch):
        from trl import DPOTrainer

        return DPOTrainer.compute_loss(trainer, model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)

    def prediction_step(self, trainer, model, inputs, prediction_loss_only, ignore_keys):
        from trl import DPOTrainer

        return DPOTrainer.prediction_step(trainer, model, inputs, prediction_loss_only, ignore_keys)


def _bound_fused_head_tile(policy: nn.Module, state) -> None:
    """Lower TRL's fused LM-head tile (tokens per projection) to ds_ring's loss chunk rows; see DPOAdapter.setup."""
    import torch.distributed as dist
    import trl.kernels.chunked_logprob as fused_head

    rows = max(1, LOSS_CHUNK_ELEMENTS // policy.config.get_text_config().vocab_size)
    before = fused_head.TOKEN_CHUNK_SIZE
    if rows >= before:
        return
    state.swap(fused_head, "TOKEN_CHUNK_SIZE", rows, MEMORY)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"ds_ring memory switch (DPO): TRL's fused LM head projects {rows} tokens at a time instead of {before} "
              "(trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, ds_ring's loss chunk rows), so its tile temporaries "
              "stay small", flush=True)


def shard_fused_calls(model: nn.Module, sp: SequenceParallel) -> None:
    """Make ``model(**full_batch, labels=labels, fused_lm_head=True)`` (TRL's fused log-probability call, model
    patched with ``trl.trainer.utils.add_fused_lm_head`` and ``ds_ring.patch``) run this rank's shard and return the
    per-token fields gathered over the ring, (B, S - 1) as TRL expects. Other calls (plain logits) are refused: a
    full batch through a patched model would be read as a shard."""
    pending: list[tuple[int, Any]] = []
    pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0

    def before(module, args, kwargs):
        if not kwargs.get("fused_lm_head"):
            raise NotImplementedError(
                f"{type(module).__name__} under ds_ring's DPO support runs only TRL's fused log-probability forward "
                "(fused_lm_head=True); full logits of a sharded sequence are not computed")
        if args or kwargs.get("labels") is None or kwargs.get("shift_labels") is not None:
            raise ValueError("ds_ring DPO: the fused forward takes keyword tensors (B, S) and labels (B, S), "
                             "not positional inputs or shift_labels")
        full = {k: kwargs.pop(k) for k in _MODEL_KEYS if kwargs.get(k) is not None}
        full["labels"] = kwargs.pop("labels")
        local = shard_batch(full, sp, pad_token_id=pad_token_id)  # shift_labels: shifted before sharding
        pending.append((full["input_ids"].shape[1], kwargs.get("num_items_in_batch")))
        return args, {**kwargs, **local}

    def after(module, args, kwargs, out):
        seq, num_items = pending.pop()
        lay = sp.sequence_layout

        def gather(t: torch.Tensor, replicated: bool) -> torch.Tensor:
            return gather_sequence(t, 1, sp.group, lay, replicated_loss=replicated)[:, : seq - 1]

        out.log_probs = gather(out.log_probs, True)
        present = [f for f in _FIELDS if getattr(out, f, None) is not None]
        if present:  # one all-gather for the fields without gradient
            stacked = torch.stack([getattr(out, f).detach().float() for f in present], -1)
            full = gather(stacked, False)
            for i, f in enumerate(present):
                setattr(out, f, full[..., i].to(getattr(out, f).dtype))
        if num_items is None:
            num_items = out.label_mask.sum().clamp(min=1) if out.label_mask is not None else max(1, seq - 1)
        out.loss = -out.log_probs.sum() / num_items  # TRL's loss field (DPO does not read it), over the ring's tokens
        return out

    model.register_forward_pre_hook(before, with_kwargs=True, prepend=True)  # before ds_ring.patch's own hook
    model.register_forward_hook(after, with_kwargs=True)
