"""Batches for sequence parallelism: cut a full batch into this rank's shard, and load data per ring.

Every rank of a ring gets the SAME samples (``sp_dataloader`` shards over the data-parallel ranks only) and keeps
its own slice of the sequence (``shard_batch``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..op.documents import (
    PACKING_KEYS,
    ROW_KEYS,
    document_ids_from,
    positions_in_documents,
)
from ..parallel.groups import SequenceParallel
from ..parallel.sharding import shard_sequence
from .loss import IGNORE_INDEX, next_token_targets

# Per-token keys shard_batch understands, and the value that fills the padding added to make S divisible.
_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


FINGERPRINT_KEY = "batch_fingerprint"  # shard_batch's output key; consumed by the patched model's forward hook
_PRIME = 2**31 - 1  # modulus of the fingerprint: products stay below 2**62 and sums of 2**32 terms in int64


def batch_fingerprint(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A 0-d int64 tensor, equal on two ranks if they received the same batch and (all but surely) different if not.

    Per key, in sorted order: the key, the shape, and the sum over all values of value x weight(position) modulo
    2**31 - 1 (the weights make a permutation count; integer math, so every device gets the same number). It is
    computed where the batch lives and never read here: the ring's agreement reads it with its other entries, so
    checking that every rank of a ring holds one batch costs no collective and no host sync of its own. O(tokens)
    integer work, small against a forward.
    """
    device = batch["input_ids"].device
    fp = torch.zeros((), dtype=torch.int64, device=device)
    for name in sorted(batch):
        t = torch.as_tensor(batch[name], device=device)
        x = t.reshape(-1).to(torch.int64) % _PRIME
        weight = (torch.arange(x.numel(), device=device) * 40503 + 7) % _PRIME
        term = (x * weight % _PRIME).sum() % _PRIME
        fp = (fp * 1000003 + term + zlib.crc32(repr((name, tuple(t.shape))).encode())) % _PRIME
    return fp


def _pad_right(x: torch.Tensor, n: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, n), value=value) if n else x


