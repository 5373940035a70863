"""Start local ranks: spawned processes that rendezvous on 127.0.0.1. The demo, the tests and the benchmarks use it;
real jobs use torchrun, deepspeed or accelerate launch."""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..parallel.lifecycle import teardown

EXIT_GRACE_S = 30.0  # how long a rank that returned its result may take to exit
PEER_GRACE_S = 10.0  # how long the other ranks may take to report once one has failed


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to kill this rank when the process that started it dies (a killed benchmark or test run would
    otherwise leave its ranks running, still computing and printing). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():  # it died while this rank was still importing
        os._exit(1)


def _worker(rank, world, port, threads, init_gloo, pg_timeout_s, fn, args, queue):
    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        if init_gloo:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
        # plain pickle copies tensors by value: torch's shared-memory handles would die with this process
        result = pickle.dumps(fn(rank, world, *args))
        teardown(destroy_default=True)  # the orderly end every script should have; the parent checks the exit code
        queue.put((rank, "ok", result))
    except BaseException:  # every failure goes to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():  # after a failure: no barrier (the peers may be gone)
            dist.destroy_process_group()


def _exit_status(code: int | None) -> str:
    if code is None:
        return f"did not exit within {EXIT_GRACE_S:.0f}s"
    if code < 0:
        return f"exited with code {code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


# What a preloaded fork server imports once (spawn_local's ``preload``): the modules every rank of ds_ring's tests and
# benchmark smoke runs needs, about 5 s of imports per fresh interpreter on a 2-core machine.
PRELOAD = ("torch", "torch.distributed", "transformers", "deepspeed", "accelerate", "ds_ring")


def mp_context(preload: Sequence[str] = ()):
    """The multiprocessing context of local ranks: ``spawn`` (a fresh interpreter per rank), or with ``preload`` the
    ``forkserver`` that imports those modules once (see :func:`spawn_local`)."""
    if not preload:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def spawn_local(
    fn: Callable, world_size: int, *args, threads: int = 1, init_gloo: bool = True, timeout_s: float = 1800.0,
    pg_timeout_s: float = 600.0, preload: Sequence[str] = (),
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    Each process gets the launcher variables (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, ...), ``threads`` torch
    threads and, with ``init_gloo``, a gloo process group; after ``fn`` returns, each rank ends with
    ``ds_ring.teardown``. ``fn`` must be a module-level function. Raises RuntimeError with every failed rank's
    traceback, when a rank dies without reporting, after ``timeout_s``, and when a rank that returned its result then
    exits with a non-zero code (e.g. SIGABRT at interpreter exit) or does not exit: a launcher would fail that run.

    ``preload`` (module names): fork the ranks from one ``forkserver`` process that has imported them once, instead
    of starting fresh interpreters that each import torch, transformers and deepspeed (seconds per rank). The server
    lives as long as this process, so repeated calls (a test suite) pay the imports once. The ranks see the
    environment of the first such call. Trade-off: a forked rank ends with ``os._exit``, so it never runs interpreter
    finalization, where the exit-time aborts of issue 13 happen: runs that must see those use the default (a fresh
    interpreter per rank, like every launcher).
    """
    ctx = mp_context(preload)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, threads, init_gloo, pg_timeout_s, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors, reported = {}, [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(reported) < world_size:
            try:
                rank, status, payload = queue.get(timeout=5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"rank(s) {dead} died without reporting (exit codes "
                                  f"{[procs[r].exitcode for r in dead]})")
                    break
                if time.monotonic() > deadline:
                    silent = sorted(set(range(world_size)) - reported)
                    errors.append(f"rank(s) {silent} did not report within "
                                  + (f"{PEER_GRACE_S:.0f}s of the first failure" if errors else f"{timeout_s:.0f}s"))
                    break
                continue
            reported.add(rank)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                # peers that finished wait in teardown's barrier for this rank: do not wait their timeout out
                deadline = min(deadline, time.monotonic() + PEER_GRACE_S)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else EXIT_GRACE_S)
            if p.is_alive():
                p.kill()
    if not errors:
        errors = [f"rank {r} returned its result but {_exit_status(p.exitcode)}" for r, p in enumerate(procs)
                  if p.exitcode != 0]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
