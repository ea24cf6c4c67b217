"""Small building blocks shared by the RSICRC modules.

Only what Flax does not already provide with the semantics the reference needs lives here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
  """BatchNorm over the last (channel) axis with PyTorch's training semantics.

  `nnx.BatchNorm` tracks the *biased* batch variance; PyTorch updates `running_var` with
  the *unbiased* one (n / (n - 1)), and the reference fixtures check running statistics
  after a training step, so this small module keeps PyTorch's rule. `momentum` is the
  weight of the new batch (PyTorch convention: running = 0.9 running + 0.1 batch).
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               use_running_average: bool = True, dtype=None):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)  # statistics and normalisation in float32 whatever the compute dtype
    if self.use_running_average:
      mean, var = self.mean.get_value(), self.var.get_value()
    else:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      n = x.size // x.shape[-1]
      unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
      m = self.momentum
      # Assign new arrays (never write in place: the old buffer may be shared with a caller).
      self.mean.set_value((1 - m) * self.mean.get_value() + m * jax.lax.stop_gradient(mean))
      self.var.set_value((1 - m) * self.var.get_value() + m * unbiased)
    # The scale folded into the per-channel inverse std: one broadcast operand fewer per pixel
    # (XLA:CPU materialises each for YNNPACK). Centring first keeps the textbook's accuracy;
    # folding the mean into the shift too (PyTorch's CPU `x * a + b`) cancels when |mean| >> std.
    a = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    y = (xf - mean) * a + self.bias[...]
    return y.astype(self.dtype or x.dtype)


def avg_pool(x: jax.Array, stride: int) -> jax.Array:
  """`nn.AvgPool2d(stride)` on NHWC maps (window = stride, floor on odd sizes)."""
  if stride == 1:
    return x
  return nnx.avg_pool(x, (stride, stride), strides=(stride, stride), padding='VALID')


def pointwise_conv(in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
                   dtype=None, kernel_init=nnx.initializers.lecun_normal()) -> nnx.Linear:
  """A 1x1 convolution written as a Dense layer over the channel axis.

  Mathematically identical to `Conv(kernel_size=1)`; XLA:CPU runs it several times faster
  as a matmul. The kernel is (in, out); the importer reshapes PyTorch's (out, in, 1, 1).
  """
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                    dtype=dtype, rngs=rngs)


def conv3x3(in_features: int, out_features: int, *, stride: int = 1, use_bias: bool,
            rngs: nnx.Rngs, dtype=None) -> nnx.Conv:
  """A 3x3 convolution with PyTorch's `padding=1` (symmetric), kernel HWIO."""
  return nnx.Conv(in_features, out_features, kernel_size=(3, 3), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=dtype, rngs=rngs)


def call_block(block: nnx.Module, x: jax.Array, remat: bool = False) -> jax.Array:
  """block(x); with `remat` the backward pass recomputes the block from x instead of keeping its
  activations (less memory, more FLOPs, the same numbers). BatchNorm statistics and dropout RNG
  updates leave the block once either way."""
  return _remat_block(block, x) if remat else block(x)


_remat_block = nnx.remat(lambda block, x: block(x))
