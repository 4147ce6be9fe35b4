"""Cross-attention over one shared copy of an image's states gives each row what SDPA gives it alone.

What is exact on every machine: the rows read one copy (a stride-0 view of one storage), ``attention``
takes the stacked path, and states that a row's mask removes change nothing in its result. What is not:
the float32 result of stacking the rows' queries against SDPA for one row alone. The kernel's matrix
products choose their blocking by the number of queries, and the order of float32 sums with it (equal
bit for bit on some CPUs, not on an AVX-512 EPYC); what does not change is the set of terms. Each output
is a softmax-weighted mean of at most 3,202 value entries (|v| < 6 here), summed in blocks of at most 512
states, so two orders differ by at most about 512 * 2**-24 * 6 = 2e-4: that is the tolerance, while a row
that attended with another row's queries or mask would be off by more than 0.1.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MllamaTextConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

from llamascope.engines.attention import attention, is_shared, shared_rows, stacked


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 8), (8, 2)], ids=["groups 2", "no groups", "groups 4"])
@pytest.mark.parametrize("padded", [False, True], ids=["own tiles", "padding tiles masked"])
def test_shared_states_attend_as_each_row_alone(heads: int, kv_heads: int, padded: bool) -> None:
    torch.manual_seed(heads + kv_heads + padded)
    config = MllamaTextConfig(hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads)
    module = MllamaTextCrossAttention(config, layer_idx=0)
    rows, states, dim = 5, 2 * 1601, 16
    query = torch.randn(rows, heads, 1, dim)
    keys, values = torch.randn(1, kv_heads, states, dim), torch.randn(1, kv_heads, states, dim)
    mask = torch.zeros(rows, 1, 1, states)
    if padded:  # the second tile is padding for every row, as in a batch whose other image has more tiles
        mask[..., 1601:] = torch.finfo(torch.float32).min
    shared_keys, shared_values = shared_rows(keys, rows), shared_rows(values, rows)
    assert is_shared(shared_keys) and shared_keys.data_ptr() == keys.data_ptr()

    out, _ = attention(module, query, shared_keys, shared_values, mask, scaling=module.scaling)
    # The path attention() takes, called directly: with grouped heads the stacked one (not a fallback that
    # happens to agree); without, SDPA row by row on the shared view, unchanged.
    if heads > kv_heads:
        direct = stacked(query, keys, values, mask, heads // kv_heads, 0.0, module.scaling)
    else:
        direct, _ = sdpa_attention_forward(module, query, shared_keys, shared_values, mask, scaling=module.scaling)
    assert direct.shape == out.shape == (rows, 1, heads, dim)
    assert torch.equal(direct, out)  # the same computation: exact

    for row in range(rows):  # SDPA for that row alone, as a request served by itself
        alone, _ = sdpa_attention_forward(
            module, query[row : row + 1], keys, values, mask[row : row + 1], scaling=module.scaling
        )
        torch.testing.assert_close(out[row : row + 1], alone, rtol=0, atol=2e-4)
    if padded:  # what the mask removes counts for nothing, exactly: exp(-3.4e38) is 0 on every CPU
        keys[..., 1601:, :], values[..., 1601:, :] = 100.0, -100.0
        again, _ = attention(
            module, query, shared_rows(keys, rows), shared_rows(values, rows), mask, scaling=module.scaling
        )
        assert torch.equal(again, out)


def test_other_calls_are_sdpa_unchanged() -> None:
    config = MllamaTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    module = MllamaTextCrossAttention(config, layer_idx=0)
    query, keys, values = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    assert not is_shared(keys)
    ours, _ = attention(module, query, keys, values, None, scaling=module.scaling)
    stock, _ = sdpa_attention_forward(module, query, keys, values, None, scaling=module.scaling)
    assert torch.equal(ours, stock)
