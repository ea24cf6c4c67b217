"""Input-pipeline throughput: pairs/s delivered at the model's input size.

Builds (once) the synthetic dataset at LEVIR-CC's image size (256 px, PNG in array_record), then
times the training pipeline (decode both PNGs, bicubic resize to --image_size, center crop,
tokenise) with grain's threaded prefetch, for each --threads value.

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


def main(argv):
  del argv
  preset = builders.SyntheticCCBuilder.PRESETS['levir_size']
  cfg = {'name': 'synthetic_cc', 'data_dir': _DATA_DIR.value,
         'builder_config': {'name': preset.name, **builders.config_fields(preset)}}
  ds = pipeline.open_dataset(cfg, build_if_missing=True)
  print(pipeline.dataset_summary(ds))
  for threads in map(int, _THREADS.value):
    batches, plan = pipeline.make_batches(ds, 'train', global_batch=_BATCH.value, max_len=41,
                                          image_size=_IMAGE_SIZE.value, train=True, num_epochs=10)
    it = pipeline.iterate(batches, num_threads=threads, prefetch=2 * threads)
    for _ in range(3):
      next(it)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      next(it)
    elapsed = time.perf_counter() - start
    pairs = _STEPS.value * _BATCH.value
    print(f'threads={threads}: {pairs / elapsed:8.1f} pairs/s  ({elapsed / _STEPS.value * 1e3:.1f} '
          f'ms per batch of {_BATCH.value}, {_IMAGE_SIZE.value} px, from 256 px PNG)')


if __name__ == '__main__':
  app.run(main)
