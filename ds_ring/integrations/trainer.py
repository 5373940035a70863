"""Hugging Face ``Trainer`` with sequence parallelism: ``SequenceParallelTrainer`` and, for other Trainer subclasses,
``SequenceParallelMixin``.

The world is cut into rings of ``sp_size`` ranks (``ds_ring.init_sequence_parallel``); a ring trains like ONE
data-parallel rank of the plain ``Trainer``: its ranks see the same batches, each runs its shard of every sequence
through the patched model, and the loss is the ring's loss over the whole sequence. What changes against
``Trainer``, and why:

- data: ``accelerate`` shards dataloaders over every process; here over the data-parallel ranks (rings) only;
- loss: ``compute_loss`` shards the batch (``ds_ring.shard_batch``) and computes the ring's loss with the adapter of
  the trainer family (``LOSS_ADAPTERS``: ``Trainer``'s causal-LM loss, TRL ``SFTTrainer``'s loss and metrics); the
  Trainer's token normalisation (``num_items_in_batch``, ``average_tokens_across_devices``) counts each ring once. A
  trainer whose loss no adapter implements is refused at construction;
- gradients: each ring rank holds its share of the ring's gradient. The shares are SUMMED over the ring and
  AVERAGED over the rings (``ds_ring.parallel.gradients``, the rule's one home): DDP gets its communication hook
  (one all-reduce); DeepSpeed gets ds_ring's groups as ``mpu`` through ``ds_ring.integrations.deepspeed.initialize``
  (which also applies its ZeRO-3 loss factor); accelerate's FSDP2 gets the rule's divide factor through
  ``ds_ring.integrations.fsdp2.apply_gradient_rule``, the code ``ds_ring.fully_shard`` uses; FSDP1 is refused;
- gathers (logged token counts, evaluation losses and predictions): a ring's ranks hold the same values, so only the
  first rank of each ring counts.
Logged and evaluated losses are the ring's global values, equal on every rank.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer

from ..parallel.gradients import ddp_comm_hook, gradient_divisor
from ..parallel.groups import SequenceParallel, init_sequence_parallel
from ..parallel.sharding import gather_sequence
from ..training.data import shard_batch
from ..training.loss import IGNORE_INDEX, causal_lm_loss, next_token_targets, ring_mean_and_sums
from ..training.memory_switch import (
    offload_context,
    optimize_memory,
    parse_memory_options,
)
from ..training.model_state import TRAINER, RingState, state_of
from .fsdp2 import apply_gradient_rule
from .transformers import patch

__all__ = ["LOSS_ADAPTERS", "SequenceParallelMixin", "SequenceParallelTrainer"]


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of a full batch have a target (``shard_batch``'s shift, and the count ``Trainer`` uses
    for causal LMs)."""
    return next_token_targets(labels).ne(IGNORE_INDEX).sum()