def shard_batch(
    batch: Mapping[str, torch.Tensor], sp: SequenceParallel, *, pad_token_id: int = 0, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """This rank's shard of a full batch, ready for ``model(**out)``.

    ``batch``: ``input_ids`` (B, S) and optionally ``attention_mask`` (B, S) (1 = real token), ``labels`` (B, S),
    ``position_ids`` (B, S), ``token_type_ids`` (B, S). Returns, each of shape (B, L) with L = S_pad / sp_size:

    - ``input_ids``, ``attention_mask`` (always present; the input's dtype, int64 0/1 when it was absent),
      ``token_type_ids`` if given;
    - ``position_ids``: GLOBAL positions. Default ``arange(S)`` for every row, padding included, which is what an
      unpatched Hugging Face model uses in ``forward`` when given an attention_mask and no position_ids (left-padded
      rows therefore start their real tokens at the pad count, exactly as the one-process reference does; note that
      ``generate`` instead derives positions from the mask's cumsum). Pass ``position_ids`` to override;
    - ``document_ids`` (packed rows only): GLOBAL document ids, numbered over the whole row before sharding, so the
      ring keeps every document apart (each gets exactly the result it would get alone). Packing is read from what
      transformers' ``DataCollatorWithFlattening`` returns: restarting ``position_ids`` (a document starts wherever
      the position does not grow by 1, transformers' own rule), ``seq_idx`` or ``cu_seq_lens_q``; without
      ``position_ids`` each document's positions restart at 0. The ``cu_seq_lens_*``/``max_length_*`` keys describe
      the whole row and are consumed here (they are not passed on);
    - ``shift_labels`` (only if ``labels`` is given): the target of each position, shifted BEFORE sharding so a
      token at a shard boundary keeps its target (``ds_ring.training.loss.next_token_targets``). Exactly
      transformers' ``ForCausalLMLoss`` rule: the target of position i is ``labels[:, i + 1]``, ``ignore_index`` at
      the last position, and nothing else: the user's labels
      decide what is ignored (collators put -100 on padding), so the loss under SP is the unpatched model's
      ``labels=`` loss. ``labels`` itself is not returned: the model must not shift the local shard again; use
      ``ds_ring.causal_lm_loss(logits, shift_labels, sp)``.

    - ``batch_fingerprint``: a 0-d int64 tensor, ``batch_fingerprint(batch)`` of the full batch this rank received.
      A patched model's forward consumes it: the ring's agreement (one per forward, no extra collective) checks that
      every rank of the ring got the same batch, and otherwise raises the same error on every rank naming the fix
      (``ds_ring.sp_dataloader``: a dataloader sharded over every process gives each rank a different batch).

    S that does not divide by sp_size (2*sp_size for the zigzag layout) is padded on the right with masked tokens
    (``pad_token_id``, attention_mask 0, ``ignore_index``), never truncated. All outputs but the fingerprint use
    ``sp.sequence_layout`` (the grid's under two-dimensional SP).
    """
    unknown = set(batch) - set(_TOKEN_KEYS) - set(PACKING_KEYS)
    if unknown:
        raise ValueError(
            f"shard_batch: cannot shard keys {sorted(unknown)}; supported per-token keys are {_TOKEN_KEYS} and the "
            f"packing keys {PACKING_KEYS}: drop the others from the batch or shard them with ds_ring.shard_sequence"
        )
    if "input_ids" not in batch:
        raise ValueError("shard_batch: the batch needs input_ids of shape (batch, seq)")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"shard_batch: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    for k in set(batch) - set(ROW_KEYS):
        if batch[k].shape != input_ids.shape:
            raise ValueError(f"shard_batch: {k} has shape {tuple(batch[k].shape)}, expected {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    pad = sp.sequence_layout.padded_length(s, sp.sp_size) - s
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)

    full = {
        "input_ids": _pad_right(input_ids, pad, pad_token_id),
        "attention_mask": _pad_right(mask, pad, 0),
    }
    if "token_type_ids" in batch:
        full["token_type_ids"] = _pad_right(batch["token_type_ids"], pad, 0)
    docs = document_ids_from(batch, (b, s))
    if docs is not None:
        # the padding added here is a document of its own: it never meets a real token, even unmasked
        full["document_ids"] = torch.cat([docs, (docs[:, -1:] + 1).expand(b, pad)], dim=1)
    if "position_ids" in batch:
        pos = batch["position_ids"]
        tail = pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)  # continue each row past its end
        full["position_ids"] = torch.cat([pos, tail], dim=1)
    elif docs is not None:  # each document alone would count from 0
        full["position_ids"] = positions_in_documents(full["document_ids"])
    else:
        full["position_ids"] = torch.arange(s + pad, device=input_ids.device).expand(b, -1)
    if "labels" in batch:
        full["shift_labels"] = _pad_right(next_token_targets(batch["labels"], ignore_index), pad, ignore_index)
    out = {k: shard_sequence(v, 1, sp.group, sp.sequence_layout) for k, v in full.items()}
    out[FINGERPRINT_KEY] = batch_fingerprint(batch)
    return out


class SPDataLoader(DataLoader):
    """A DataLoader whose sampler shards over data-parallel ranks; ``set_epoch`` reshuffles."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def sp_dataloader(
    dataset: Dataset,
    sp: SequenceParallel,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    **kw,
) -> SPDataLoader:
    """DataLoader over ``dataset`` whose samples are split over the DATA-parallel ranks (``sp.dp_size``,
    ``sp.dp_rank``) only: all ranks of one ring see the same samples in the same order, different rings see
    different samples. Call ``set_epoch(epoch)`` each epoch to reshuffle (same order on every rank of a ring).
    ``drop_last`` drops both the samples that do not split evenly over the rings and the last incomplete batch.
    Batches are full sequences; pass each through ``shard_batch``. Extra ``kw`` go to ``DataLoader``.
    """
    if "sampler" in kw or "batch_sampler" in kw:
        raise ValueError("sp_dataloader: the sampler is what shards over data-parallel ranks; do not pass sampler")
    sampler = DistributedSampler(
        dataset, num_replicas=sp.dp_size, rank=sp.dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return SPDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn, **kw
    )
