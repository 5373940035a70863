"""``AllowedPairs``: which (query, key) pairs of one block may interact, from the schedule alone. The kernels (kernels.py,
flex.py) read it; kept in a module of its own so that both import it from below."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Elements of the float mask built per query tile (B x Mt x N); bounds the kernel's extra memory.
MASK_TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class AllowedPairs:
    """Which (query, key) pairs of a block may interact, from the plan alone (the key-padding mask is per call and
    passed beside it). Made once per piece of a plan and kept with it; ``cache`` holds what kernels derive from it
    once (the Flex BlockMask).

    The block may be G blocks batched along the batch dimension (index b * G + g): positions are global, shape
    (G, M) and (G, N).
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    seg: int | None = None  # compare q_pos // seg == k_pos // seg
    causal: bool = False  # k_pos <= q_pos
    window: int | None = None  # q_pos - k_pos < window
    causal_diag: bool = False  # q_pos == k_pos and sorted: the kernel's top-left causal flag is exact
    # compare q_doc == k_doc: document ids (G, M) and (G, N) of a packed chunk's diagonal block made one piece
    # (documents.DocumentPieces, kernels.fused_documents); None: every pair shares a document
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def has_rowcol(self) -> bool:
        return (self.seg is not None or self.window is not None or (self.causal and not self.causal_diag)
                or self.q_doc is not None)

    def allowed(self, rows: slice, batch: int, key_padding: torch.Tensor | None) -> torch.Tensor:
        """(batch or 1, 1, Mt, N) bool for query rows ``rows``; ``batch`` = B * G; ``key_padding`` (B * G, N)."""
        qp, kp = self.q_pos[:, rows, None], self.k_pos[:, None, :]
        ok = torch.ones(qp.shape[0], qp.shape[1], kp.shape[2], dtype=torch.bool, device=qp.device)
        if self.seg is not None:
            ok &= (qp // self.seg) == (kp // self.seg)
        if self.causal:
            ok &= kp <= qp
        if self.window is not None:
            ok &= (qp - kp) < self.window
        if self.q_doc is not None:
            ok &= self.q_doc[:, rows, None] == self.k_doc[:, None, :]
        G = ok.shape[0]
        if G == 1 and key_padding is None:
            return ok[:, None]
        ok = ok.expand(batch // G, *ok.shape).reshape(batch, 1, *ok.shape[1:])
        return ok if key_padding is None else ok & key_padding[:, None, None, :]

    def tile_rows(self, batch: int) -> int:
        return max(16, MASK_TILE_ELEMENTS // max(self.k_pos.shape[1] * batch, 1))
