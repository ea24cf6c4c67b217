"""CLIP's ModifiedResNet image tower (RemoteCLIP RN50), NHWC, without the attention-pool head.

Architecture (SPEC section 3): a three-conv stem with an average pool, then four stages of
bottlenecks whose strided downsampling is an average pool (anti-aliased, as in CLIP) rather
than a strided convolution. Input (B, H, W, 3) normalised images; output (B, H/32, W/32,
32 * width) feature maps: (B, 7, 7, 2048) for RN50 at 224 px.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from rsicrc_jax.models.layers import BatchNorm, avg_pool, call_block, conv3x3, pointwise_conv

EXPANSION = 4


class Bottleneck(nnx.Module):
  """1x1 reduce -> 3x3 -> 1x1 expand, plus a 1x1 conv + BN shortcut where the shape changes.

  Downsampling (stride > 1), CLIP's anti-aliased way: an average pool before the expanding conv
  and on the shortcut. With `strided_conv` (torchvision's ResNet), the 3x3 conv strides and the
  shortcut conv reads every stride-th pixel instead. Same parameters either way.
  """

  def __init__(self, in_planes: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype=None,
               strided_conv: bool = False):
    out_planes = planes * EXPANSION
    self.stride = stride
    self.strided_conv = strided_conv
    self.conv1 = pointwise_conv(in_planes, planes, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv3x3(planes, planes, stride=stride if strided_conv else 1, use_bias=False,
                         rngs=rngs, dtype=dtype)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = pointwise_conv(planes, out_planes, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn3 = BatchNorm(out_planes, dtype=dtype)
    shortcut = stride > 1 or in_planes != out_planes
    self.downsample_conv = nnx.data(pointwise_conv(
        in_planes, out_planes, use_bias=False, rngs=rngs, dtype=dtype) if shortcut else None)
    self.downsample_bn = nnx.data(BatchNorm(out_planes, dtype=dtype) if shortcut else None)

  def _downsample(self, x: jax.Array) -> jax.Array:
    if self.strided_conv:  # a strided 1x1 conv = subsample, then the pointwise matmul
      return x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
    return avg_pool(x, self.stride)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out if self.strided_conv else avg_pool(out, self.stride)))
    identity = x
    if self.downsample_conv is not None:
      identity = self.downsample_bn(self.downsample_conv(self._downsample(x)))
    return jax.nn.relu(out + identity)


def bottleneck_stages(layers: Sequence[int], width: int, *, rngs: nnx.Rngs, dtype=None,
                      strided_conv: bool = False) -> tuple[list[nnx.List], int]:
  """The four stages of a bottleneck ResNet (planes width * 2**i; every stage but the first
  halves the resolution in its first block) -> (stages, output channels)."""
  if len(layers) != 4:
    raise ValueError(f'a ResNet tower needs 4 stage depths, got layers={list(layers)}')
  in_planes, stages = width, []
  for i, depth in enumerate(layers):
    planes = width * 2**i
    blocks = []
    for b in range(depth):
      stride = 2 if (i > 0 and b == 0) else 1
      blocks.append(Bottleneck(in_planes, planes, stride, rngs=rngs, dtype=dtype,
                               strided_conv=strided_conv))
      in_planes = planes * EXPANSION
    stages.append(nnx.List(blocks))
  return stages, in_planes


def run_stages(tower: nnx.Module, x: jax.Array) -> jax.Array:
  """x through tower.layer1..layer4, each block recomputed in the backward pass with remat."""
  for stage in (tower.layer1, tower.layer2, tower.layer3, tower.layer4):
    for block in stage:
      x = call_block(block, x, tower.remat)
  return x


class ModifiedResNet(nnx.Module):
  """The image tower of CLIP RN50 (and narrower/shallower variants for tests and demos).

  Attributes mirror OpenCLIP's names (conv1/bn1 .. conv3/bn3, layer1..layer4) so that weight
  import is a mechanical renaming.
  """

  # Children trained when config.model.fine_tune (SPEC section 3); the stem and layer1 stay
  # frozen. BatchNorm statistics are not parameters and always update.
  FINE_TUNED = ('layer2', 'layer3', 'layer4')

  def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, *,
               rngs: nnx.Rngs, dtype=None, remat: bool = False):
    self.conv1 = conv3x3(3, width // 2, stride=2, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn1 = BatchNorm(width // 2, dtype=dtype)
    self.conv2 = conv3x3(width // 2, width // 2, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn2 = BatchNorm(width // 2, dtype=dtype)
    self.conv3 = conv3x3(width // 2, width, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn3 = BatchNorm(width, dtype=dtype)
    stages, self.out_channels = bottleneck_stages(layers, width, rngs=rngs, dtype=dtype)
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.remat = remat

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, H/32, W/32, out_channels)."""
    x = jax.nn.relu(self.bn1(self.conv1(images)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = jax.nn.relu(self.bn3(self.conv3(x)))
    return run_stages(self, avg_pool(x, 2))
