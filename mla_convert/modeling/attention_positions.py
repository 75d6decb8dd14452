"""Position handling shared by every attention variant.

Three modes exist in the hosts we support:

* ``"relative"``: Transformer-XL relative positions (wav2vec2-conformer ``rel_pos``). The score
  gets an additive term ``(q + pos_bias_v) · linear_pos(pe)`` after the rel-shift ("skew"), and the
  content query is ``q + pos_bias_u``. Nothing about it touches K/V, so every variant keeps it.
* ``"rotary"``: wav2vec2-conformer rotates the *layer input* (per head chunk) before the query and
  key projections; the value path sees the un-rotated input.
* ``"none"``: absolute or no positions (Whisper, plain conformers).
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_MODES = ("relative", "rotary", "none")


def rotate_input(hidden_states: torch.Tensor, rotary: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """Rotate ``hidden_states`` ``[B, T, H*d]`` per head chunk with cos/sin ``[2, T', 1, 1, d]``.

    The same rotate-half convention as ``Wav2Vec2ConformerSelfAttention``; ``rotary=None`` is the
    identity (used when a conversion error is measured on the weights alone).
    """
    if rotary is None:
        return hidden_states
    batch, length, hidden = hidden_states.shape
    head_dim = hidden // num_heads
    states = hidden_states.view(batch, length, num_heads, head_dim).transpose(0, 1)
    cos = rotary[0, :length]
    sin = rotary[1, :length]
    first, second = states[..., : head_dim // 2], states[..., head_dim // 2 :]
    rotated = torch.cat((-second, first), dim=-1)
    states = states * cos + rotated * sin
    return states.transpose(0, 1).reshape(batch, length, hidden)


def relative_position_scores(
    query: torch.Tensor,
    position_embeddings: torch.Tensor,
    pos_proj: nn.Linear,
    pos_bias_v: torch.Tensor,
    key_length: int,
    scaling: float,
) -> torch.Tensor:
    """Transformer-XL position term ``[B, H, Tq, Tk]`` (matrices b+d), already scaled.

    ``position_embeddings`` is ``(1, Tk+Tq-1, hidden)``: the sinusoids of the distances
    ``Tk-1 ... -(Tq-1)`` as produced by the host's relative positional embedding (``2T-1`` rows for
    a whole sequence; a streamed chunk of ``Tq`` frames after ``Tk-Tq`` cached ones has its queries
    at the end of the keys). ``query`` is ``[B, H, Tq, d]`` before ``pos_bias_u`` is added.
    """
    num_heads, head_dim = pos_bias_v.shape
    projected = pos_proj(position_embeddings)
    projected = projected.view(*position_embeddings.shape[:2], num_heads, head_dim).permute(0, 2, 3, 1)
    scores = torch.matmul(query + pos_bias_v[None, :, None, :], projected).contiguous()
    batch, heads, query_length, table = scores.shape
    if table < key_length + query_length - 1:
        raise ValueError(f"{table} relative positions cannot cover {query_length} queries x {key_length} keys")
    # the rel-shift: query a, key b reads the distance (Tq-1-a)+b rows into the table
    stride_batch, stride_head, stride_row, _ = scores.stride()
    shifted = scores.as_strided(
        (batch, heads, query_length, key_length),
        (stride_batch, stride_head, stride_row - 1, 1),
        scores.storage_offset() + query_length - 1,
    )
    return shifted * scaling