class SequenceParallelMixin:
    """Sequence parallelism for a ``transformers.Trainer`` subclass: ``class MySFT(SequenceParallelMixin, SFTTrainer)``.

    Keyword arguments (all other arguments are the Trainer's):

    - ``sp_size``: ranks per ring (default: every rank in one ring). Must divide the world size; the
      ``world_size / sp_size`` rings are the data-parallel ranks, so ``per_device_train_batch_size`` (and
      ``per_device_eval_batch_size``) is the batch of ONE RING.
    - ``layout``: how sequences are cut over a ring, ``"zigzag"`` (default: balanced causal work) or ``"contiguous"``.
    - ``ulysses_size``: two-dimensional sequence parallelism (Ulysses all-to-all inside groups of that many ranks, the
      ring across them; see ``ds_ring.init_sequence_parallel``); the whole ``sp_size`` group is still one sequence.
    - ``segment_lengths`` / ``dilation_rates``: a LongNet dilated pattern (default: dense, exact attention).
    - ``sp``: an existing ``ds_ring.SequenceParallel`` to reuse instead of making new groups.
    - ``memory``: the long-sequence memory options (``ds_ring.optimize_memory``): ``"long"`` (all on), ``"off"``
      (default), a comma list such as ``"checkpointing,chunked_loss"``, or a dict of ``optimize_memory``'s keyword
      arguments. With the chunked loss, training never materialises the logits; evaluation with
      ``prediction_loss_only=False`` still gathers them (it returns them).

    The groups are made right after the Trainer has set up accelerate's process group, before any dataloader or
    DeepSpeed engine exists; the model is patched with ``ds_ring.patch``. Trains causal LMs with the loss of a
    trainer family in ``LOSS_ADAPTERS`` (``Trainer``, TRL's ``SFTTrainer`` and ``DPOTrainer``; no
    ``compute_loss_func``, no label smoothing). Misuse raises at construction, with the same message on every rank.
    """

    sp: SequenceParallel

    def __init__(
        self,
        *args: Any,
        sp_size: int | None = None,
        layout: str | None = None,
        ulysses_size: int | None = None,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        sp: SequenceParallel | None = None,
        memory: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._sp_loss = loss_adapter(type(self))  # a trainer whose loss is not implemented: refused before anything
        self._sp_loss.before_init(self)
        super().__init__(*args, **kwargs)
        memory = parse_memory_options(memory) if isinstance(memory, str) else None if memory is None else dict(memory)
        self._check_trainer_setup(memory)
        if sp is None:
            sp = init_sequence_parallel(sp_size, layout=layout or "zigzag", ulysses_size=ulysses_size or 1)
        elif any(given is not None and given != have for given, have in
                 ((sp_size, sp.sp_size), (layout, sp.layout), (ulysses_size, sp.ulysses_size))):
            raise ValueError(f"sp_size={sp_size!r} / layout={layout!r} / ulysses_size={ulysses_size!r} disagree with "
                             f"the given sp ({sp.sp_size}, {sp.layout!r}, {sp.ulysses_size}): pass sp alone")
        if self.args.world_size != sp.world_size:
            raise RuntimeError(
                f"accelerate sees {self.args.world_size} process(es) but torch.distributed has {sp.world_size}: on a "
                "machine without GPUs pass TrainingArguments(use_cpu=True) so that accelerate sets up all processes "
                "(gloo)"
            )
        self.sp = sp
        memory = self._sp_loss.memory_options(memory)
        patch(self.model, sp=sp, segment_lengths=segment_lengths, dilation_rates=dilation_rates)
        if memory is not None:
            optimize_memory(self.model, sp, **memory)
        _make_accelerator_ring_aware(self.accelerator, sp, state_of(self.model))
        self._sp_loss.setup(self, sp, segment_lengths, dilation_rates)

    def _check_trainer_setup(self, memory: dict[str, Any] | None) -> None:
        """What the sequence-parallel path does not implement, refused before any group or engine exists."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (pc.sp_size > 1 or pc.cp_size > 1):
            raise ValueError(
                f"accelerate's own sequence/context parallelism is on (parallelism_config sp_size={pc.sp_size}, "
                f"cp_size={pc.cp_size}); ds_ring brings its own rings: drop parallelism_config (or its "
                "PARALLELISM_CONFIG_* launch options) and pass sp_size to the ds_ring trainer"
            )
        refused = {
            "model_init": (self.model_init is not None, "pass model= (the trainer patches that model once)"),
            "compute_loss_func": (self.compute_loss_func is not None,
                                  "ds_ring computes the causal-LM loss over the ring; override compute_loss instead"),
            "label_smoothing_factor": (self.label_smoother is not None, "set it to 0"),
            "eval_use_gather_object": (self.args.eval_use_gather_object, "set it to False"),
            "train_sampling_strategy='batch_rebalance'": (
                self.args.train_sampling_strategy == "batch_rebalance",
                "its sampler shards over every process; use 'random', 'sequential' or 'group_by_length'"),
            "accelerator_config.dispatch_batches": (
                bool(self.accelerator.dispatch_batches), "set it to False (it splits batches over every process)"),
        }
        for name, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"{type(self).__name__}: {name} is not supported under sequence parallelism: {fix}")
        self._check_fsdp()
        if not self._loss_shifts_labels:
            raise NotImplementedError(
                f"{type(self).__name__} trains causal language models (transformers' ForCausalLMLoss); "
                f"{type(self.model).__name__} has loss_type {getattr(self.model, 'loss_type', None)!r}"
            )
        self._sp_loss.check(self, memory)

    def _check_fsdp(self) -> None:
        """FSDP2 trains with ds_ring's gradient rule (set in ``prepare``); FSDP1, and FSDP configured where accelerate
        does not apply it, are refused."""
        from accelerate.utils import DistributedType

        if _has_fsdp2_units(self.model):
            # transformers' from_pretrained(distributed_config=...) or the user's fully_shard: the Trainer then skips
            # accelerate's wrapping (and ds_ring's prepare), and nothing would apply the gradient rule for its mesh
            raise ValueError(
                f"{type(self).__name__}: the model is already sharded with FSDP2 (e.g. from_pretrained("
                "distributed_config=...)); pass an unsharded model and configure FSDP2 in accelerate (fsdp_version: "
                "2, integrations/accelerate/fsdp2.yaml), or train it in your own loop after ds_ring.fully_shard")
        version = _fsdp_version_asked(self.accelerator, self.args)
        if version is None:
            return
        if version != 2:
            raise ValueError(
                f"{type(self).__name__}: FSDP version {version} is not supported under sequence parallelism: FSDP1 "
                "averages its flat parameters' gradients over every rank with no public way to set the divisor, so "
                "each ring's gradient would be divided by sp_size. Use FSDP2: fsdp_config={'version': 2} or "
                "fsdp_version: 2 in the accelerate config (integrations/accelerate/fsdp2.yaml)")
        if self.accelerator.distributed_type != DistributedType.FSDP:
            raise RuntimeError(
                f"{type(self).__name__}: FSDP is configured but accelerate does not apply it on this machine "
                f"(distributed type {self.accelerator.distributed_type.value}; accelerate applies FSDP only on "
                "accelerators), so training would run as plain DDP with the whole model on every rank. Without GPUs "
                "use ds_ring.fully_shard in your own training loop, or remove the FSDP configuration to train as DDP")

    # ----- loss --------------------------------------------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """The next ``num_batches`` batches and ``num_items_in_batch`` counted once per ring (see ``_num_items``)."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        return batches, self._num_items(batches, device)

    def _num_items(self, batches: list, device: torch.device) -> torch.Tensor | None:
        """``Trainer``'s ``num_items_in_batch`` with rings as the data-parallel ranks: the targets in ``batches`` (full
        sequences, the same on every rank of a ring), summed over the rings with ``average_tokens_across_devices``.
        None where ``Trainer`` normalises per batch instead (a model that takes no loss kwargs)."""
        if not batches or "labels" not in batches[0] or not self.model_accepts_loss_kwargs:
            return None
        n = sum(_targets(b["labels"]) for b in batches).to(device)
        if self.args.average_tokens_across_devices and self.sp.dp_size > 1:
            dist.all_reduce(n, group=self.sp.dp_group)
        return n

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ):
        """The ring's loss of ``inputs`` (a full batch: (B, S) tensors, the same on every rank of the ring), as the
        trainer family's adapter computes it (``LOSS_ADAPTERS``).

        Value: what the plain trainer computes on one data-parallel rank for this batch, identical on the ring's
        ranks. Gradient: this rank's share of it (the shares sum to the ring's gradient). ``outputs`` (with
        ``return_outputs``) are this rank's shard: logits (B, S_pad / sp_size, V)."""
        if self._sp_loss.needs_labels and "labels" not in inputs:
            raise ValueError(f"{type(self).__name__}.compute_loss needs labels in the batch (causal-LM targets)")
        return self._sp_loss.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def _normalise(self, loss: torch.Tensor, inputs: dict[str, torch.Tensor],
                   num_items_in_batch: torch.Tensor | None) -> torch.Tensor:
        """The ring's mean loss over this batch's targets, normalised as ``Trainer`` (and TRL) normalise a rank's:
        ``sum over the batch / num_items_in_batch``, times the number of data-parallel ranks with
        ``average_tokens_across_devices``."""
        if num_items_in_batch is not None:
            loss = loss * (_targets(inputs["labels"]) / num_items_in_batch)
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counted every ring: as Trainer's `loss *= num_processes`, which the average of
                # the rings' gradients (and of their logged losses) divides out again
                loss = loss * self.sp.dp_size
        return loss

    def _shard(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """This rank's shard of the full batch ``inputs`` for the model, and its shift_labels (None without labels).

        Whatever ``shard_batch`` returns is what the model gets (global position_ids, and the keys it understands),
        so batches with keys it cannot shard fail there with the key named."""
        config = self.accelerator.unwrap_model(model).config
        local = shard_batch(inputs, self.sp, pad_token_id=getattr(config, "pad_token_id", None) or 0)
        return local, local.pop("shift_labels", None)

    def _forward_shard(self, model: nn.Module, inputs: dict[str, torch.Tensor], with_labels: bool = False):
        """Run this rank's shard of the full batch ``inputs``; returns (outputs, shift_labels or None).
        ``with_labels``: the model gets ``shift_labels`` too (the chunked loss of ``optimize_memory``: ``outputs.loss``
        is the ring's loss and there are no logits)."""
        local, shift_labels = self._shard(model, inputs)
        if with_labels:
            return model(**local, shift_labels=shift_labels, use_cache=False), shift_labels
        return model(**local, use_cache=False), shift_labels

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Trainer.training_step`` (forward and backward) inside ``ds_ring.offload_context``: DeepSpeed's checkpoint
        offload when ``memory`` turned it on and the model is on an accelerator, else a no-op."""
        with offload_context(self.accelerator.unwrap_model(model)):
            return super().training_step(model, inputs, *args, **kwargs)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``Trainer.prediction_step`` for a ring: the ring's loss (as in training, for this one batch), and unless
        ``prediction_loss_only`` the FULL-sequence logits (B, S, V), gathered over the ring (every rank of the ring
        then holds them: S x V per row), and the labels. Other model outputs are not returned."""
        if self._sp_loss.owns_prediction_step:
            return self._sp_loss.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            if labels is None:
                outputs, loss = self._forward_shard(model, inputs)[0], None
            else:
                num_items = self._num_items([inputs], self.args.device)
                if prediction_loss_only:  # no outputs needed: the chunked loss (with memory=) holds no logits
                    return self.compute_loss(model, inputs, num_items_in_batch=num_items).detach(), None, None
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items)
                loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        logits = gather_sequence(outputs.logits.detach(), 1, self.sp.group, self.sp.sequence_layout)
        return loss, logits[:, : inputs["input_ids"].shape[1]], labels

    # ----- bookkeeping that counts ranks -------------------------------------------------------------------------

    def get_total_train_batch_size(self, args) -> int:
        """Samples per optimizer step: the rings are the data-parallel ranks."""
        return self._train_batch_size * args.gradient_accumulation_steps * self.sp.dp_size

    def floating_point_ops(self, inputs: dict[str, torch.Tensor]) -> int:
        """This rank's share of the ring's FLOPs (Trainer sums them over all ranks)."""
        return super().floating_point_ops(inputs) // self.sp.sp_size


