"""torchvision's ResNet-50 / ResNet-101 (ImageNet weights) as a feature map, NHWC (SPEC section 10).

A 7x7 stride-2 stem and a 3x3 stride-2 max pool, then four stages of the ModifiedResNet's
bottlenecks in their strided-convolution form (stride on the 3x3 conv, a strided 1x1 conv as the
shortcut); no pooling head.
Input (B, H, W, 3) ImageNet-normalised images; output (B, H/32, W/32, 32 * width):
(B, 8, 8, 2048) at the reference's 256 px (it feeds LEVIR-CC images without resizing).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from rsicrc_jax.models.layers import BatchNorm
from rsicrc_jax.models.modified_resnet import bottleneck_stages, run_stages


class ResNet(nnx.Module):
  """torchvision's ResNet without avgpool/fc; attribute names mirror torchvision's (conv1, bn1,
  layer1..layer4) so that weight import is a renaming."""

  # Children trained when config.model.fine_tune: the reference's children[-5:] (maxpool, which
  # has no parameters, and layer1..layer4); the stem conv1/bn1 stays frozen.
  FINE_TUNED = ('layer1', 'layer2', 'layer3', 'layer4')

  def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, *,
               rngs: nnx.Rngs, dtype=None, remat: bool = False):
    self.conv1 = nnx.Conv(3, width, kernel_size=(7, 7), strides=(2, 2),
                          padding=((3, 3), (3, 3)), use_bias=False, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    stages, self.out_channels = bottleneck_stages(layers, width, rngs=rngs, dtype=dtype,
                                                  strided_conv=True)
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.remat = remat

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, H/32, W/32, out_channels)."""
    x = jax.nn.relu(self.bn1(self.conv1(images)))
    # MaxPool2d(3, stride 2, padding 1): PyTorch pads with -inf.
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return run_stages(self, x)
