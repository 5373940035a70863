"""Two-dimensional sequence parallelism (Ulysses all-to-all inside a ring position, the ring across positions) on 4
real gloo ranks: forward and dq/dk/dv against the dense float64 definition, bytes against the model's count."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from reference import dense_reference, each_document_alone

import ds_ring
from ds_ring.op.layouts import get_layout

S, B, D = 48, 2, 8
WORLD = 4
GRIDS = [(2, 2), (4, 1), (1, 4)]  # (ulysses_size, ring positions)


def _cases():
    cases, i = [], 0
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            for hkv, extra in ((2, dict(pad=True)), (1, dict(docs=True)), (2, dict(segs=[8, 16], rates=[1, 2])),
                               (1, dict(window=9, pad=True)), (2, dict(docs=True, segs=[8, 16], rates=[1, 2]))):
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


def _job(rank, world, cases):
    out = {}
    for u, R in GRIDS:
        sps = {lay: ds_ring.init_sequence_parallel(WORLD, ulysses_size=u, layout=lay)
               for lay in ("contiguous", "zigzag")}
        ug, rg = sps["zigzag"].ulysses_group, sps["zigzag"].ring_group
        assert (sps["zigzag"].ring_size, sps["zigzag"].ulysses_size) == (R, u)
        for ci, case in enumerate(cases):
            q, k, v, dout, kpm, docs = _inputs(case)
            sp = sps[case["layout"]]
            pos = sp.sequence_layout.positions(S // WORLD, WORLD, sp.sp_rank)
            ql, kl, vl = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
            with ds_ring.count_comm() as counter:
                o = ds_ring.ring_dilated_attention(
                    ql, kl, vl, case.get("segs"), case.get("rates"), case["causal"],
                    None if kpm is None else kpm[:, pos], case.get("window"), group=sp.ring_group,
                    layout=case["layout"], ulysses_group=sp.ulysses_group,
                    document_ids=None if docs is None else docs[:, pos],
                )
                o.backward(dout[:, :, pos])
            out[(u, ci)] = ([t.detach() for t in (o, ql.grad, kl.grad, vl.grad)], pos, dict(counter.collectives))
        out[("bytes", u)] = _bytes(rank, u, ug, rg)
    out["hf"] = _hf(rank, world)
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
        # each document alone: with a dilated pattern, segments and offsets count from each document's start
        want_all = each_document_alone(q, k, v, dout, docs, case.get("segs"), case.get("rates"), case["causal"], kpm,
                                       case.get("window")) if docs is not None else None
        if docs is None:
            qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
            ref = dense_reference(qd, kd, vd, case.get("segs"), case.get("rates"), case["causal"], kpm,
                                  case.get("window"))
            ref.backward(dout.double())
            want_all = [ref, qd.grad, kd.grad, vd.grad]
        for i, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"), want_all)):
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

    from ds_ring.op.ulysses import heads_to_seq, seq_to_heads

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
    """ds_ring.planning.cost_model's bytes per rank per layer (forward + backward) are what the ranks send, all-to-all and
    ring, and its intra/inter-node split follows the peers (2 ranks per node here)."""
    from ds_ring.planning.cost_model import AttentionShape, Cluster, predict

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
    """A Llama at (u, ring) = (2, 2) through shard_batch / patch / causal_lm_loss, on a padded batch and a packed one,
    and under ZeRO-3: logits and gradients against the unpatched model in one process."""
    import copy

    from deepspeed.utils import safe_get_full_grad
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    sp = ds_ring.init_sequence_parallel(WORLD, ulysses_size=2, layout="zigzag")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 64, (2, 30), generator=g)  # 30: shard_batch pads to the grid's multiple of 8
    mask = torch.ones_like(ids)
    mask[1, 23:] = 0
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    docs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (9, 14, 5, 4)]
    packed = DataCollatorWithFlattening()([{"input_ids": d, "labels": d} for d in docs])
    out = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        model.zero_grad()
        if name == "padded":
            ref = model(input_ids=ids, attention_mask=mask, labels=batch["labels"])
        else:  # each document alone: summed token losses over all targets
            total, n = 0.0, 0
            for d in docs:
                t = torch.tensor([d])
                total = total + torch.nn.functional.cross_entropy(model(input_ids=t).logits[0, :-1], t[0, 1:],
                                                                  reduction="sum")
                n += len(d) - 1
            ref = type("R", (), {"loss": total / n})()
        ref.loss.backward()
        ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        patched = ds_ring.patch(copy.deepcopy(model), sp=sp)
        patched.zero_grad()
        local = ds_ring.shard_batch(batch, sp)
        labels = local.pop("shift_labels")
        with ds_ring.count_comm() as c:
            logits = patched(**local).logits
        loss = ds_ring.causal_lm_loss(logits, labels, sp)
        loss.backward()
        err = 0.0
        for k, p in patched.named_parameters():
            dist.all_reduce(p.grad, group=sp.group)
            err = max(err, ((p.grad - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1e-6)).item())
        out[name] = {"loss": abs(loss.item() - ref.loss.item()) / ref.loss.item(), "grads": err,
                     "collectives": dict(c.collectives)}
        if name == "padded":
            full = ds_ring.gather_sequence(logits.detach(), 1, sp.group, sp.sequence_layout)[:, :30]
            out[name]["logits"] = ((full - ref.logits.detach())[mask.bool()].abs().max()
                                   / ref.logits.detach().abs().max()).item()
    # ZeRO-3 over the 2D grid: DeepSpeed reduces over every rank; the ring's shares must add up to one process
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask, labels=padded["labels"])
    ref.loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    patched = ds_ring.patch(copy.deepcopy(model), sp=sp)
    engine, *_ = ds_ring.deepspeed_initialize(
        patched, sp, {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10**9,
                      "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
                      "zero_allow_untested_optimizer": True},
        optimizer=torch.optim.SGD(patched.parameters(), lr=0.1))
    local = ds_ring.shard_batch(padded, sp)
    labels = local.pop("shift_labels")
    engine.backward(ds_ring.causal_lm_loss(engine(**local).logits, labels, sp))
    out["zero3"] = max(((safe_get_full_grad(p) - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1e-6))
                       .item() for k, p in engine.module.named_parameters())
    engine.destroy()
    return out


def test_hf_model_at_2x2_matches_unpatched_one_process(results):
    for res in (r["hf"] for r in results):
        for name in ("padded", "packed"):
            r = res[name]
            assert max(v for k, v in r.items() if k != "collectives") < 1e-4, (name, r)
        # per forward: the Ulysses stage and the ring stage of the agreement (a second ring exchange for packed
        # documents), the mask (document ids) gathered once; 4 all-to-alls per layer (q, k, v in, out back)
        assert res["padded"]["collectives"] == {"agreement": 2, "ulysses all-gather": 1,
                                                "ulysses all-to-all": 8}, res
        assert res["packed"]["collectives"] == {"agreement": 3, "ulysses all-gather": 2,
                                                "ulysses all-to-all": 8}, res
        assert res["zero3"] < 1e-4, res
