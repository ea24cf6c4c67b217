"""Generates tests/fixtures/openclip_vit_tiny.npz from OpenCLIP's own VisionTransformer.

Two tiny towers with random weights (LayerNorm affine parameters randomised too), one with the
exact GELU the reference's towers use and one with QuickGELU, a random input, and the patch
tokens `forward` returns with `output_tokens=True` (what RSICRC's ViT path takes as its feature
map). Run once; the arrays are committed so the tests need neither torch nor open_clip:

  pip install torch open_clip_torch && python scripts/make_openclip_vit_fixture.py
"""

import argparse

import numpy as np
import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer

IMAGE_SIZE, PATCH, WIDTH, LAYERS, HEADS, OUTPUT_DIM, BATCH = 48, 16, 32, 2, 4, 16, 3


def tiny_tower(act_layer):
  net = VisionTransformer(image_size=IMAGE_SIZE, patch_size=PATCH, width=WIDTH, layers=LAYERS,
                          heads=HEADS, mlp_ratio=4.0, output_dim=OUTPUT_DIM,
                          act_layer=act_layer, output_tokens=True)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
      elif isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention)):
        for p in m.parameters():
          if p.ndim == 1:
            p.normal_(0, 0.1)  # OpenCLIP initialises biases to 0: make them count
  return net.eval()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='tests/fixtures/openclip_vit_tiny.npz')
  args = parser.parse_args()
  torch.manual_seed(0)
  x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
  arrays = {'input': x.numpy()}
  for name, act in (('gelu', torch.nn.GELU), ('quick_gelu', QuickGELU)):
    net = tiny_tower(act)
    with torch.no_grad():
      _, tokens = net(x)  # (B, g*g, width), class token dropped
    arrays.update({f'{name}/state/visual.{k}': v.numpy().copy()
                   for k, v in net.state_dict().items()})
    arrays[f'{name}/tokens'] = tokens.numpy()
  np.savez_compressed(
      args.out, **arrays, image_size=np.asarray(IMAGE_SIZE), patch_size=np.asarray(PATCH),
      width=np.asarray(WIDTH), layers=np.asarray(LAYERS), heads=np.asarray(HEADS),
      open_clip_version=np.asarray(open_clip.__version__),
      torch_version=np.asarray(torch.__version__))
  print(f'wrote {args.out}: tokens {tuple(arrays["gelu/tokens"].shape)}, open_clip '
        f'{open_clip.__version__}')


if __name__ == '__main__':
  main()
