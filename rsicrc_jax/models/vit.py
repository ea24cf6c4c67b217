"""OpenCLIP's VisionTransformer image tower (RemoteCLIP ViT-B-32 / ViT-L-14), NHWC, as a feature
map: the patch tokens after `ln_post`, class token dropped (SPEC section 10).

Patch embedding (a stride-`patch` conv without bias), a class token, learned positions, `ln_pre`,
`layers` pre-norm residual blocks (attention, then a 4x MLP), `ln_post`. Input (B, H, W, 3)
normalised images with H = W = image_size; output (B, g, g, width), g = image_size // patch:
(B, 7, 7, 768) for ViT-B-32 and (B, 16, 16, 1024) for ViT-L-14 at 224 px. The pooled output and
`proj` are not used by RSICRC and not held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rsicrc_jax.models.attention import MultiheadAttention
from rsicrc_jax.models.layers import call_block


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nnx.Module):
  """c_fc -> GELU -> c_proj (OpenCLIP names)."""

  def __init__(self, width: int, hidden: int, quick: bool, *, rngs: nnx.Rngs, dtype=None):
    self.c_fc = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
    self.c_proj = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs)
    self.quick = quick

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.c_fc(x)
    # Exact erf GELU: create_model_and_transforms('ViT-B-32') builds the tower without QuickGELU.
    h = quick_gelu(h) if self.quick else jax.nn.gelu(h, approximate=False)
    return self.c_proj(h)


class ResidualAttentionBlock(nnx.Module):
  """x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

  def __init__(self, width: int, heads: int, quick_gelu: bool, *, rngs: nnx.Rngs, dtype=None):
    self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.attn = MultiheadAttention(width, heads, rngs=rngs, dtype=dtype)
    self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, 4 * width, quick_gelu, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.ln_1(x)
    x = x + self.attn(h, h, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):

  def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool, *, rngs: nnx.Rngs,
               dtype=None):
    self.resblocks = nnx.List([ResidualAttentionBlock(width, heads, quick_gelu, rngs=rngs,
                                                      dtype=dtype) for _ in range(layers)])


class VisionTransformer(nnx.Module):
  """The image tower of OpenCLIP ViT models, returning the grid of patch tokens.

  Attribute names mirror OpenCLIP's (conv1, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks, ln_post) so that weight import is a renaming.
  """

  # Children trained when config.model.fine_tune (the reference's `children[-2:]`); the patch
  # embedding, class token, positions and ln_pre stay frozen.
  FINE_TUNED = ('transformer', 'ln_post')

  def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, *,
               quick_gelu: bool = False, rngs: nnx.Rngs, dtype=None, remat: bool = False):
    if image_size % patch_size:
      raise ValueError(f'config.model.image_size={image_size} is not a multiple of '
                       f'config.model.vit_patch_size={patch_size}')
    if width % heads:
      raise ValueError(f'config.model.vit_width={width} is not divisible by '
                       f'config.model.vit_heads={heads}')
    self.grid = image_size // patch_size
    self.patch_size = patch_size
    scale = width ** -0.5
    self.conv1 = nnx.Conv(3, width, kernel_size=(patch_size, patch_size),
                          strides=(patch_size, patch_size), padding='VALID', use_bias=False,
                          dtype=dtype, rngs=rngs)
    self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (width,)))
    self.positional_embedding = nnx.Param(
        scale * jax.random.normal(rngs.params(), (self.grid ** 2 + 1, width)))
    self.ln_pre = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.transformer = Transformer(width, layers, heads, quick_gelu, rngs=rngs, dtype=dtype)
    self.ln_post = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.out_channels = width
    self.remat = remat

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, g, g, width), row-major over the patch grid."""
    b, h, w, _ = images.shape
    if (h, w) != (self.grid * self.patch_size,) * 2:
      raise ValueError(f'the ViT tower was built for {self.grid * self.patch_size} px images '
                       f'(its positional_embedding has {self.grid}x{self.grid} + 1 rows), got '
                       f'{h}x{w}')
    x = self.conv1(images)  # (B, g, g, width)
    x = x.reshape(b, self.grid ** 2, -1)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
    x = self.ln_pre(x)
    for block in self.transformer.resblocks:
      x = call_block(block, x, self.remat)
    x = self.ln_post(x)
    return x[:, 1:].reshape(b, self.grid, self.grid, -1)