class SequenceParallelTrainer(SequenceParallelMixin, Trainer):
    """``transformers.Trainer`` with ds_ring sequence parallelism; see :class:`SequenceParallelMixin` for the extra
    arguments (``sp_size``, ``layout``, ``ulysses_size``, ``segment_lengths``, ``dilation_rates``, ``sp``,
    ``memory``)."""


# ----- loss adapters: the trainer families whose loss (and logged metrics) the mixin implements ----------------------


class LossAdapter:
    """How the mixin computes one trainer family's loss over the ring, and what of that family it refuses.

    ``compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)``: ``inputs`` is the FULL batch (the
    same on every rank of the ring); returns what the family's ``compute_loss`` returns, with the ring's value on
    every rank and this rank's gradient share (``trainer._shard``, ``trainer._normalise`` and
    ``ds_ring.training.loss.ring_mean_and_sums`` are the pieces). ``check(trainer, memory)`` raises, naming the
    option and the fix, for what the adapter does not implement (run at construction)."""

    describes: ClassVar[str] = ""
    owns_prediction_step: ClassVar[bool] = False  # True: prediction_step below replaces the mixin's
    needs_labels: ClassVar[bool] = True  # the batch carries causal-LM ``labels`` (a preference batch does not)

    def before_init(self, trainer: SequenceParallelMixin) -> None:
        """Before the family's ``__init__`` runs (e.g. to hold back work it would do before the rings exist)."""

    def check(self, trainer: SequenceParallelMixin, memory: dict[str, Any] | None) -> None:
        pass

    def memory_options(self, memory: dict[str, Any] | None) -> dict[str, Any] | None:
        """The memory switch's options as this family uses them (e.g. without a chunked loss it replaces)."""
        return memory

    def setup(self, trainer: SequenceParallelMixin, sp: SequenceParallel, segment_lengths, dilation_rates) -> None:
        """After the mixin has patched the model and made accelerate ring-aware."""

    def prediction_step(self, trainer, model, inputs, prediction_loss_only, ignore_keys):
        raise NotImplementedError

    def compute_loss(self, trainer: SequenceParallelMixin, model: nn.Module, inputs: dict[str, torch.Tensor],
                     return_outputs: bool, num_items_in_batch: torch.Tensor | None):
        raise NotImplementedError


