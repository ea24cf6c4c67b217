"""Captioning speed: batched, jit-compiled, KV-cached greedy decoding against the reference's
per-pair loop (re-running the full decoder on the growing sequence at every step).

  python benchmarks/decoding.py [--config configs/demo.py] [--checkpoint runs/demo/best]
      [--pairs 128] [--batch 64]

Both decoders run on the same model and pairs (random weights unless --checkpoint; random
pictures), after a warm-up that compiles them, and must return the same tokens.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags

from rsicrc_jax import cli
from rsicrc_jax import decoding
from rsicrc_jax import model_io
from rsicrc_jax.models.rsicrc import RSICRC

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model config.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Model dir (default: random weights).')
_PAIRS = flags.DEFINE_integer('pairs', 128, 'Pairs to caption.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size of the batched decoder.')
_BEAM = flags.DEFINE_integer('beam_size', 3, 'Also time beam search with this beam (0: skip).')
_REF_PAIRS = flags.DEFINE_integer('reference_pairs', -1, 'Pairs for the slow reference loop '
                                  '(-1: all --pairs; 0: skip it).')


def main(argv):
  del argv
  cfg = _CONFIG.value.model
  if not cfg.vocab_size:
    cfg.vocab_size = 78  # the synthetic dataset's vocabulary
  if _CHECKPOINT.value:
    model = model_io.load_model(_CHECKPOINT.value, cfg)
  else:
    model = RSICRC(cfg, rngs=nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(0)
  shape = (_PAIRS.value, cfg.image_size, cfg.image_size, 3)
  a = jnp.asarray(rng.normal(size=shape), jnp.float32)
  b = jnp.asarray(rng.normal(size=shape), jnp.float32)
  n, bs = _PAIRS.value, _BATCH.value
  print(f'{jax.devices()[0].device_kind}: image {cfg.image_size}, d_model {cfg.d_model}, '
        f'max_len {cfg.max_len}, {n} pairs')

  def batched(fn):
    out = []
    for i in range(0, n, bs):
      out.append(np.asarray(fn(a[i:i + bs], b[i:i + bs])))
    return np.concatenate(out)

  greedy = lambda x, y: decoding.greedy_decode_cached(model, x, y)[0]
  t = time.perf_counter()
  batched(greedy)  # compile (and the ragged last batch)
  print(f'batched, KV cache (jit) : compiled and warmed up in {time.perf_counter() - t:.1f} s',
        flush=True)
  t = time.perf_counter()
  cached = batched(greedy)
  t_cached = time.perf_counter() - t
  print(f'batched, KV cache (jit) : {n / t_cached:8.1f} captions/s', flush=True)

  uncached_fn = lambda x, y: decoding.greedy_decode(model, x, y)[0]
  batched(uncached_fn)
  t = time.perf_counter()
  batched(uncached_fn)
  t_uncached = time.perf_counter() - t
  print(f'batched, uncached (jit) : {n / t_uncached:8.1f} captions/s', flush=True)

  m = n if _REF_PAIRS.value < 0 else min(_REF_PAIRS.value, n)
  if m:
    decoding.greedy_decode_reference(model, a[:1], b[:1])  # compile every length once
    t = time.perf_counter()
    loop = decoding.greedy_decode_reference(model, a[:m], b[:m])
    t_loop = time.perf_counter() - t
    same = all(list(row[:len(ref)]) == ref for row, ref in zip(cached.tolist(), loop))
    steps = sum(len(r) - 1 for r in loop)
    print(f'reference per-pair loop : {m / t_loop:8.1f} captions/s ({steps} decoder steps, '
          f'{m} pairs) -> the KV cache is {t_loop / m / (t_cached / n):.1f}x faster; same '
          f'tokens: {same}', flush=True)
  if _BEAM.value:
    beam = lambda x, y: decoding.beam_search(model, x, y, beam_size=_BEAM.value)[0]
    batched(beam)
    t = time.perf_counter()
    batched(beam)
    print(f'beam {_BEAM.value}, KV cache (jit)  : {n / (time.perf_counter() - t):8.1f} captions/s',
          flush=True)


if __name__ == '__main__':
  cli.use_transparent_huge_pages()  # as launch.py: what users run
  app.run(main)
