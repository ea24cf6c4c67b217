"""Attention layers of RSICRC.

Two flavours exist in the reference:
- `SpatialAttention`: the encoder's bias-free q/k/v attention with a separate attention width,
  including the reference quirk that values are computed with the *key* projection.
- `MultiheadAttention`: PyTorch `nn.MultiheadAttention` (equal q/k/v widths, biases, output
  projection), used by the decoder and the attention pooling. Its key/value projection is
  exposed separately (`project_kv` / `attend`) so a decoder can cache keys and values and run
  one position at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx


def _dropout_active(dropout: nnx.Dropout | None) -> bool:
  return dropout is not None and not dropout.deterministic and dropout.rate > 0


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    scale: float) -> jax.Array:
  """`jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU when it takes the shapes and
  the dtype (bfloat16/float16), XLA's implementation otherwise; logits and softmax in float32
  either way. Same shapes as `dot_product_attention`; no weights, no dropout."""
  if jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation='cudnn')
    except (NotImplementedError, ValueError, RuntimeError):  # shape, version: not for cuDNN
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation='xla')


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          scale: float, dropout: nnx.Dropout | None = None, *,
                          need_weights: bool = True):
  """Softmax attention.

  q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh); mask: broadcastable to (B, H, Lq, Lk), True where
  attention is allowed. Returns out (B, Lq, H, Dh) and the attention weights (B, H, Lq, Lk)
  (after masking, before dropout, as PyTorch reports them). When the weights are not needed and
  no dropout applies to them (eval mode), the fused kernel runs and the weights are None; the
  reference drops attention probabilities in training, which the fused kernels cannot do.
  """
  if not need_weights and not _dropout_active(dropout):
    return fused_attention(q, k, v, mask, scale), None
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  probs = dropout(weights) if dropout is not None else weights
  out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
  return out, weights


class SpatialAttention(nnx.Module):
  """The bi-temporal encoder's attention ("MultiHeadAtt" in the reference).

  q = x Wq, k = x Wk (no biases), width `attention_dim`; scale (attention_dim // heads)^-0.5;
  output Linear(attention_dim -> dim) with bias. With `value_from_key=True` (the reference
  behaviour, needed for its released weights) values reuse Wk and no Wv is held; with False a
  real value projection is created and used.
  """

  def __init__(self, dim: int, attention_dim: int, num_heads: int, dropout: float, *,
               value_from_key: bool = True, rngs: nnx.Rngs, dtype=None):
    if attention_dim % num_heads:
      raise ValueError(f'attention_dim={attention_dim} is not divisible by num_heads={num_heads}')
    init = nnx.initializers.xavier_uniform()
    self.num_heads = num_heads
    self.scale = (attention_dim // num_heads) ** -0.5
    self.to_q = nnx.Linear(dim, attention_dim, use_bias=False, kernel_init=init, dtype=dtype,
                           rngs=rngs)
    self.to_k = nnx.Linear(dim, attention_dim, use_bias=False, kernel_init=init, dtype=dtype,
                           rngs=rngs)
    self.to_v = nnx.data(None if value_from_key else nnx.Linear(
        dim, attention_dim, use_bias=False, kernel_init=init, dtype=dtype, rngs=rngs))
    self.to_out = nnx.Linear(attention_dim, dim, kernel_init=init, dtype=dtype, rngs=rngs)
    self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out_dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, N, dim) -> (B, N, dim), self-attention over the N grid cells."""
    split = lambda t: rearrange(t, 'b n (h d) -> b n h d', h=self.num_heads)
    q, k = split(self.to_q(x)), split(self.to_k(x))
    v = k if self.to_v is None else split(self.to_v(x))
    out, _ = dot_product_attention(q, k, v, None, self.scale, self.attn_dropout,
                                   need_weights=False)
    return self.out_dropout(self.to_out(rearrange(out, 'b n h d -> b n (h d)')))


class MultiheadAttention(nnx.Module):
  """`torch.nn.MultiheadAttention(dim, num_heads, dropout)` in batch-first layout.

  The packed PyTorch `in_proj_weight` (3 dim x dim) is held as three Linear layers
  (query/key/value); the importer splits it.
  """

  def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, *, rngs: nnx.Rngs,
               dtype=None):
    if dim % num_heads:
      raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}')
    init = nnx.initializers.xavier_uniform()
    zeros = nnx.initializers.zeros_init()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.query = nnx.Linear(dim, dim, kernel_init=init, bias_init=zeros, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(dim, dim, kernel_init=init, bias_init=zeros, dtype=dtype, rngs=rngs)
    self.value = nnx.Linear(dim, dim, kernel_init=init, bias_init=zeros, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(dim, dim, bias_init=zeros, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def _split(self, t: jax.Array) -> jax.Array:
    return rearrange(t, 'b n (h d) -> b n h d', h=self.num_heads)

  def project_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, Lk, dim) -> keys, values (B, Lk, H, Dh): what a decoding cache stores."""
    return self._split(self.key(memory)), self._split(self.value(memory))

  def attend(self, query: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
             *, need_weights: bool = True):
    """Attend from (B, Lq, dim) queries to projected keys/values.

    Returns the output (B, Lq, dim) and head-averaged weights (B, Lq, Lk), or None for them
    with need_weights=False (which lets eval mode run the fused kernel).
    """
    q = self._split(self.query(query))
    out, weights = dot_product_attention(q, k, v, mask, self.scale, self.dropout,
                                         need_weights=need_weights)
    out = self.out(rearrange(out, 'b n h d -> b n (h d)'))
    return out, None if weights is None else weights.mean(axis=1)

  def __call__(self, query: jax.Array, memory: jax.Array, mask: jax.Array | None = None, *,
               need_weights: bool = True):
    return self.attend(query, *self.project_kv(memory), mask, need_weights=need_weights)
