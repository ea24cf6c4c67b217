r"""Convert PyTorch weights into what rsicrc_jax trains and evaluates from.

  python -m rsicrc_jax.convert rsicrc model_best.pt --config configs/levir.py --out DIR \
      [--vocab LEVIR-CC/vocab.json]
      A reference RSICRC checkpoint -> model directory (Orbax state + config.json, and the
      vocabulary with --vocab, which `python -m rsicrc_jax.predict` needs), loaded with
      `rsicrc_jax.model_io.load_model(DIR)`.
  python -m rsicrc_jax.convert remoteclip RemoteCLIP-RN50.pt --out rn50.npz [--config ...]
      An OpenCLIP image tower (the whole CLIP file is fine: the text tower is dropped) ->
      backbone arrays (.npz, '/'-joined leaf names), which config.init.backbone loads.
      For a ViT tower name its config: RemoteCLIP-ViT-B-32.pt --config configs/levir.py:backbone=ViT-B-32
      (ViT-L-14 likewise); a checkpoint of the other family is refused with what it holds.
  python -m rsicrc_jax.convert torchvision resnet50-0676ba61.pth --out r50.npz \
      --config configs/levir.py:backbone=resnet50
      A torchvision ResNet-50/101 state_dict (ImageNet weights) -> backbone arrays, likewise.

CKPT may be a PyTorch file (needs the `torch` extra) or a .npz of the state_dict's arrays.
Config fields can be overridden: --config.model.vocab_size=500. Nothing is written to --out
unless the conversion succeeded.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from rsicrc_jax import cli, model_io, weights
from rsicrc_jax.data import captions as cap
from rsicrc_jax.models import RSICRC, model_skeleton
from rsicrc_jax.models import backbone as backbones

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'levir.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file '
                                          '(ml_collections get_config()).', lock_config=False)
_OUT = flags.DEFINE_string('out', None, 'Output directory (rsicrc) or .npz file (remoteclip).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
_VOCAB = flags.DEFINE_string('vocab', None, 'rsicrc: the vocabulary the weights were trained '
                             'with (the dataset\'s vocab.json), stored in the model dir so that '
                             '`python -m rsicrc_jax.predict` finds it.')

USAGE = ('usage: python -m rsicrc_jax.convert {rsicrc,remoteclip,torchvision} CKPT --out OUT '
         '[--config FILE]')


def convert_rsicrc(ckpt: str, config, out: str, overwrite: bool = False,
                   vocab_path: str | None = None) -> RSICRC:
  vocab = cap.read_vocabulary(vocab_path) if vocab_path else None
  if vocab is not None and len(vocab) != config.model.vocab_size:
    raise ValueError(f'--vocab {vocab_path} has {len(vocab)} words but '
                     f'config.model.vocab_size is {config.model.vocab_size}')
  state = weights.load_torch_state_dict(ckpt)
  model = model_skeleton(config.model)
  try:
    weights.import_rsicrc(model, state)
  except weights.CheckpointError as e:
    raise weights.CheckpointError(f'{ckpt}: {e}') from e
  model_io.save_model(out, model, config.model, overwrite=overwrite, vocab=vocab)
  return model


def convert_remoteclip(ckpt: str, config, out: str, overwrite: bool = False,
                       kind: str = 'remoteclip') -> dict:
  """A pretrained tower (OpenCLIP file, or torchvision file with kind='torchvision') -> the
  .npz of backbone arrays that config.init.backbone loads."""
  if not out.endswith('.npz'):
    raise ValueError(f'--out {out}: expected a .npz file name')
  state = weights.load_torch_state_dict(ckpt)
  backbone = nnx.eval_shape(lambda: backbones.build(config.model, rngs=nnx.Rngs(0)))
  load = (weights.import_torchvision_backbone if kind == 'torchvision'
          else weights.import_openclip_backbone)
  try:
    load(backbone, state)
  except weights.CheckpointError as e:
    raise weights.CheckpointError(f'{ckpt}: {e}') from e
  arrays = weights.flat_arrays(backbone)
  with model_io.atomic_output(out, is_dir=False, overwrite=overwrite) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
  return arrays


def main(argv):
  if len(argv) != 3 or argv[1] not in ('rsicrc', 'remoteclip', 'torchvision'):
    raise app.UsageError(USAGE)
  if not _OUT.value:
    raise app.UsageError('--out is required. ' + USAGE)
  config = _CONFIG.value
  kind, ckpt = argv[1], argv[2]
  if kind == 'rsicrc':  # failures: one line and exit 1 (cli.run)
    convert_rsicrc(ckpt, config, _OUT.value, _OVERWRITE.value, vocab_path=_VOCAB.value)
  else:
    convert_remoteclip(ckpt, config, _OUT.value, _OVERWRITE.value, kind=kind)
  print(f'wrote {_OUT.value}')
  return 0


if __name__ == '__main__':
  cli.run(main)
