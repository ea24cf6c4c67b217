"""Input-pipeline throughput: pairs/s delivered at the model's input size, and whether that feeds
an accelerator.

Builds (once) the synthetic dataset at LEVIR-CC's image size (256 px, PNG in array_record), then
- times each stage on one core (read + decode both PNGs; bicubic resize and center crop of both;
  tokenise), pair by pair;
- times the training pipeline with grain's threaded prefetch, for each --threads value, and
  again with every record already in memory (config.data.cache_mb: every epoch after the
  first);
- states the pairs/s an accelerator would need for the levir step and the host cores that takes
  at the measured one-core rate: need = peak FLOP/s x MFU / FLOP per pair (the defaults: an H100's
  989 bf16 dense TFLOP/s from its data sheet, 40% MFU, and XLA's 146.4 GFLOP per levir training
  pair, 585.8 per batch of 4).

  python benchmarks/input_pipeline.py [--data_dir DIR] [--image_size 224] [--batch 32]
"""

import time

from absl import app
from absl import flags

from rsicrc_jax.data import builders
from rsicrc_jax.data import pipeline

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS default).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Model input size.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Batches timed per setting (after 3 warm-up).')
_THREADS = flags.DEFINE_list('threads', ['1', '2', '4'], 'grain read threads to compare.')
_PAIRS = flags.DEFINE_integer('stage_pairs', 200, 'Pairs timed stage by stage on one core.')
_PEAK = flags.DEFINE_float('peak_tflops', 989.0, 'Accelerator peak (H100 SXM bf16 dense).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOP utilisation of the levir step.')
_GFLOP = flags.DEFINE_float('gflop_per_pair', 585.8 / 4, 'Training FLOP per pair (XLA, levir).')


def stage_times(ds, image_size: int, n: int) -> dict[str, float]:
  """Seconds per pair of each host stage, on one core."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.data import captions as cap  # pylint: disable=import-outside-toplevel
  source = ds.source('train')
  n = min(n, len(source))
  t = {'read + decode (2 images)': 0.0, 'resize + crop (2 images)': 0.0, 'tokenise': 0.0}
  for i in range(n):
    s0 = time.perf_counter()
    rec = source[i]
    s1 = time.perf_counter()
    for k in ('image_a', 'image_b'):
      pipeline.resize_center_crop(np.asarray(rec[k]), image_size)
    s2 = time.perf_counter()
    cap.encode_caption(rec['tokens'][0].decode().split(), ds.vocab, 41)
    s3 = time.perf_counter()
    t['read + decode (2 images)'] += s1 - s0
    t['resize + crop (2 images)'] += s2 - s1
    t['tokenise'] += s3 - s2
  return {k: v / n for k, v in t.items()}


def grain_rates(ds, label: str) -> None:
  """Batches of the training pipeline per second through grain, for each --threads value."""
  for threads in map(int, _THREADS.value):
    batches, _ = pipeline.make_batches(ds, 'train', global_batch=_BATCH.value, max_len=41,
                                       image_size=_IMAGE_SIZE.value, train=True, num_epochs=10)
    it = pipeline.iterate(batches, num_threads=threads, prefetch=2 * threads)
    for _ in range(3):
      next(it)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      next(it)
    elapsed = time.perf_counter() - start
    pairs = _STEPS.value * _BATCH.value
    print(f'grain{label}, threads={threads}: {pairs / elapsed:8.1f} pairs/s  '
          f'({elapsed / _STEPS.value * 1e3:.1f} ms per batch of {_BATCH.value})')


def measure(data_cfg: dict, label: str) -> None:
  print(f'--- {label}')
  ds = pipeline.open_dataset(data_cfg, build_if_missing=True)
  stages = stage_times(ds, _IMAGE_SIZE.value, _PAIRS.value)
  per_pair = sum(stages.values())
  for name, sec in stages.items():
    print(f'one core, {name}: {sec * 1e3:6.2f} ms per pair ({sec / per_pair:.0%})')
  need = _PEAK.value * 1e3 * _MFU.value / _GFLOP.value
  print(f'one core, all stages: {1 / per_pair:.0f} pairs/s. An accelerator at {_PEAK.value:.0f} '
        f'TFLOP/s and {_MFU.value:.0%} MFU trains {need:.0f} pairs/s of {_GFLOP.value:.1f} GFLOP: '
        f'{need * per_pair:.1f} host cores at this rate')
  grain_rates(ds, '')
  # The same with every train record in memory, as every epoch after the first reads them.
  cached = pipeline.open_dataset({**data_cfg, 'cache_mb': 1 << 20})
  read = cached.reader('train', _IMAGE_SIZE.value)
  for pair in range(len(cached.caption_lengths['train'])):
    read(pair)
  print(f'records in memory: {len(cached.cache)} pairs, {cached.cache.used / 2**20:.0f} MB')
  grain_rates(cached, ', records in memory')


def main(argv):
  del argv
  preset = builders.SyntheticCCBuilder.PRESETS['levir_size']
  fields = {'name': preset.name, **builders.config_fields(preset)}
  native = {'name': 'synthetic_cc', 'data_dir': _DATA_DIR.value, 'builder_config': fields}
  print(pipeline.dataset_summary(pipeline.open_dataset(native, build_if_missing=True)))
  measure(native, f'256 px PNG as stored by default, resized to {_IMAGE_SIZE.value} when read')
  stored = {**native, 'builder_config': {**fields, 'name': f'levir_size_{_IMAGE_SIZE.value}_raw',
                                         'stored_size': _IMAGE_SIZE.value, 'raw': True}}
  measure(stored, f'stored_size={_IMAGE_SIZE.value}, raw=True: resized once at build time')


if __name__ == '__main__':
  app.run(main)
