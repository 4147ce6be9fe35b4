"""Cross-attention over one image's key/value states shared by every row of a batch.

Requests about the same image (the same content hash) compute the same
cross-attention keys and values. When every row of a running batch has the same
image, the batch keeps one copy and hands the layers a stride-0 view of it
(``torch.Tensor.expand``) instead of one copy per row: for Llama 3.2 11B that is
52 MB per tile per request no longer held, and one read of the states per step
instead of one per row.

transformers' SDPA path would attend row by row (each row's own [kv heads,
states, dim] block), reading the shared states once per row. Registered through
transformers' ``AttentionInterface`` as ``ATTENTION``, this function sees the
stride-0 view and attends all rows' queries against the one copy in a single
call; any other call goes to transformers' SDPA function unchanged. Each
query's result is what SDPA gives that row alone, up to the order of float32
sums: the queries are only stacked along the query axis, which the kernel does
not mix (for models with grouped key/value heads, as every Llama 3.2 Vision
model has), but its matrix products block the work by the number of queries,
so on some CPUs (an AVX-512 EPYC) the last bits differ; tests check the bound.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "llamascope_sdpa"


def shared_rows(states: Any, rows: int) -> Any:
    """One row's keys or values [1 or more, heads, states, dim] as a view for ``rows`` rows (no copy)."""
    return states[:1].expand(rows, *states.shape[1:])


def is_shared(states: Any) -> bool:
    return states.shape[0] > 1 and states.stride(0) == 0


def attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature; [batch, 1, heads, dim] and no weights out, as SDPA's."""
    groups = getattr(module, "num_key_value_groups", 1)
    # With one query per key/value head (no grouped heads, which no Llama 3.2 Vision model has) SDPA's kernel
    # takes another path for a lone row than for stacked ones, so those stay row by row.
    if query.shape[2] == 1 and groups > 1 and is_shared(key) and is_shared(value):
        return stacked(query, key[:1], value[:1], attention_mask, groups, dropout, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def stacked(query: Any, key: Any, value: Any, mask: Any, groups: int, dropout: float, scaling: float | None) -> Any:
    """Every row's one query token [rows, heads, 1, dim] against one copy of keys and values [1, kv heads, n, dim].

    As SDPA's path for one query token (its ``pack_gqa``): [rows, kv heads, groups, dim], then all rows'
    queries as one sequence against the single copy: [1, kv heads, rows * groups, dim]. Out: [rows, 1, heads,
    dim], as SDPA's.
    """
    rows, heads, _, dim = query.shape
    kv_heads = heads // groups
    queries = query.reshape(rows, kv_heads, groups, dim).transpose(0, 1).reshape(1, kv_heads, rows * groups, dim)
    if mask is not None:  # [rows, 1, 1, n]: row r's mask for each of its queries
        mask = mask[:, :, -1:, :].expand(rows, 1, groups, mask.shape[-1]).reshape(1, 1, rows * groups, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        queries, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    out = out.reshape(kv_heads, rows, groups, dim).transpose(0, 1).reshape(rows, heads, 1, dim)
    return out.transpose(1, 2).contiguous()


def register() -> None:
    """Make ``ATTENTION`` a name transformers' models accept (its masks are SDPA's)."""
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
