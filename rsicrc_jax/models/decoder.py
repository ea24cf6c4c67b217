"""Decoupled CoCa-style text decoder (SPEC section 5).

Unimodal layers (causal self-attention only) turn the caption into a text embedding, read at
the END token; multimodal layers add cross-attention to the visual tokens and produce the
next-token logits. Output projection tied to the token embedding by default.
"""

from __future__ import annotations

from flax import struct

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsicrc_jax.models.attention import MultiheadAttention


def sinusoidal_positions(max_len: int, dim: int) -> np.ndarray:
  """(max_len, dim) table: sin on even dims, cos on odd, frequency 10000^(-2i/dim), float32
  arithmetic as the reference computes its `pe` buffer."""
  position = np.arange(max_len, dtype=np.float32)[:, None]
  div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-np.log(10000.0) / dim))
  pe = np.zeros((max_len, dim), np.float32)
  pe[:, 0::2] = np.sin(position * div_term)
  pe[:, 1::2] = np.cos(position * div_term)
  return pe


def causal_mask(length: int) -> jax.Array:
  """(1, 1, L, L) True where position q may attend to position k (k <= q)."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class DecoderLayer(nnx.Module):
  """Self-attention (+ cross-attention) + GELU FFN, post-norm (or pre-norm by flag)."""

  def __init__(self, dim: int, num_heads: int, dropout: float, *, cross_attention: bool,
               prenorm: bool = False, rngs: nnx.Rngs, dtype=None):
    self.prenorm = prenorm
    self.self_attn = MultiheadAttention(dim, num_heads, dropout, rngs=rngs, dtype=dtype)
    self.sa_norm = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.sa_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.cross_attn = nnx.data(MultiheadAttention(dim, num_heads, dropout, rngs=rngs, dtype=dtype)
                               if cross_attention else None)
    self.mha_norm = nnx.data(nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
                             if cross_attention else None)
    self.mha_dropout = nnx.data(nnx.Dropout(dropout, rngs=rngs) if cross_attention else None)
    self.ff_linear1 = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.ff_linear2 = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
    self.ff_norm = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.ff_dropout = nnx.Dropout(dropout, rngs=rngs)

  def _ff(self, x):
    h = self.ff_dropout(jax.nn.gelu(self.ff_linear1(x), approximate=False))
    return self.ff_dropout(self.ff_linear2(h))

  def __call__(self, x: jax.Array, self_kv, self_mask, cross_kv=None):
    """x: (B, L, D) queries. self_kv: (keys, values) for self-attention, computed by the caller
    from x (full pass) or taken from a cache (incremental decoding); cross_kv likewise from the
    visual tokens. Returns (x, head-averaged cross-attention weights (B, L, S) or None)."""
    weights = None
    if self.prenorm:
      h = self.sa_norm(x)
      x = x + self.sa_dropout(self.self_attn.attend(h, *self_kv, self_mask,
                                                    need_weights=False)[0])
      if self.cross_attn is not None:
        att, weights = self.cross_attn.attend(self.mha_norm(x), *cross_kv)
        x = x + self.mha_dropout(att)
      return x + self._ff(self.ff_norm(x)), weights

    x = self.sa_norm(x + self.sa_dropout(self.self_attn.attend(x, *self_kv, self_mask,
                                                              need_weights=False)[0]))
    if self.cross_attn is not None:
      att, weights = self.cross_attn.attend(x, *cross_kv)
      x = self.mha_norm(x + self.mha_dropout(att))
    return self.ff_norm(x + self._ff(x)), weights

  def self_kv(self, x: jax.Array):
    """Keys/values of the self-attention for queries x. Pre-norm layers attend to LN(x)."""
    return self.self_attn.project_kv(self.sa_norm(x) if self.prenorm else x)


@struct.dataclass
class DecoderOutput:
  logits: jax.Array | None  # (B, L, V)
  text_emb: jax.Array  # (B, D): unimodal output at the last non-PAD position
  cross_attention: jax.Array | None  # (B, L, S) from the last multimodal layer


class CaptionDecoder(nnx.Module):
  """Token ids (B, L) [+ visual tokens (B, S, D)] -> logits, text embedding, attention."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=None):
    d = cfg.d_model
    self.max_len = cfg.max_len
    self.tie_embeddings = cfg.tie_embeddings
    uniform = nnx.initializers.uniform(0.2)  # U(0, 0.2) shifted below to U(-0.1, 0.1)
    self.tokens_embed = nnx.Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs,
                                  embedding_init=lambda k, s, t: uniform(k, s, t) - 0.1)
    self.lm_head = nnx.data(None if cfg.tie_embeddings else nnx.Linear(
        d, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs))
    self.pos_embed = nnx.data(
        nnx.Embed(cfg.max_len, d, dtype=dtype, rngs=rngs) if cfg.learnable else None)
    self.embed_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    kw = dict(prenorm=cfg.prenorm, rngs=rngs, dtype=dtype)
    self.uni_layers = nnx.List([
        DecoderLayer(d, cfg.num_heads, cfg.dropout, cross_attention=False, **kw)
        for _ in range(cfg.decoder_layers)])
    self.cross_layers = nnx.List([
        DecoderLayer(d, cfg.num_heads, cfg.dropout, cross_attention=True, **kw)
        for _ in range(cfg.decoder_layers)])
    self.out_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def embed(self, tokens: jax.Array, offset=0) -> jax.Array:
    """Token + position embeddings for positions offset .. offset+L-1, then dropout."""
    length = tokens.shape[1]
    x = self.tokens_embed(tokens)
    if self.pos_embed is not None:
      x = x + self.pos_embed(offset + jnp.arange(length))[None]
    else:
      table = jnp.asarray(sinusoidal_positions(self.max_len, x.shape[-1]), x.dtype)
      x = x + jax.lax.dynamic_slice_in_dim(table, offset, length)[None]
    return self.embed_dropout(x)

  def project(self, x: jax.Array) -> jax.Array:
    """(B, L, D) -> logits (B, L, V), through dropout as the reference does."""
    x = self.out_dropout(x)
    return self.tokens_embed.attend(x) if self.tie_embeddings else self.lm_head(x)

  def __call__(self, tokens: jax.Array, visual_tokens: jax.Array | None = None,
               pad_mask: jax.Array | None = None) -> DecoderOutput:
    """tokens (B, L) int; pad_mask (B, L) True at PAD (None: no padding, as in greedy
    decoding); visual_tokens None computes only the text embedding."""
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f'caption length {length} exceeds max_len={self.max_len}')
    mask = causal_mask(length)
    if pad_mask is not None:
      mask = mask & ~pad_mask[:, None, None, :]
    x = self.embed(tokens)
    for layer in self.uni_layers:
      x, _ = layer(x, layer.self_kv(x), mask)

    num_real = length if pad_mask is None else length - pad_mask.sum(axis=1)
    last = jnp.broadcast_to(jnp.asarray(num_real) - 1, (tokens.shape[0],))
    text_emb = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if visual_tokens is None:
      return DecoderOutput(None, text_emb, None)

    weights = None
    for layer in self.cross_layers:
      x, weights = layer(x, layer.self_kv(x), mask, layer.cross_attn.project_kv(visual_tokens))
    return DecoderOutput(self.project(x), text_emb, weights)
