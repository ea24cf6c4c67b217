"""Eval's embedding and decoding (`evaluators.run_model`) on a 1-device mesh and on all 8
(simulated) devices, same model, same split: prints the largest differences as JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_evaluators_sharded.py).
Usage: python tests/workers/sharded_eval.py DATA_DIR
"""

import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

jax.config.update('jax_default_matmul_precision', 'highest')

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / 'configs')]
import tiny  # noqa: E402  (tests/configs/tiny.py)
from data_helpers import tiny_synthetic_cfg  # noqa: E402
from rsicrc_jax import evaluators  # noqa: E402
from rsicrc_jax import mining  # noqa: E402
from rsicrc_jax.data import pipeline  # noqa: E402
from rsicrc_jax.models import RSICRC  # noqa: E402


def main(data_dir):
  config = tiny.get_config()
  config.data.update(tiny_synthetic_cfg(data_dir, num_train=8, num_val=2, num_test=13))
  dataset = pipeline.open_dataset(config.data, build_if_missing=True)
  config.model.vocab_size = len(dataset.vocab)
  model = RSICRC(config.model, rngs=nnx.Rngs(0))
  model.eval()
  devices = jax.devices()
  # Record how many devices each batch (images, tokens) was split over on its way in.
  seen, put = [], evaluators.Inference.put

  def spy(self, x):
    out = put(self, x)
    seen.append(len(out.sharding.device_set))
    return out

  evaluators.Inference.put = spy
  one, eight = Mesh(np.asarray(devices[:1]), ('data',)), Mesh(np.asarray(devices), ('data',))
  out = {'devices': len(devices)}
  for beam in (1, 2):
    # 13 pairs: batches of 5 on one device; 5 rounds up to 8 on eight devices, so the padding
    # and the batch boundaries differ too.
    runs = []
    for mesh in (one, eight):
      seen.clear()
      runs.append(evaluators.run_model(model, dataset, 'test', config, batch_size=5,
                                       beam_size=beam, progress=False, mesh=mesh))
      runs[-1]['split_over'] = sorted(set(seen))
    r1, r8 = runs
    out[f'beam{beam}'] = {
        'split_over': [r1['split_over'], r8['split_over']],
        'pairs': [len(r1['filename']), len(r8['filename'])],
        'same_order': r1['filename'] == r8['filename'],
        'same_captions': r1['hypothesis'] == r8['hypothesis'],
        'captions': r1['hypothesis'][:3],
        **{f'max_diff_{k}': float(np.abs(r1[k] - r8[k]).max()) for k in ('visual', 'text',
                                                                          'all_text')},
        'scale_visual': float(np.abs(r1['visual']).max()),
    }
    if beam == 1:
      out['beam1']['max_diff_attention'] = float(np.abs(r1['attention'] - r8['attention']).max())
  # Hard-negative mining embeds the train split with this code: the same table on both meshes.
  items = pipeline.train_items(dataset, config.model.max_len)
  tables = [mining.mine(mining.train_embeddings(evaluators.run_model(
      model, dataset, 'train', config, batch_size=5, decode=False, progress=False, mesh=mesh),
      items), 1) for mesh in (one, eight)]
  out['mining'] = {'items': len(items), 'found': int((tables[0] >= 0).sum()),
                   'same_table': bool(np.array_equal(*tables))}
  # The own-imagery tool embeds and captions tiles through the same Inference class.
  from rsicrc_jax import predict  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  before, after = f'{data_dir}/scene_a.tif', f'{data_dir}/scene_b.tif'
  synthetic.write_scene_rasters(before, after, seed=1, rows=2, cols=3, size=64)
  imagery = predict.Imagery(before=before, after=after)
  tiles = imagery.tiles(64)
  got = []
  for mesh in (one, eight):
    seen.clear()
    p = predict.Predictor('(in memory)', model, config.model.to_dict(), dataset.vocab, '', '',
                          evaluators.Inference(model, mesh))
    batches = list(predict.run_tiles(p, imagery, tiles, batch_size=5, decode=True,
                                     progress=False))
    got.append((sorted(set(seen)), [t.tile_id for b in batches for t in b.tiles],
                np.concatenate([b.visual for b in batches]),
                np.concatenate([b.tokens for b in batches])))
  out['predict'] = {'split_over': [got[0][0], got[1][0]], 'tiles': len(got[1][1]),
                    'same_order': got[0][1] == got[1][1],
                    'same_tokens': bool(np.array_equal(got[0][3], got[1][3])),
                    'max_diff_visual': float(np.abs(got[0][2] - got[1][2]).max()),
                    'scale_visual': float(np.abs(got[0][2]).max())}
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1])