class CausalLMLoss(LossAdapter):
    """``transformers.Trainer``: the causal-LM loss (transformers' ForCausalLMLoss) over the ring, or the chunked
    loss of ``optimize_memory`` where nobody asks for the outputs (training, loss-only evaluation)."""

    describes = "the causal-LM loss"

    def compute_loss(self, trainer, model, inputs, return_outputs, num_items_in_batch):
        opts = getattr(state_of(trainer.accelerator.unwrap_model(model)), "memory", None)  # set by optimize_memory
        chunked = opts is not None and opts.chunked_loss and not return_outputs
        outputs, shift_labels = trainer._forward_shard(model, inputs, with_labels=chunked)
        # mean over this batch's targets in the ring
        loss = outputs.loss if chunked else causal_lm_loss(outputs.logits, shift_labels, trainer.sp)
        loss = trainer._normalise(loss, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class SFTLoss(LossAdapter):
    """TRL's ``SFTTrainer``: its loss (``loss_type`` "nll" or "dft") from its fused LM head, and the metrics it logs
    (``entropy``, ``mean_token_accuracy`` over the ring's targets; ``num_tokens`` over each ring's batch once), with
    the plain SFTTrainer's values. ``completion_only_loss`` / ``assistant_only_loss`` act through the labels (TRL's
    collator sets -100 outside the completion / assistant turns), which ``shard_batch`` shifts before sharding, so
    they keep their meaning. Packed (BFD, padding-free) and padded batches."""

    describes = "the SFT loss and its logged metrics"

    def check(self, trainer, memory):
        refused = {
            f"loss_type={trainer.args.loss_type!r}": (trainer.args.loss_type not in ("nll", "dft"),
                                                      "use loss_type='nll' or 'dft'"),
            "a MoE router auxiliary loss": (getattr(trainer, "aux_loss_enabled", False),
                                            "set the config's router_aux_loss_coef to 0 (it is a per-shard mean)"),
            "memory= with chunked_loss": (memory is not None and memory.get("chunked_loss", True),
                                          "TRL's fused LM head never holds the logits already: leave chunked_loss "
                                          "out of memory= (e.g. memory='checkpointing,tiled_mlp')"),
        }
        for name, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"{type(trainer).__name__}: {name} is not supported under sequence parallelism: "
                                 f"{fix}")

    def compute_loss(self, trainer, model, inputs, return_outputs, num_items_in_batch):
        mode = "train" if trainer.model.training else "eval"
        local, shift_labels = trainer._shard(model, inputs)
        # TRL's fused head scores pre-shifted shift_labels without shifting again (its sequence-parallel entry)
        outputs = model(**local, shift_labels=shift_labels, fused_lm_head=True, use_cache=False)
        per_token = -outputs.log_probs.float()  # zero on ignored targets
        if trainer.args.loss_type == "dft":  # as SFTTrainer: https://huggingface.co/papers/2508.05629
            per_token = per_token * outputs.log_probs.exp().detach()
        loss, valid, (entropy, correct) = ring_mean_and_sums(
            per_token.sum(), shift_labels.to(per_token.device), trainer.sp,
            extra=(outputs.entropy.float().sum(), outputs.is_top1.sum()))
        loss = trainer._normalise(loss, inputs, num_items_in_batch)
        self._log_metrics(trainer, mode, inputs, valid, entropy, correct)
        if return_outputs:  # the logits, as SFTTrainer recomputes them for compute_metrics
            with torch.no_grad():
                outputs = model(**local, use_cache=False)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _log_metrics(trainer, mode: str, inputs, valid, entropy, correct) -> None:
        """SFTTrainer's bookkeeping with the ring's sums (equal on its ranks; the ring-aware gather counts each ring
        once). ``num_tokens`` from the full batch, as SFTTrainer counts it."""
        gather = trainer.accelerator.gather_for_metrics
        valid, entropy, correct = (gather(t).sum() for t in (valid, entropy, correct))
        trainer._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        trainer._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":  # padding-free rows carry no attention_mask: every position is a token
            ids = inputs["input_ids"]
            n = inputs["attention_mask"].sum() if "attention_mask" in inputs else \
                torch.tensor(inputs["position_ids"].size(1) if "position_ids" in inputs else ids.numel(),
                             device=ids.device)
            trainer._total_train_tokens += gather(n).sum().item() // trainer._tp_size
        trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


