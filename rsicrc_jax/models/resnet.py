"""torchvision's ResNet-50 / ResNet-101 (ImageNet weights) as a feature map, NHWC (SPEC section 10).

A 7x7 stride-2 stem and a 3x3 stride-2 max pool, then four stages of bottlenecks that stride on
their 3x3 convolution and take a strided 1x1 convolution as the shortcut; no pooling head.
Input (B, H, W, 3) ImageNet-normalised images; output (B, H/32, W/32, 32 * width):
(B, 8, 8, 2048) at the reference's 256 px (it feeds LEVIR-CC images without resizing).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from rsicrc_jax.models.layers import BatchNorm, call_block, conv3x3, pointwise_conv

EXPANSION = 4


class Bottleneck(nnx.Module):
  """1x1 reduce -> 3x3 (stride) -> 1x1 expand, plus a strided 1x1 conv + BN shortcut."""

  def __init__(self, in_planes: int, planes: int, stride: int, *, rngs: nnx.Rngs, dtype=None):
    out_planes = planes * EXPANSION
    self.stride = stride
    self.conv1 = pointwise_conv(in_planes, planes, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv3x3(planes, planes, stride=stride, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = pointwise_conv(planes, out_planes, use_bias=False, rngs=rngs, dtype=dtype)
    self.bn3 = BatchNorm(out_planes, dtype=dtype)
    shortcut = stride > 1 or in_planes != out_planes
    self.downsample_conv = nnx.data(pointwise_conv(
        in_planes, out_planes, use_bias=False, rngs=rngs, dtype=dtype) if shortcut else None)
    self.downsample_bn = nnx.data(BatchNorm(out_planes, dtype=dtype) if shortcut else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x
    if self.downsample_conv is not None:
      # A strided 1x1 conv reads every stride-th pixel: subsample, then the pointwise matmul.
      identity = self.downsample_bn(self.downsample_conv(x[:, ::self.stride, ::self.stride]))
    return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
  """torchvision's ResNet without avgpool/fc; attribute names mirror torchvision's (conv1, bn1,
  layer1..layer4) so that weight import is a renaming."""

  # Children trained when config.model.fine_tune: the reference's children[-5:] (maxpool, which
  # has no parameters, and layer1..layer4); the stem conv1/bn1 stays frozen.
  FINE_TUNED = ('layer1', 'layer2', 'layer3', 'layer4')

  def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, *,
               rngs: nnx.Rngs, dtype=None, remat: bool = False):
    if len(layers) != 4:
      raise ValueError(f'ResNet needs 4 stage depths, got layers={list(layers)}')
    self.conv1 = nnx.Conv(3, width, kernel_size=(7, 7), strides=(2, 2),
                          padding=((3, 3), (3, 3)), use_bias=False, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    in_planes = width
    stages = []
    for i, depth in enumerate(layers):
      planes = width * 2**i
      blocks = []
      for b in range(depth):
        stride = 2 if (i > 0 and b == 0) else 1
        blocks.append(Bottleneck(in_planes, planes, stride, rngs=rngs, dtype=dtype))
        in_planes = planes * EXPANSION
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.out_channels = in_planes
    self.remat = remat

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, H/32, W/32, out_channels)."""
    x = jax.nn.relu(self.bn1(self.conv1(images)))
    # MaxPool2d(3, stride 2, padding 1): PyTorch pads with -inf.
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = call_block(block, x, self.remat)
    return x
