"""Run a function on real ranks: spawned processes over gloo on loopback, no mocks."""

from __future__ import annotations

from ds_ring.tools.launch import PRELOAD, free_port, spawn_local

__all__ = ["free_port", "run_distributed"]


# PRELOAD is imported once by a fork server for the whole session: each spawn then starts in milliseconds instead of
# paying ~5 s of imports per rank (most of the suite's time on a 2-core machine). Exit-time behaviour (interpreter
# finalization, issue 13) is checked where it happens, in fresh interpreters: tests/test_exit.py, the launcher tests.


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0, pg_timeout_s: float = 120.0,
                    fresh_interpreters: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    ``fn`` must be a module-level function (it is pickled). A rank's exception is raised here with its traceback.
    ``fresh_interpreters``: spawn new interpreters (as launchers do) instead of forking from the preloaded server.
    """
    return spawn_local(fn, world_size, *args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s,
                       preload=() if fresh_interpreters else PRELOAD)


# The three launchers an example must exit 0 under, each on 2 local ranks over 127.0.0.1: name -> (script, its argv)
# -> the command. accelerate runs the ZeRO-3 YAML with the memory switch on (it must not change the objective).
LAUNCHERS = {
    "deepspeed": lambda script, argv: [
        "deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *argv, "--deepspeed", "ds_config/zero3.json"],
    "torchrun": lambda script, argv: [
        "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *argv],
    "accelerate": lambda script, argv: [
        "accelerate", "launch", "--config_file", "integrations/accelerate/zero3.yaml", "--main_process_port",
        str(free_port()), str(script), *argv, "--memory", "long"],
}


def load_example(path):
    """An example script (examples/*.py) imported as a module, to call its functions in the test's process."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
