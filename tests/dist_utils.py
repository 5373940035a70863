"""Run a function on real ranks: spawned processes over gloo on loopback, no mocks."""

from __future__ import annotations

from ds_ring.launch import free_port, spawn_local

__all__ = ["free_port", "run_distributed"]


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0, pg_timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    ``fn`` must be a module-level function (it is pickled). A rank's exception is raised here with its traceback.
    """
    return spawn_local(fn, world_size, *args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s)
