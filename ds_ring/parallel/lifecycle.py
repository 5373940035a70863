"""The start and the end of a distributed run: the default process group ds_ring may create, and ``teardown``, which
leaves every rank able to exit 0."""

from __future__ import annotations

import gc
import os
import types
import warnings
import weakref
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

_CREATED_DEFAULT = False  # ds_ring initialised the default group: teardown destroys it (and with it every group)
_RELEASERS: list[Callable[[], None]] = []  # what other layers keep alive for the process; see on_teardown


def on_teardown(release: Callable[[], None]) -> Callable[[], None]:
    """Register ``release`` to run in :func:`teardown` before garbage collection: an integration (DeepSpeed) drops
    what its library keeps for the life of the process, so the groups can be freed. A registry rather than an import
    of the integration: this layer sits below every integration."""
    if release not in _RELEASERS:
        _RELEASERS.append(release)
    return release


def init_distributed(backend: str | None = None, timeout: timedelta | float | None = None) -> None:
    """Initialise the default process group from the launcher's environment (torchrun, deepspeed, accelerate).

    Does nothing when it is already initialised. ``backend`` defaults to NCCL with CUDA, else gloo. ``timeout``
    (seconds or timedelta; torch's default when None) bounds how long a collective waits for a dead rank.
    A group initialised here is destroyed by :func:`teardown`.
    """
    global _CREATED_DEFAULT
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "torch.distributed is not initialised and RANK/WORLD_SIZE are not set: start the script with torchrun, "
            "deepspeed or accelerate launch, or call torch.distributed.init_process_group first"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    _CREATED_DEFAULT = True


def release_captured_default_group() -> int:
    """Make functions that captured the live default group as a default argument default to ``None`` again.

    ``torch.distributed.nn.functional`` (imported by transformers through ``torch.distributed.fsdp``) and
    deepspeed's ``comm/torch.py`` write ``group=group.WORLD`` as default arguments, evaluated at import. Imported
    after ``init_process_group`` they hold the default group for good, so ``destroy_process_group()`` cannot free it.
    ``None`` is what those defaults are when the modules are imported first, and it means "the default group" to
    every torch.distributed call, so nothing changes for the callers. A scan of all functions (about 50 ms with
    transformers and deepspeed loaded) rather than a list of known sites: any library can do this. Returns how many
    defaults were reset.
    """
    world = dist.group.WORLD if dist.is_initialized() else None
    if world is None:
        return 0
    n = 0
    for f in gc.get_objects():
        if type(f) is not types.FunctionType:  # not isinstance: it reads __class__, which some objects intercept
            continue
        if f.__defaults__ and any(d is world for d in f.__defaults__):
            f.__defaults__ = tuple(None if d is world else d for d in f.__defaults__)
            n += 1
        if f.__kwdefaults__ and any(d is world for d in f.__kwdefaults__.values()):
            f.__kwdefaults__ = {k: None if d is world else d for k, d in f.__kwdefaults__.items()}
            n += 1
    return n


def _describe(group: dist.ProcessGroup) -> str:
    if group is dist.group.WORLD:
        return "the default process group"
    return f"the process group of ranks {dist.get_process_group_ranks(group)}"


def teardown(*, destroy_default: bool | None = None) -> None:
    """End the distributed part of a run so that every rank exits with code 0. Call it on every rank at the end, once
    the objects that use the groups (DeepSpeed engine, patched model, ``SequenceParallel``) are gone, e.g. after your
    training function has returned.

    1. waits for outstanding work: CUDA streams, then a barrier over all ranks;
    2. drops what pins the groups: default arguments that captured the default group
       (:func:`release_captured_default_group`), what DeepSpeed keeps after ``engine.destroy()``
       (what integrations registered with :func:`on_teardown`, e.g. ``integrations.deepspeed.release_references``), and garbage cycles
       (a finished engine or model is freed now, while Python runs);
    3. when ds_ring initialised the default group (``init_distributed``, ``init_sequence_parallel``) or
       ``destroy_default=True``: destroys it, and with it every group (ds_ring's included). Otherwise the groups
       stay until the default group's owner destroys it (e.g. ``PartialState().destroy_process_group()`` with
       accelerate); until then they remain usable.

    A destroyed group that something still references stays alive until exit, where it can abort the process: rank
    0 then warns naming it. Without a process group this does nothing; calling it twice is harmless.
    """
    global _CREATED_DEFAULT
    if not dist.is_initialized():
        return
    if destroy_default is None:
        destroy_default = _CREATED_DEFAULT
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    dist.barrier()
    release_captured_default_group()
    for release in _RELEASERS:
        release()
    gc.collect()
    if not destroy_default:
        return
    rank = dist.get_rank()
    watched = [(_describe(g), weakref.ref(g)) for g in list(dist.distributed_c10d._world.pg_map)]
    dist.destroy_process_group()
    _CREATED_DEFAULT = False
    alive = [name for name, ref in watched if ref() is not None]
    if alive and rank == 0:
        warnings.warn(
            f"ds_ring.teardown: {', '.join(alive)} {'is' if len(alive) == 1 else 'are'} destroyed but still "
            "referenced; the threads of a group stay alive until exit, where they can abort the process (SIGABRT). "
            "Call teardown once the DeepSpeed engine, the patched model and the SequenceParallel are gone (e.g. "
            "after your training function returns).",
            RuntimeWarning, stacklevel=2,
        )
