"""What ds_ring did to one model: a single ``RingState`` per model, and how to undo all of it.

``ds_ring.patch`` (ring settings, the attention implementation it replaced, its forward pre-hook),
``ds_ring.optimize_memory`` (memory options, swapped forwards, the tiled MLP's hook, the offload manager) and the
Trainer (the accelerator methods it overrides) record every change here, each with the call that undoes it.
``ds_ring.restore_memory`` undoes the memory options' changes, ``ds_ring.unpatch`` all of them; when nothing is left
the state leaves the model, which is then as it was before.

The state sits on the model and on each of its modules as ``_ds_ring`` (the same object): the attention function
and the swapped forwards only see the module they run for. It lives in ``training`` because ``optimize_memory`` is
the lowest layer that changes a model; ``integrations`` (patch, Trainer) use it from above.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..parallel.groups import SequenceParallel

ATTR = "_ds_ring"  # the one attribute ds_ring sets on a model and its modules

# Who made a change, i.e. which call undoes it: restore_memory undoes MEMORY, unpatch all three.
PATCH, MEMORY, TRAINER = "patch", "memory", "trainer"



@dataclass(frozen=True)
class MemoryOptions:
    """What ``optimize_memory`` switched on for a model (its ``RingState.memory``)."""

    checkpointing: bool = True
    chunked_loss: bool = True
    tiled_mlp: bool = True
    offload_checkpoints: bool | str = "auto"  # "auto": on when the model's parameters are on an accelerator
    lean_norms: bool = True  # Llama-formula RMSNorms keep their input and a per-row fp32 scale (training/norms.py)
    loss_chunk_tokens: int | None = None  # None: ds_ring.training.loss.LOSS_CHUNK_ELEMENTS // vocab
    mlp_chunk_tokens: int | None = None  # None: hidden_size (DeepSpeed's TiledMLP default)


class _Absent:
    """Marks an attribute the object did not have (the class's shows through); the same after a deep copy."""

    def __deepcopy__(self, memo: dict) -> _Absent:
        return self


_ABSENT = _Absent()


def _put_back(obj: Any, name: str, previous: Any) -> None:
    if previous is _ABSENT:
        del obj.__dict__[name]  # the class's attribute shows through again
    else:
        setattr(obj, name, previous)


@dataclass(eq=False)
class RingState:
    """Everything ds_ring changed on one model, and the calls that undo it, newest last."""

    settings: Any = None  # patch: the model's RingSettings (integrations.transformers); None: not patched
    fingerprint: int | None = None  # patch: code of model class, config and settings (equal iff the ranks agree)
    memory: MemoryOptions | None = None  # optimize_memory's options; None: not optimized
    sp: SequenceParallel | None = None  # optimize_memory's ring: the chunked loss reduces over it
    mlp_chunk_tokens: int | None = None  # tiled MLP: rows per tile
    mlp_tiles: int | None = None  # tiled MLP: the tiles agreed for this forward under ZeRO-3 (None: each rank's own)
    offload_manager: Any = None  # DeepSpeed's checkpoint offload, made on first use and reused every step
    offload_warned: bool = False  # the "nothing is offloaded on the CPU" warning was given
    changes: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (who, undo)

    def record(self, who: str, undo: Callable[[], None]) -> None:
        """Remember a change made by ``who`` (PATCH, MEMORY, TRAINER). ``undo`` is a bound method or a
        ``functools.partial`` (not a closure), so that a deep copy of the model undoes its own modules' changes."""
        self.changes.append((who, undo))

    def swap(self, obj: Any, name: str, value: Any, who: str) -> None:
        """Set ``obj.<name> = value`` (a forward, an accelerator method) and record how to put the old one back."""
        previous = obj.__dict__.get(name, _ABSENT)
        setattr(obj, name, value)
        self.record(who, functools.partial(_put_back, obj, name, previous))

    def record_attributes(self, model: nn.Module, who: str, change: Callable[[], None]) -> None:
        """Run ``change()`` (another library's switch) and record, for every module of ``model``, each instance
        attribute it set or replaced, to be put back exactly as it was (or removed)."""
        before = {m: dict(vars(m)) for m in model.modules()}
        change()
        for m, old in before.items():
            for name, value in vars(m).items():
                if old.get(name, _ABSENT) is not value:
                    self.record(who, functools.partial(_put_back, m, name, old.get(name, _ABSENT)))

    def undo(self, *whos: str) -> None:
        """Undo the changes of ``whos`` (all when none is given), newest first, and forget what they set."""
        whos = whos or (PATCH, MEMORY, TRAINER)
        for who, fn in reversed(self.changes):
            if who in whos:
                fn()
        self.changes = [c for c in self.changes if c[0] not in whos]
        if PATCH in whos:
            self.settings = self.fingerprint = None
        if MEMORY in whos:
            self.memory = self.sp = self.mlp_chunk_tokens = self.mlp_tiles = self.offload_manager = None
            self.offload_warned = False

    @property
    def empty(self) -> bool:
        return self.settings is None and self.memory is None and not self.changes

    def __deepcopy__(self, memo: dict) -> RingState:
        # A copied model gets its own record of its own modules' changes (the undo calls' targets are remapped by
        # deepcopy); settings, options and the ring are immutable or handles and are shared; the offload manager is
        # per model and made again on first use; the Trainer's overrides stay with the Trainer's accelerator.
        new = copy.copy(self)
        memo[id(self)] = new
        new.changes = copy.deepcopy([c for c in self.changes if c[0] != TRAINER], memo)
        new.offload_manager = None
        return new


def state_of(module: nn.Module) -> RingState | None:
    """The RingState of a model (or of one of its modules), None if ds_ring has not changed it."""
    return module.__dict__.get(ATTR)


def attach(model: nn.Module) -> RingState:
    """The model's RingState, made and put on the model and every module if there is none."""
    state = state_of(model)
    if state is None:
        state = RingState()
        for m in model.modules():
            setattr(m, ATTR, state)
    return state


def detach_if_empty(model: nn.Module) -> None:
    """Take the state off the model and its modules once nothing ds_ring did is left."""
    state = state_of(model)
    if state is not None and state.empty:
        for m in model.modules():
            if m.__dict__.get(ATTR) is state:
                del m.__dict__[ATTR]
