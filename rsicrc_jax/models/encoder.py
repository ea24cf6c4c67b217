"""Bi-temporal change encoder (SPEC section 4).

Backbone features of the before (A) and after (B) images pass through a stack of layers that
alternate a per-image transformer block (shared weights) and a joint block over the
channel-concatenated pair. The two maps are then fused by cosine similarity, a 1x1 conv and a
bottleneck ResBlock into `visual_tokens`, which the caption decoder attends to, and attention-
pooled into one `visual_emb` per pair for retrieval.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rsicrc_jax.models.attention import MultiheadAttention, SpatialAttention
from rsicrc_jax.models import backbone as backbones
from rsicrc_jax.models.layers import BatchNorm, call_block, conv3x3, pointwise_conv


# config.model.remat -> the parts whose blocks (backbone bottlenecks, encoder transformer blocks)
# are recomputed in the backward pass rather than stored: less activation memory, ~1/3 more FLOPs
# in those parts, the same numbers.
REMAT_POLICIES = {'': (), 'none': (), 'backbone': ('backbone',), 'encoder': ('encoder',),
                  'all': ('backbone', 'encoder')}


class TransformerBlock(nnx.Module):
  """Post-norm block: x = LN1(Att(x) + x); x = LN2(FFN(x) + x), FFN = Linear-ReLU-Linear."""

  def __init__(self, dim: int, num_heads: int, attention_dim: int, hidden_dim: int,
               dropout: float, *, value_from_key: bool, rngs: nnx.Rngs, dtype=None):
    init = nnx.initializers.xavier_uniform()
    self.att = SpatialAttention(dim, attention_dim, num_heads, dropout,
                                value_from_key=value_from_key, rngs=rngs, dtype=dtype)
    self.ff_in = nnx.Linear(dim, hidden_dim, kernel_init=init, dtype=dtype, rngs=rngs)
    self.ff_out = nnx.Linear(hidden_dim, dim, kernel_init=init, dtype=dtype, rngs=rngs)
    self.ff_dropout1 = nnx.Dropout(dropout, rngs=rngs)
    self.ff_dropout2 = nnx.Dropout(dropout, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.norm1(self.att(x) + x)
    ff = self.ff_dropout2(self.ff_out(self.ff_dropout1(jax.nn.relu(self.ff_in(x)))))
    return self.norm2(ff + x)


class BiTemporalLayer(nnx.Module):
  """One encoder layer: `shared` block on each image (width C), `joint` block on both (2C)."""

  def __init__(self, channels: int, num_heads: int, attention_dim: int, hidden_dim: int,
               dropout: float, *, value_from_key: bool, rngs: nnx.Rngs, dtype=None):
    kw = dict(value_from_key=value_from_key, rngs=rngs, dtype=dtype)
    self.shared = TransformerBlock(channels, num_heads, attention_dim, hidden_dim, dropout, **kw)
    self.joint = TransformerBlock(2 * channels, num_heads, attention_dim, hidden_dim, dropout, **kw)


class AttentiveEncoder(nnx.Module):
  """Position embeddings + `num_layers` bi-temporal layers.

  Input: two (B, h, w, C) maps. Output: two (B, w, h, C) maps -- the reference swaps the
  spatial axes when it turns tokens back into maps, and everything downstream (3x3 conv,
  token order) sees that transposed grid.
  """

  def __init__(self, channels: int, num_layers: int, num_heads: int, attention_dim: int,
               hidden_dim: int, dropout: float, pos_table_size: int, *,
               value_from_key: bool = True, rngs: nnx.Rngs, dtype=None, remat: bool = False):
    if channels % 2:
      raise ValueError(f'd_model={channels} must be even (two half-width position tables)')
    init = nnx.initializers.xavier_uniform()
    self.h_embedding = nnx.Embed(pos_table_size, channels // 2, embedding_init=init, rngs=rngs)
    self.w_embedding = nnx.Embed(pos_table_size, channels // 2, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([
        BiTemporalLayer(channels, num_heads, attention_dim, hidden_dim, dropout,
                        value_from_key=value_from_key, rngs=rngs, dtype=dtype)
        for _ in range(num_layers)])
    self.remat = remat

  def position_embedding(self, h: int, w: int) -> jax.Array:
    """(h, w, C). Cell (i, j) gets concat(h_embedding[j], w_embedding[i]): the crossed table
    names are what the reference computes, kept so released weights mean the same thing."""
    table_size = self.h_embedding.num_embeddings
    if h > table_size or w > table_size:
      raise ValueError(f'feature grid {h}x{w} exceeds the position tables ({table_size} rows); '
                       'raise config.model.pos_table_size')
    cols = self.h_embedding(jnp.arange(w))  # (w, C/2), indexed by column j
    rows = self.w_embedding(jnp.arange(h))  # (h, C/2), indexed by row i
    return jnp.concatenate([jnp.broadcast_to(cols[None], (h, w, cols.shape[-1])),
                            jnp.broadcast_to(rows[:, None], (h, w, rows.shape[-1]))], axis=-1)

  def __call__(self, feat_before: jax.Array, feat_after: jax.Array):
    b, h, w, c = feat_before.shape
    pos = self.position_embedding(h, w).astype(feat_before.dtype)
    # Residual anchors: every layer's joint output is added back to these layer-0 inputs.
    p1 = (feat_before + pos).reshape(b, h * w, c)
    p2 = (feat_after + pos).reshape(b, h * w, c)
    s1, s2 = p1, p2
    for layer in self.layers:
      s1 = call_block(layer.shared, s1, self.remat) + s1
      s2 = call_block(layer.shared, s2, self.remat) + s2
      u = call_block(layer.joint, jnp.concatenate([s1, s2], axis=-1), self.remat)
      s1 = u[..., :c] + p1
      s2 = u[..., c:] + p2
    to_map = lambda s: s.reshape(b, h, w, c).swapaxes(1, 2)
    return to_map(s1), to_map(s2)


class ResBlock(nnx.Module):
  """ReLU(x + BN(Conv1x1(ReLU(BN(Conv3x3(ReLU(BN(Conv1x1(x))))))))), bottleneck width C/2."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None):
    mid = channels // 2
    self.conv1 = pointwise_conv(channels, mid, use_bias=True, rngs=rngs, dtype=dtype)
    self.bn1 = BatchNorm(mid, dtype=dtype)
    self.conv2 = conv3x3(mid, mid, use_bias=True, rngs=rngs, dtype=dtype)
    self.bn2 = BatchNorm(mid, dtype=dtype)
    self.conv3 = pointwise_conv(mid, channels, use_bias=True, rngs=rngs, dtype=dtype)
    self.bn3 = BatchNorm(channels, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    return jax.nn.relu(self.bn3(self.conv3(y)) + x)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """`torch.nn.CosineSimilarity` over the last axis: each norm is clamped at eps."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  na = jnp.maximum(jnp.linalg.norm(a32, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b32, axis=-1), eps)
  return (jnp.sum(a32 * b32, axis=-1) / (na * nb)).astype(a.dtype)


class ChangeEncoder(nnx.Module):
  """Images -> (visual_emb (B, C), visual_tokens (B, hw, C)).

  The reference's `ImagesEncoder`: backbone (ModifiedResNet or ViT, see backbone.py; +1x1
  projection when its width differs from d_model), attentive bi-temporal encoder, cosine fusion, ResBlock, attention pooling + LN.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=None):
    c = cfg.d_model
    remat = cfg.get('remat', '')
    if remat not in REMAT_POLICIES:
      raise ValueError(f'config.model.remat={remat!r}: expected one of {list(REMAT_POLICIES)}')
    remat = REMAT_POLICIES[remat]
    self.backbone = backbones.build(cfg, rngs=rngs, dtype=dtype, remat='backbone' in remat)
    needs_proj = self.backbone.out_channels != c
    self.proj = nnx.data(pointwise_conv(self.backbone.out_channels, c, use_bias=True, rngs=rngs,
                                        dtype=dtype) if needs_proj else None)
    self.attentive = AttentiveEncoder(
        c, cfg.encoder_layers, cfg.num_heads, cfg.a_dim, cfg.h_dim, cfg.dropout,
        cfg.pos_table_size, value_from_key=cfg.value_from_key, rngs=rngs, dtype=dtype,
        remat='encoder' in remat)
    self.fuse = pointwise_conv(2 * c, c, use_bias=True, rngs=rngs, dtype=dtype)
    self.resblock = ResBlock(c, rngs=rngs, dtype=dtype)
    self.att_pool = MultiheadAttention(c, cfg.num_heads, rngs=rngs, dtype=dtype)
    self.att_pool_norm = nnx.LayerNorm(c, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.img_queries = nnx.Param(jax.random.normal(rngs.params(), (1, c), jnp.float32))
    self.use_running_average = True  # toggled by model.train() / model.eval()

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> projected backbone map (B, h, w, d_model)."""
    feat = self.backbone(images)
    return self.proj(feat) if self.proj is not None else feat

  def __call__(self, img_before: jax.Array, img_after: jax.Array):
    if self.use_running_average:
      # Inference: BN uses running statistics, so one batched pass is exactly equivalent.
      feats = self.features(jnp.concatenate([img_before, img_after], axis=0))
      feat_before, feat_after = jnp.split(feats, 2, axis=0)
    else:
      # Training: the reference runs the backbone twice, so each image set gets its own BN
      # batch statistics and the running statistics are updated twice.
      feat_before, feat_after = self.features(img_before), self.features(img_after)

    x1, x2 = self.attentive(feat_before, feat_after)  # (B, w, h, C): transposed grid
    cos = cosine_similarity(x1, x2)[..., None]
    x = self.resblock(self.fuse(jnp.concatenate([x1, x2], axis=-1) + cos))
    b, gh, gw, c = x.shape
    visual_tokens = x.reshape(b, gh * gw, c)

    query = jnp.broadcast_to(self.img_queries[...].astype(x.dtype)[None], (b, 1, c))
    pooled, _ = self.att_pool(query, visual_tokens, need_weights=False)
    visual_emb = self.att_pool_norm(pooled[:, 0])
    return visual_emb, visual_tokens
