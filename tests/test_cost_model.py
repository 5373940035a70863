"""ds_ring.planning.cost_model in process: the time model against published numbers, and which factorizations it offers.
(Its byte counts are checked against real ranks in tests/test_ulysses.py.)"""

from __future__ import annotations

import pytest

from ds_ring.planning.cost_model import CLUSTERS, AttentionShape, factorizations, predict, recommend


def test_time_model_against_ring_flash_attention_on_8_h800():
    """ring-flash-attention's README: zigzag ring on 8 x H800, Llama-3.1-8B attention (32 heads, 8 kv heads,
    D = 128), 8k tokens per GPU, causal bf16: 85.2% of the ideal forward, 90.2% forward + backward. The model, with
    the flash rate they measured, NVLink 200 GB/s per direction and HBM 3.35 TB/s, must land within 3 points."""
    p = predict(AttentionShape(32, 8, 128, 2), 8 * 8192, 8, 1, CLUSTERS["h800"], causal=True, layout="zigzag")
    forward = p.ideal_s / 3.5 / p.forward_s  # the ideal forward is 1 / (1 + 2.5) of the ideal step
    assert abs(forward - 0.852) < 0.03, forward
    assert abs(p.efficiency - 0.902) < 0.03, p.efficiency


def test_factorizations_follow_heads_and_nodes():
    # 8 kv heads: u in {1, 2, 4, 8} split them; 16 and 32 exceed a node of 8 ranks
    assert [u for u, _ in factorizations(32, AttentionShape(32, 8, 128), 8)] == [1, 2, 4, 8]
    # 2 kv heads, 4 per node: u = 4 replicates each kv head on 2 ranks; u = 3 splits neither
    assert [u for u, _ in factorizations(12, AttentionShape(12, 2, 64), 4)] == [1, 2, 4]
    with pytest.raises(ValueError, match="not a multiple of 8"):  # 8 ranks, zigzag over 4 ring positions
        predict(AttentionShape(32, 8, 128), 1004, 8, 2, CLUSTERS["h100"])


def test_across_nodes_the_ring_moves_to_the_inter_node_link_and_ulysses_wins():
    """32 ranks on 4 nodes of 8: a pure ring crosses nodes on most steps; Ulysses inside the node cuts the
    inter-node bytes by u and is recommended."""
    shape = AttentionShape(32, 8, 128)
    preds = recommend(shape, 32 * 8192, 32, CLUSTERS["h100"])
    by_u = {p.ulysses: p for p in preds}
    assert preds[0].ulysses == 8
    assert by_u[1].traffic.ring_inter == 8 * by_u[8].traffic.ring_inter
    assert by_u[8].traffic.ring_intra == 0 and by_u[8].traffic.a2a_inter == 0
