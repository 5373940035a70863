"""Random causal-LM batches for the training tests: fresh tokens, row 1 right-padded so that shards hold unequal
numbers of valid targets."""

from __future__ import annotations

import torch


def padded_batches(seed: int, n: int, batch: int, seq: int, vocab: int, pad: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of (batch, seq) tokens in [1, vocab); row 1's last ``pad`` positions masked (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq - pad:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out
