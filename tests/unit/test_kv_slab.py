"""Decode-batch KV slabs: the same keys and values DynamicCache's concatenation gives."""

import torch

from editserve.server.backends.kv_slab import left_padded_slab_cache


def test_slabs_left_pad_rows_and_grow_past_their_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5]
    rows = [[(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for _ in range(2)]
            for n in lengths]
    cache, width = left_padded_slab_cache(rows, lengths, capacity=6)
    assert width == 5
    layer = cache.layers[1]
    assert torch.equal(layer.keys[0, :, :2], torch.zeros(2, 2, 4))  # left padding
    assert torch.equal(layer.keys[0, :, 2:], rows[0][1][0][0]) and torch.equal(layer.values[1], rows[1][1][1][0])
    expected_k, expected_v = layer.keys.clone(), layer.values.clone()
    for _ in range(4):  # 5 -> 9 positions: past the capacity of 6, so the slabs grow once
        k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
        keys, values = cache.update(k, v, 1)
        expected_k, expected_v = torch.cat([expected_k, k], 2), torch.cat([expected_v, v], 2)
        assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    assert cache.get_seq_length(1) == 9 and layer.capacity == 12
    assert cache.get_seq_length(0) == 5  # layers advance on their own
