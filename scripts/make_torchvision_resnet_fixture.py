"""Generates tests/fixtures/torchvision_resnet_tiny.npz from torchvision's own ResNet code.

torchvision's `ResNet` and `Bottleneck` with every width divided by 8 (stem 8 channels, stages
8/16/32/64 planes, 256 output channels; torchvision has no width argument for that, so the
subclass below only changes the planes its constructor asks for), layers [1, 2, 1, 1], random
weights and BatchNorm statistics, a random input, and the feature map before avgpool/fc in eval
mode and after one train-mode forward (with the running statistics after it). Run once; the
arrays are committed so the tests need neither torch nor torchvision:

  pip install torch torchvision && python scripts/make_torchvision_resnet_fixture.py
"""

import argparse

import numpy as np
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

import tower_fixture  # scripts/tower_fixture.py

LAYERS, DIV, IMAGE_SIZE, BATCH = (1, 2, 1, 1), 8, 64, 3


class NarrowResNet(ResNet):
  """torchvision's ResNet with its hard-coded widths (64 stem, 64..512 planes) divided by DIV."""

  def __init__(self, layers):
    self._first = True
    super().__init__(Bottleneck, list(layers))
    self.conv1 = torch.nn.Conv2d(3, 64 // DIV, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(64 // DIV)
    del self.fc  # the classifier head is not part of the tower

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
    if self._first:
      self.inplanes, self._first = 64 // DIV, False
    return super()._make_layer(block, planes // DIV, blocks, stride, dilate)


def tower_features(net, x):
  """children[:-2] of torchvision's ResNet, as the reference builds its encoder."""
  x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
  for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
    x = layer(x)
  return x


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='tests/fixtures/torchvision_resnet_tiny.npz')
  args = parser.parse_args()
  torch.manual_seed(0)
  net = NarrowResNet(LAYERS)
  arrays = tower_fixture.record(net, tower_features, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE))
  np.savez_compressed(args.out, **arrays, layers=np.asarray(LAYERS), width=np.asarray(64 // DIV),
                      torchvision_version=np.asarray(torchvision.__version__))
  print(f'wrote {args.out}: {sum(k.startswith("state/") for k in arrays)} tensors, features '
        f'{arrays["eval_features"].shape}')


if __name__ == '__main__':
  main()
