"""Pure-DeepSpeed reproducer: ``TiledFusedLogitsLoss`` (deepspeed/runtime/sequence_parallel/ulysses_sp.py) gives the
LM head's weight a gradient that ignores the incoming gradient of the loss it returns.

    python docs/upstream/tiled_logits_loss_repro.py            # plain autograd, one process, CPU, seconds
    python docs/upstream/tiled_logits_loss_repro.py --engine   # also through a DeepSpeed engine (ZeRO-2, GAS 2)

Every case computes the same loss twice, once with plain autograd (the LM head on the full hidden states, then
cross-entropy) and once with ``TiledFusedLogitsLoss``, and prints, for the loss, dL/dhidden and dL/dW of the head,
the ratio of the norms (tiled / plain) and the relative error. A correct implementation prints 1.0 everywhere.
Only torch and deepspeed are imported. Report: docs/upstream_tiled_logits_loss.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

HIDDEN, VOCAB, TOKENS, SHARDS = 16, 32, 64, 4


def data(seed: int, ignored: bool = False):
    """Hidden states (1, TOKENS, HIDDEN) and targets (1, TOKENS); with ``ignored``, about 10 % of the targets are
    -100, as in SFT. Without, every shard holds as many valid targets, so per-shard "mean" then mean is exact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TOKENS, HIDDEN, generator=g)
    y = torch.randint(0, VOCAB, (1, TOKENS), generator=g)
    if ignored:
        y[torch.rand(1, TOKENS, generator=g) < 0.1] = -100
    return x, y


def head_module() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, VOCAB, bias=False)


def plain_loss(head, x, y, reduction: str) -> torch.Tensor:
    return F.cross_entropy(head(x).view(-1, VOCAB), y.view(-1), ignore_index=-100, reduction=reduction)


def tiled_loss(head, x, y, reduction: str) -> torch.Tensor:
    def fn(module, x_shard, y_shard):
        return F.cross_entropy(module(x_shard).view(-1, VOCAB), y_shard.view(-1), ignore_index=-100,
                               reduction=reduction)

    return TiledFusedLogitsLoss.apply(fn, head, x, y, None, SHARDS, [head.weight], reduction)


def run(loss_of, post, micro_batches: int, ignored: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Sum ``post(loss_of(...))`` over ``micro_batches`` backward calls (gradient accumulation); return the last
    loss, dL/dx of the last micro-batch and the accumulated dL/dW."""
    head = head_module()
    for mb in range(micro_batches):
        x, y = data(mb, ignored)
        x.requires_grad_(True)
        loss = post(loss_of(head, x, y), y)
        loss.backward()
    return loss.item(), x.grad, head.weight.grad


CASES = {
    # name: (reduction, what is done to the returned loss before backward, micro-batches, ignored targets)
    "mean (control)": ("mean", lambda loss, y: loss, 1, False),
    "sum, then / valid targets (ArcticTraining's recipe)": ("sum", lambda loss, y: loss / (y != -100).sum(), 1, True),
    "mean, / GAS=4, 4 micro-batches accumulated": ("mean", lambda loss, y: loss / 4, 4, False),
    "mean, x 1024 (a static fp16 loss scale)": ("mean", lambda loss, y: loss * 1024, 1, False),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def autograd_cases() -> None:
    print(f"TiledFusedLogitsLoss vs plain autograd: head {HIDDEN} -> {VOCAB}, {TOKENS} tokens, {SHARDS} shards\n")
    print(f"{'case':<52} {'loss ratio':>10} {'dL/dx ratio':>12} {'dL/dW ratio':>12} {'dL/dW rel. err':>15}")
    for name, (reduction, post, mbs, ignored) in CASES.items():
        ref = run(lambda h, x, y: plain_loss(h, x, y, reduction), post, mbs, ignored)
        got = run(lambda h, x, y: tiled_loss(h, x, y, reduction), post, mbs, ignored)
        print(f"{name:<52} {got[0] / ref[0]:>10.4f} {got[1].norm().item() / ref[1].norm().item():>12.4f} "
              f"{got[2].norm().item() / ref[2].norm().item():>12.4f} {rel(got[2], ref[2]):>15.3g}")
    _, y = data(0, ignored=True)
    print(f"\n(valid targets in the 'sum' case: {(y != -100).sum().item()} of {TOKENS})")


def engine_case() -> None:
    """The same head trained one step by a DeepSpeed engine (ZeRO-2, gradient_accumulation_steps 2, SGD lr 1, no
    clipping): the weight's update with the tiled loss against the update with the plain loss."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "SGD", "params": {"lr": 1.0}}}

    def update(loss_of) -> torch.Tensor:
        head = head_module()
        w0 = head.weight.detach().clone()
        engine, *_ = deepspeed.initialize(model=head, model_parameters=head.parameters(), config=cfg)
        for mb in range(2):
            x, y = data(mb)
            engine.backward(loss_of(engine.module, x.requires_grad_(True), y))
            engine.step()
        delta = w0 - engine.module.weight.detach()
        engine.destroy()
        return delta

    ref = update(lambda h, x, y: plain_loss(h, x, y, "mean"))
    got = update(lambda h, x, y: tiled_loss(h, x, y, "mean"))
    print(f"\nDeepSpeed engine, ZeRO-2, GAS 2, reduction 'mean': weight update ratio (tiled / plain) "
          f"{got.norm().item() / ref.norm().item():.4f}, rel. err {rel(got, ref):.3g}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="store_true", help="also run one step through a DeepSpeed engine")
    args = p.parse_args()
    autograd_cases()
    if args.engine:
        engine_case()
