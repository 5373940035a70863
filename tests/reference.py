"""Dense float64 reference built from the definition of the pattern (independent of ds_ring's pieces and plans)."""

from __future__ import annotations

import torch


def multiplicity(S, num_heads, segment_lengths, dilation_rates):
    """m[h, i, t]: number of (w, r) pairs under which query i and key t interact for head h."""
    if segment_lengths is None:
        segment_lengths, dilation_rates = [None], [1]
    if dilation_rates is None:
        dilation_rates = [1] * len(segment_lengths)
    t = torch.arange(S)
    m = torch.zeros(num_heads, S, S, dtype=torch.float64)
    for w, r in zip(segment_lengths, dilation_rates):
        w = S if w is None else w
        same = (t[:, None] // w) == (t[None, :] // w)
        for h in range(num_heads):
            sel = (t % w) % r == h % r
            m[h] += (same & sel[:, None] & sel[None, :]).double()
    return m


def dense_reference(q, k, v, segment_lengths=None, dilation_rates=None, causal=False, key_padding_mask=None,
                    window=None, scale=None, document_ids=None):
    """q (B, Hq, S, D), k/v (B, Hkv, S, D) full sequences -> (B, Hq, S, D) float64. ``document_ids`` (B, S): a query
    and a key interact only inside one document."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, S, D = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = D ** -0.5 if scale is None else scale
    m = multiplicity(S, H, segment_lengths, dilation_rates)[None].expand(B, -1, -1, -1).clone()
    i = torch.arange(S)
    if causal:
        m = m * (i[None, :] <= i[:, None])
    if window is not None:
        m = m * ((i[:, None] - i[None, :]) < window)
    if key_padding_mask is not None:
        m = m * key_padding_mask[:, None, None, :].double()
    if document_ids is not None:
        m = m * (document_ids[:, None, :, None] == document_ids[:, None, None, :]).double()
    allowed = m > 0
    row_any = allowed.any(-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)) * scale + torch.log(m.clamp(min=1))  # bias log m(i, t)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~row_any, 0.0)
    p = torch.softmax(s, -1) * row_any  # a row with no key outputs 0, with zero gradient
    return p @ v


def each_document_alone(q, k, v, dout, document_ids, segment_lengths=None, dilation_rates=None, causal=False,
                        key_padding_mask=None, window=None):
    """out, dq, dk, dv (float64, full rows) with each document of each row run alone through the definition: what a
    packed row must give (segments and dilation classes count from each document's own start)."""
    outs = [torch.zeros(q.shape, dtype=torch.float64) for _ in range(2)] + [
        torch.zeros(k.shape, dtype=torch.float64) for _ in range(2)]
    for b in range(q.shape[0]):
        for d in document_ids[b].unique().tolist():
            idx = (document_ids[b] == d).nonzero().flatten()
            a, e = int(idx[0]), int(idx[-1]) + 1
            qd, kd, vd = (t[b : b + 1, :, a:e].double().requires_grad_() for t in (q, k, v))
            ref = dense_reference(qd, kd, vd, segment_lengths, dilation_rates, causal,
                                  None if key_padding_mask is None else key_padding_mask[b : b + 1, a:e], window)
            ref.backward(dout[b : b + 1, :, a:e].double())
            for full, part in zip(outs, (ref, qd.grad, kd.grad, vd.grad)):
                full[b : b + 1, :, a:e] = part.detach()
    return outs
