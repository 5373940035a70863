"""Two-dimensional sequence parallelism (Ulysses all-to-all inside a ring position, the ring across positions) on 4
real gloo ranks: forward and dq/dk/dv against the dense float64 definition, bytes against the model's count."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from reference import dense_reference

import ds_ring
from ds_ring.layouts import get_layout

S, B, D = 48, 2, 8
WORLD = 4
GRIDS = [(2, 2), (4, 1), (1, 4)]  # (ulysses_size, ring positions)


def _cases():
    cases, i = [], 0
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for hkv, extra in ((2, dict(pad=True)), (1, dict(docs=True)), (2, dict(segs=[8, 16], rates=[1, 2])),
                               (1, dict(window=9, pad=True))):
                cases.append(dict(layout=layout, causal=causal, Hq=4, Hkv=hkv, seed=i, **extra))
                i += 1
    return cases


def _inputs(case):
    g = torch.Generator().manual_seed(500 + case["seed"])
    q = torch.randn(B, case["Hq"], S, D, generator=g)
    k, v = (torch.randn(B, case["Hkv"], S, D, generator=g) for _ in range(2))
    dout = torch.randn(B, case["Hq"], S, D, generator=g)
    kpm = None
    if case.get("pad"):
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[0, S - 7:] = False
        kpm[1, :5] = False
    docs = None
    if case.get("docs"):
        docs = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor(n))
                            for n in ([10, 5, 20, 13], [3, 30, 7, 8])])
    return q, k, v, dout, kpm, docs


def _groups(u: int, rank: int):
    """This rank's Ulysses group (u consecutive ranks) and ring (same Ulysses rank across positions); every rank
    creates every group, in one order."""
    ug = rg = None
    for r in range(WORLD // u):
        g = dist.new_group(list(range(r * u, (r + 1) * u)))
        if rank // u == r:
            ug = g
    for j in range(u):
        g = dist.new_group(list(range(j, WORLD, u)))
        if rank % u == j:
            rg = g
    return ug, rg


def _job(rank, world, cases):
    out = {}
    for u, R in GRIDS:
        ug, rg = _groups(u, rank)
        for ci, case in enumerate(cases):
            q, k, v, dout, kpm, docs = _inputs(case)
            lay = get_layout(case["layout"], u)
            pos = lay.positions(S // WORLD, WORLD, rank)
            ql, kl, vl = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
            with ds_ring.count_comm() as counter:
                o = ds_ring.ring_dilated_attention(
                    ql, kl, vl, case.get("segs"), case.get("rates"), case["causal"],
                    None if kpm is None else kpm[:, pos], case.get("window"), group=rg, layout=case["layout"],
                    ulysses_group=ug, document_ids=None if docs is None else docs[:, pos],
                )
                o.backward(dout[:, :, pos])
            out[(u, ci)] = ([t.detach() for t in (o, ql.grad, kl.grad, vl.grad)], pos, dict(counter.collectives))
        out[("bytes", u)] = _bytes(rank, u, ug, rg)
    out["copies"] = _copies(rank, world)
    return out


def _bytes(rank, u, ug, rg) -> list:
    """What this rank sends in one dense causal layer (forward + backward) per kind, and per ring peer."""
    out = []
    for hkv, layout in ((2, "zigzag"), (1, "contiguous")):
        q, k, v, dout, _, _ = _inputs(dict(Hq=4, Hkv=hkv, seed=77))
        pos = get_layout(layout, u).positions(S // WORLD, WORLD, rank)
        ql, kl, vl = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
        with ds_ring.count_comm() as c:
            ds_ring.ring_dilated_attention(ql, kl, vl, causal=True, group=rg, layout=layout,
                                           ulysses_group=ug).backward(dout[:, :, pos])
        out.append((hkv, layout, dict(c.sent_bytes), dict(c.sent_to)))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, WORLD, _cases())


@pytest.mark.parametrize("u", [g[0] for g in GRIDS])
def test_matches_dense_reference(results, u):
    for ci, case in enumerate(_cases()):
        q, k, v, dout, kpm, docs = _inputs(case)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = dense_reference(qd, kd, vd, case.get("segs"), case.get("rates"), case["causal"], kpm,
                              case.get("window"), document_ids=docs)
        ref.backward(dout.double())
        for i, (name, want) in enumerate((("out", ref), ("dq", qd.grad), ("dk", kd.grad), ("dv", vd.grad))):
            got = torch.zeros_like(want)
            for rank in range(WORLD):
                tensors, pos, _ = results[rank][(u, ci)]
                got[:, :, pos] = tensors[i].double()
            err = ((got - want.detach()).norm() / want.norm()).item()
            assert err < 1e-5, f"u={u} case {case} {name}: relative error {err:.2e}"
        if u > 1:  # the all-to-alls ran (and the ring's: 0 collectives at one position)
            assert results[0][(u, ci)][2].get("ulysses all-to-all", 0) == 4 * 2  # q, k, v, out; and back


def _copies(rank, world):
    from torch.utils._python_dispatch import TorchDispatchMode

    from ds_ring.ulysses import heads_to_seq, seq_to_heads

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("copy_", "clone", "_to_copy", "contiguous", "cat", "stack",
                                                "index_select", "_unsafe_view", "repeat_interleave"):
                self.n += func.overloadpacket.__name__ != "_unsafe_view"
            return func(*args, **(kwargs or {}))

    out = {}
    for hkv in (4, 2):  # split kv heads (u <= Hkv) and replicated ones (u > Hkv)
        x = torch.randn(2, hkv, 6, 8).transpose(1, 2).contiguous().transpose(1, 2)  # as HF hands it: (B,L,H,D)
        with Copies() as c_in:
            y = seq_to_heads(x, dist.group.WORLD, world)
        out[f"in/{hkv}"] = c_in.n
    y = torch.randn(2, 1, 6 * world, 8)  # the ring's output for one head: (B, h, u*L, D)
    with Copies() as c_out:
        z = heads_to_seq(y, dist.group.WORLD, world)
    out["out"], out["out_bshd"] = c_out.n, z.transpose(1, 2).is_contiguous()
    return out


def test_layout_changes_copy_once_each_way(results):
    """Into the heads layout: one copy (the all-to-all's send buffer; the received buffer is used in place). Out:
    the send buffer, and the unpack into the (B, L, H, D) memory that transformers' attention functions return, so
    their own transpose-copy is free."""
    for res in (r["copies"] for r in results):
        assert res["in/4"] == 1 and res["in/2"] == 1, res
        assert res["out"] == 2 and res["out_bshd"], res


@pytest.mark.parametrize("u", [g[0] for g in GRIDS])
def test_bytes_equal_the_cost_model(results, u):
    """ds_ring.cost_model's bytes per rank per layer (forward + backward) are what the ranks send, all-to-all and
    ring, and its intra/inter-node split follows the peers (2 ranks per node here)."""
    from ds_ring.cost_model import AttentionShape, Cluster, predict

    cluster = Cluster(ranks_per_node=2, intra_node_bw=1.0, inter_node_bw=1.0, flops=1.0, memory_bw=1.0)
    for rank in range(WORLD):
        r, j = divmod(rank, u)
        for hkv, layout, sent, sent_to in results[rank][("bytes", u)]:
            want = predict(AttentionShape(4, hkv, D, 4), S, WORLD, u, cluster, batch=B, causal=True,
                           layout=layout).per_position[r]
            assert sent.get("ulysses all-to-all", 0) == want.a2a_intra + want.a2a_inter, (rank, u, hkv, sent, want)
            assert sent.get("kv", 0) + sent.get("dkv", 0) == want.ring_intra + want.ring_inter, (rank, u, sent, want)
            inter = sum(b for peer, b in sent_to.items() if (peer * u + j) // 2 != rank // 2)  # ring peers' ranks
            assert inter == want.ring_inter, (rank, u, sent_to, want)


def _hf(rank, world):
    """A Llama at (u, ring) = (2, 2), padded and packed rows, against the unpatched model in one process."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    ug, rg = _groups(2, rank)
    sp_layout = get_layout("zigzag", 2)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 64, (2, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    patched = ds_ring.patch(copy.deepcopy(model), group=rg, ulysses_group=ug, layout="zigzag")
    pos = sp_layout.positions(32 // world, world, rank)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with ds_ring.count_comm() as c:
        logits = patched(input_ids=ids[:, pos], attention_mask=mask[:, pos], position_ids=pos.expand(2, -1)).logits
    # the mean over the whole sequence: every rank's token sum over the total count (no helper: independent)
    total = (shift != -100).sum()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift[:, pos].flatten(), ignore_index=-100,
                                             reduction="sum") / total
    loss.backward()
    grads = {}
    for n, p in patched.named_parameters():
        dist.all_reduce(p.grad)
        grads[n] = p.grad
    full = torch.zeros_like(ref.logits)
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.detach().contiguous())
    for r_, part in enumerate(parts):
        full[:, sp_layout.positions(32 // world, world, r_)] = part
    real = mask.bool()
    err_logits = ((full - ref.logits.detach())[real].abs().max() / ref.logits.detach().abs().max()).item()
    err_grads = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-6)).item()
                    for n in ref_grads)
    return {"logits": err_logits, "grads": err_grads, "collectives": dict(c.collectives)}


def test_hf_model_at_2x2_matches_unpatched_one_process():
    for res in run_distributed(_hf, WORLD):
        assert res["logits"] < 1e-4 and res["grads"] < 1e-4, res
        # per forward: the Ulysses stage and the ring stage of the agreement, the mask gathered once; 4 all-to-alls
        # per layer (q, k, v in, out back)
        assert res["collectives"] == {"agreement": 2, "ulysses all-gather": 1, "ulysses all-to-all": 8}, res