# Trainer classes whose loss the mixin implements -> the adapter it uses. Keyed by (top-level package, class name) so
# that no optional library is imported to build the table. The class that owns the loss is the first class after the
# mixin in the trainer's MRO that defines compute_loss; a trainer whose loss owner is not here is refused at
# construction (its loss would silently be replaced by another one).
LOSS_ADAPTERS: dict[tuple[str, str], LossAdapter | str] = {
    ("transformers", "Trainer"): CausalLMLoss(),
    ("trl", "SFTTrainer"): SFTLoss(),
    # imported on use (trl is only needed then); the adapter lives beside the TRL code it hooks into
    ("trl", "DPOTrainer"): "ds_ring.integrations.dpo:DPOAdapter",
}


def loss_adapter(cls: type) -> LossAdapter:
    """The adapter for the trainer class ``cls`` (a subclass of ``SequenceParallelMixin``), or NotImplementedError
    naming the class whose loss is not implemented and what is supported."""
    mro = cls.__mro__
    below = mro[mro.index(SequenceParallelMixin) + 1:] if SequenceParallelMixin in mro else mro
    owner = next((c for c in below if "compute_loss" in vars(c)), None)
    key = None if owner is None else (owner.__module__.split(".")[0], owner.__name__)
    if key not in LOSS_ADAPTERS:
        supported = "; ".join(f"{m}.{n} ({_resolve(a).describes})" for (m, n), a in LOSS_ADAPTERS.items())
        where = "defines no compute_loss" if owner is None else \
            f"computes its loss in {owner.__module__}.{owner.__qualname__}.compute_loss"
        raise NotImplementedError(
            f"{cls.__name__}: SequenceParallelMixin does not implement the loss of "
            f"{'it' if owner is None else owner.__name__} ({where}), so under sequence parallelism it would train "
            f"another objective. Supported: {supported}; subclass one of those with the mixin")
    return _resolve(LOSS_ADAPTERS[key])


