"""Generates tests/fixtures/openclip_modified_resnet_tiny.npz from OpenCLIP's own ModifiedResNet.

Random weights (BatchNorm statistics and affine parameters randomised too, so that running
statistics matter), a random input, and the tower's feature map before the attention pool, in
eval mode and after one train-mode forward (running statistics). Run once; the arrays are
committed so the tests need neither torch nor open_clip:

  pip install torch open_clip_torch && python scripts/make_openclip_fixture.py
"""

import argparse

import numpy as np
import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet

import tower_fixture  # scripts/tower_fixture.py

LAYERS, WIDTH, IMAGE_SIZE, BATCH = (1, 2, 1, 1), 8, 64, 3


def tower_features(net, x):
  """The tower up to layer4 (its attention-pool head excluded), as RSICRC uses it."""
  x = net.stem(x)
  for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
    x = layer(x)
  return x


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='tests/fixtures/openclip_modified_resnet_tiny.npz')
  args = parser.parse_args()
  torch.manual_seed(0)
  net = ModifiedResNet(list(LAYERS), output_dim=16, heads=2, image_size=IMAGE_SIZE, width=WIDTH)
  arrays = tower_fixture.record(net, tower_features, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE),
                                key_prefix='visual.')
  np.savez_compressed(args.out, **arrays, layers=np.asarray(LAYERS), width=np.asarray(WIDTH),
                      open_clip_version=np.asarray(open_clip.__version__))
  print(f'wrote {args.out}: {sum(k.startswith("state/") for k in arrays)} tensors, features '
        f'{arrays["eval_features"].shape}')


if __name__ == '__main__':
  main()
