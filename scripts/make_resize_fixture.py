"""Writes tests/fixtures/torchvision_resize.npz: SPEC section 2 geometry done by torchvision.

The reference preprocesses with torchvision's Resize(size, BICUBIC) + CenterCrop(size) on PIL
images. Run once where torchvision is installed (it cannot share a process with TensorFlow):
  python scripts/make_resize_fixture.py
"""

import os

import numpy as np
from PIL import Image
from torchvision import transforms

OUT = os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures', 'torchvision_resize.npz')


def main():
  rng = np.random.default_rng(0)
  arrays = {}
  for k, (h, w, size) in enumerate(((256, 256, 224), (300, 200, 100), (180, 261, 100),
                                    (64, 64, 96))):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tf = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size)])
    arrays[f'input_{k}'] = img
    arrays[f'output_{k}'] = np.asarray(tf(Image.fromarray(img)))
  np.savez_compressed(OUT, **arrays)
  print('wrote', OUT, {k: v.shape for k, v in arrays.items()})


if __name__ == '__main__':
  main()