def _resolve(adapter: LossAdapter | str) -> LossAdapter:
    """A table entry as an adapter: "module:Class" is imported and instantiated when used (adapters hold no state,
    so a fresh one per trainer is the same as a shared one)."""
    if isinstance(adapter, str):
        import importlib

        module, name = adapter.split(":")
        adapter = getattr(importlib.import_module(module), name)()
    return adapter


# ----- accelerate: the places where it assumes that every process is a data-parallel rank --------------------------


def _make_accelerator_ring_aware(accelerator, sp: SequenceParallel, state: RingState) -> None:
    """Override, on this Accelerator instance only, the three methods that treat every process as a data-parallel
    rank, recorded in the model's ``state`` (``ds_ring.unpatch`` puts them back). accelerate has no notion of ranks
    sharing a batch other than its own ``parallelism_config``, which only runs DeepSpeed Ulysses with its built-in
    attention names, so it cannot carry ds_ring's rings."""
    from accelerate.data_loader import prepare_data_loader
    from accelerate.utils import DistributedType, recursively_apply

    def ring_prepare_data_loader(data_loader, device_placement=None, slice_fn_for_dispatch=None):
        # Accelerator.prepare_data_loader with the rings as the processes.
        if getattr(data_loader, "_is_accelerate_prepared", False):
            if data_loader not in accelerator._dataloaders:
                accelerator._dataloaders.append(data_loader)
            return data_loader
        rng_types = accelerator.rng_types.copy()
        if sp.dp_size == 1 and sp.sp_size > 1:
            # One ring: accelerate leaves the sampler alone, and a shuffling sampler seeds itself from the global
            # RNG; the ring's ranks must draw the same order, so they take rank 0's RNG state at each epoch.
            rng_types.append("torch")
        prepared = prepare_data_loader(
            data_loader, accelerator.device, num_processes=sp.dp_size, process_index=sp.dp_rank,
            split_batches=accelerator.split_batches,
            put_on_device=accelerator.device_placement if device_placement is None else device_placement,
            rng_types=rng_types, dispatch_batches=False, even_batches=accelerator.even_batches,
            slice_fn_for_dispatch=slice_fn_for_dispatch, use_seedable_sampler=accelerator.use_seedable_sampler,
            data_seed=accelerator.dataloader_config.data_seed, non_blocking=accelerator.non_blocking,
            use_stateful_dataloader=accelerator.use_stateful_dataloader,
        )
        accelerator._dataloaders.append(prepared)
        return prepared

    world_gather = accelerator.gather

    def first_rank_of_each_ring(t: torch.Tensor) -> torch.Tensor:
        # a gathered tensor is the world's per-rank blocks in rank order; the rings are consecutive ranks
        return t.reshape(sp.world_size, -1, *t.shape[1:])[:: sp.sp_size].reshape(-1, *t.shape[1:])

    def ring_gather(tensor):
        return recursively_apply(first_rank_of_each_ring, world_gather(tensor))

    plain_prepare = accelerator.prepare

    def ring_prepare(*args, device_placement=None):
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        with _deepspeed_initialize_with_rings(sp) if deepspeed else contextlib.nullcontext():
            out = plain_prepare(*args, device_placement=device_placement)
        for obj in out if isinstance(out, tuple) else (out,):
            if isinstance(obj, nn.parallel.DistributedDataParallel) and sp.sp_size > 1:
                obj.register_comm_hook(gradient_divisor(sp), ddp_comm_hook)
            elif getattr(accelerator, "is_fsdp2", False) and isinstance(obj, nn.Module):  # as ds_ring.fully_shard
                apply_gradient_rule(obj, sp)
        return out

    for name, method in (("prepare_data_loader", ring_prepare_data_loader), ("gather", ring_gather),
                         ("prepare", ring_prepare)):
        state.swap(accelerator, name, method, TRAINER)


