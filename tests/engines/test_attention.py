"""Cross-attention over one shared copy of an image's states gives each row exactly what SDPA gives it alone."""

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
    # What attention() does with grouped heads, called directly: not a fallback that happens to agree.
    direct = stacked(query, keys, values, mask, heads // kv_heads, 0.0, module.scaling) if heads > kv_heads else out

    for row in range(rows):  # SDPA for that row alone, as a request served by itself
        alone, _ = sdpa_attention_forward(
            module, query[row : row + 1], keys, values, mask[row : row + 1], scaling=module.scaling
        )
        assert torch.equal(out[row : row + 1], alone)
        assert torch.equal(direct[row : row + 1], alone)


def test_other_calls_are_sdpa_unchanged() -> None:
    config = MllamaTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    module = MllamaTextCrossAttention(config, layer_idx=0)
    query, keys, values = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    assert not is_shared(keys)
    ours, _ = attention(module, query, keys, values, None, scaling=module.scaling)
    stock, _ = sdpa_attention_forward(module, query, keys, values, None, scaling=module.scaling)
    assert torch.equal(ours, stock)
