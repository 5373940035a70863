"""Run a function on real ranks: spawned processes over gloo on loopback, no mocks."""

from __future__ import annotations

from ds_ring.tools.launch import free_port, spawn_local

__all__ = ["free_port", "run_distributed"]


# Imported once by a fork server for the whole session: each spawn then starts in milliseconds instead of paying
# ~5 s of imports per rank (most of the suite's time on a 2-core machine). Exit-time behaviour (interpreter
# finalization, issue 13) is checked where it happens, in fresh interpreters: tests/test_exit.py, the launcher tests.
PRELOAD = ("torch", "torch.distributed", "transformers", "deepspeed", "accelerate", "ds_ring")


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0, pg_timeout_s: float = 120.0,
                    fresh_interpreters: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    ``fn`` must be a module-level function (it is pickled). A rank's exception is raised here with its traceback.
    ``fresh_interpreters``: spawn new interpreters (as launchers do) instead of forking from the preloaded server.
    """
    return spawn_local(fn, world_size, *args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s,
                       preload=() if fresh_interpreters else PRELOAD)