def _has_fsdp2_units(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _fsdp_version_asked(accelerator, args) -> int | None:
    """The FSDP version the run is configured for, None without FSDP: accelerate's plugin where it made one (only on
    accelerators), else ``TrainingArguments(fsdp=..., fsdp_config=...)``, else ``accelerate launch``'s FSDP config
    (its ACCELERATE_USE_FSDP / FSDP_VERSION environment, version 1 by default as in accelerate)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        return int(plugin.fsdp_version)
    if getattr(args, "fsdp_plugin_args", None):
        return int(args.fsdp_plugin_args.get("fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


@contextlib.contextmanager
def _deepspeed_initialize_with_rings(sp: SequenceParallel) -> Iterator[None]:
    """While accelerate prepares, its call to ``deepspeed.initialize`` goes to ``ds_ring.integrations.deepspeed.
    initialize``: the one place that hands ds_ring's groups to DeepSpeed as ``mpu`` (accelerate passes an mpu only
    for its own Ulysses) and makes gradients exact for every ZeRO stage."""
    import deepspeed

    from . import deepspeed as deepspeed_integration

    plain = deepspeed.initialize

    def initialize(*, model, config_params: dict, **kwargs):
        deepspeed.initialize = plain  # accelerate has taken this function; ds_ring's initialize calls the real one
        config = dict(config_params)
        # accelerate counted every process as data-parallel; with the mpu DeepSpeed counts the rings
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                      * config["gradient_accumulation_steps"] * sp.dp_size)
        return deepspeed_integration.initialize(model, sp, config, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = plain
