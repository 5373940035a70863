"""Bad input raises a clear ValueError on every rank before any K/V is sent, never a hang."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

import ds_ring

B, H, L, D = 2, 4, 8, 8


def _good():
    return dict(q=torch.randn(B, H, L, D), k=torch.randn(B, 2, L, D), v=torch.randn(B, 2, L, D), kwargs={})


def _bad_cases():
    """(name, function of rank -> inputs, words the error names). Only rank 1 is given the bad input."""

    def on_rank1(mutate):
        def make(rank):
            x = _good()
            if rank == 1:
                mutate(x)
            return x
        return make

    def set_kw(**kw):
        return lambda x: x["kwargs"].update(kw)

    def set_t(name, value):
        return lambda x: x.__setitem__(name, value)

    def zigzag_odd(rank):
        x = _good()
        x["kwargs"]["layout"] = "zigzag"
        if rank == 1:
            x.update(q=torch.randn(B, H, 7, D), k=torch.randn(B, 2, 7, D), v=torch.randn(B, 2, 7, D))
        return x

    def docs(bad_ids, **bad_kw):  # every rank passes documents; rank 1's are bad
        def make(rank):
            x = _good()
            x["kwargs"]["document_ids"] = bad_ids if rank == 1 else torch.zeros(B, L, dtype=torch.long)
            if rank == 1:
                x["kwargs"].update(bad_kw)
            return x
        return make

    return [
        ("segment/dilation lengths", on_rank1(set_kw(segment_lengths=[4, 8], dilation_rates=[1])), "dilation_rates"),
        ("non-positive segment", on_rank1(set_kw(segment_lengths=[0], dilation_rates=[1])), "segment_lengths"),
        ("non-positive dilation", on_rank1(set_kw(segment_lengths=[8], dilation_rates=[-2])), "dilation_rates"),
        ("bad window", on_rank1(set_kw(window=0)), "window"),
        ("Hq % Hkv", on_rank1(set_t("k", torch.randn(B, 3, L, D))), "multiple of the kv heads"),
        ("mask shape", on_rank1(set_kw(key_padding_mask=torch.ones(B, L + 1, dtype=torch.bool))), "key_padding_mask"),
        ("mask dtype", on_rank1(set_kw(key_padding_mask=torch.ones(B, L))), "key_padding_mask"),
        ("dtype mismatch", on_rank1(set_t("v", torch.randn(B, 2, L, D, dtype=torch.float64))), "dtype"),
        ("zigzag odd shard", zigzag_odd, "even"),
        ("shard length differs", on_rank1(lambda x: x.update(q=torch.randn(B, H, L + 2, D),
                                                             k=torch.randn(B, 2, L + 2, D),
                                                             v=torch.randn(B, 2, L + 2, D))), "local_len differs"),
        ("batch differs", on_rank1(lambda x: x.update(q=torch.randn(1, H, L, D), k=torch.randn(1, 2, L, D),
                                                      v=torch.randn(1, 2, L, D))), "batch differs"),
        ("mask on one rank only", on_rank1(set_kw(key_padding_mask=torch.ones(B, L, dtype=torch.bool))),
         "has key_padding_mask differs"),
        ("pattern differs", on_rank1(set_kw(segment_lengths=[8], dilation_rates=[2])), "window) differs"),
        ("unknown layout", on_rank1(set_kw(layout="striped")), "layout"),
        ("documents on one rank only", on_rank1(set_kw(document_ids=torch.zeros(B, L, dtype=torch.long))),
         "has document_ids differs"),
        ("document ids decrease", docs(torch.arange(L).flip(0).expand(B, -1)), "decrease"),
    ]


def _job(rank, world):
    messages = []
    for name, make, _ in _bad_cases():
        x = make(rank)
        try:
            ds_ring.ring_dilated_attention(x["q"], x["k"], x["v"], **x["kwargs"])
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    # after all those errors the ring is still in step: a good call works
    x = _good()
    out = ds_ring.ring_dilated_attention(x["q"], x["k"], x["v"])
    return messages, bool(torch.isfinite(out).all())


def test_bad_input_raises_on_every_rank_without_hanging():
    results = run_distributed(_job, 2, timeout_s=240, pg_timeout_s=60)
    cases = _bad_cases()
    for rank, (messages, ok) in enumerate(results):
        assert ok
        for (name, _, words), msg in zip(cases, messages):
            assert msg is not None, f"rank {rank}: {name} did not raise"
            if rank == 1 or "differs" in words:
                assert words in msg, f"rank {rank}: {name}: {msg!r} does not name {words!r}"
            else:
                assert "rank(s) [1]" in msg, f"rank {rank}: {name}: {msg!r}"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(segment_lengths=[4, 8], dilation_rates=[1]), "same length"),
        (dict(segment_lengths=[4], dilation_rates=[0]), "dilation_rates"),
        (dict(window=-1), "window"),
        (dict(layout="zigzag"), "even"),
        (dict(key_padding_mask=torch.ones(B, 7)), "bool"),
    ],
)
def test_bad_input_single_process(kwargs, words):
    q, k, v = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D), torch.randn(B, H, 7, D)
    with pytest.raises(ValueError, match=words):
        ds_ring.ring_dilated_attention(q, k, v, **kwargs)


def test_module_rejects_bad_pattern_at_construction():
    with pytest.raises(ValueError, match="dilation_rates"):
        ds_ring.RingDilatedAttention([8, 16], [1])
