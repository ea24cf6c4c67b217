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
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
  state = {f'visual.{k}': v.numpy().copy() for k, v in net.state_dict().items()}
  net.eval()
  with torch.no_grad():
    eval_out = tower_features(net, x)
    net.train()
    train_out = tower_features(net, x)
  bn_after = {f'bn_after/visual.{k}': v.numpy().copy() for k, v in net.state_dict().items()
              if 'running' in k}
  np.savez_compressed(
      args.out, **{f'state/{k}': v for k, v in state.items()}, **bn_after,
      input=x.numpy(), eval_features=eval_out.numpy(), train_features=train_out.numpy(),
      layers=np.asarray(LAYERS), width=np.asarray(WIDTH),
      open_clip_version=np.asarray(open_clip.__version__))
  print(f'wrote {args.out}: {len(state)} tensors, features {tuple(eval_out.shape)}')


if __name__ == '__main__':
  main()
