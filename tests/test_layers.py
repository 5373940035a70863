"""The package's shape: layers import only downward, and the public API stays where users import it from."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import ds_ring

PACKAGE = Path(ds_ring.__file__).parent
# Bottom to top: a module may import from its own layer and the layers before it in this list.
LAYERS = ("op", "parallel", "training", "planning", "integrations", "tools")

# The public names of ds_ring as of 5df9d17 (before the layers); removing one breaks users.
PUBLIC = {
    "LAYOUTS", "ConfigError", "Layout", "MemoryEstimate", "MemoryOptions", "RingDilatedAttention",
    "RingDilatedMultiheadAttention", "RingFacts", "SequenceParallel", "SequenceParallelMixin",
    "SequenceParallelTrainer", "causal_lm_loss", "chunked_causal_lm_loss", "count_comm", "deepspeed_initialize",
    "gather_sequence", "get_layout", "init_distributed", "init_sequence_parallel", "load_config", "local_attention",
    "measure_peak_bytes", "memory_estimate", "offload_context", "optimize_memory", "patch", "plan", "restore_memory",
    "ring_dilated_attention", "sequence_logprobs", "shard_batch", "shard_sequence", "sp_dataloader", "teardown",
    "token_logprobs", "unpatch",
    "fully_shard",  # issue 18
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, ds_ring module path) for every import of ds_ring inside ``path``, function-level ones included."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    pkg = parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out += [(node.lineno, n) for n in names if n.startswith("ds_ring")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("ds_ring")]
    return out


def _layer(module: str) -> str | None:
    if module == "ds_ring":
        return "integrations"  # the package root re-exports every layer up to integrations: tools may use it
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the layer folders: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == sorted(LAYERS)


def test_layers_import_only_downward():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue  # the package's __init__ re-exports every layer
        own = path.relative_to(PACKAGE).parts[0]
        for line, target in _imports(path):
            layer = _layer(target)
            assert layer is not None, f"{path}:{line} imports {target}, which is in no layer"
            if LAYERS.index(layer) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({layer})")
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


def test_each_layer_says_what_it_holds_and_may_import():
    for layer in LAYERS:
        doc = importlib.import_module(f"ds_ring.{layer}").__doc__ or ""
        assert "Imports:" in doc, f"ds_ring/{layer}/__init__.py's docstring must say what the layer may import"


def test_public_api_is_pinned():
    assert PUBLIC <= set(ds_ring.__all__), f"public names lost: {PUBLIC - set(ds_ring.__all__)}"
    for name in ds_ring.__all__:
        assert getattr(ds_ring, name) is not None
        exec(f"from ds_ring import {name}", {})
