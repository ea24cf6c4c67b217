"""Train-step speed: seconds per step, pairs/s and model FLOPs per step (XLA cost analysis).

  python benchmarks/train_step.py --config configs/demo.py [--batch 32] [--steps 10]
  python benchmarks/train_step.py --config configs/levir.py --batch 4 --steps 3

Random weights and random inputs of the config's shapes (no dataset needed); the step is the one
launch.py runs (jit over the device mesh, AdamW, BN updates, dropout). MFU = FLOPs per step /
step time / the accelerator's peak FLOP/s (printed when --peak_tflops is given).
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from rsicrc_jax import optim
from rsicrc_jax import sharding
from rsicrc_jax import train
from rsicrc_jax import train_state

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile step).')
_VOCAB = flags.DEFINE_integer('vocab_size', 78, 'Used when the config takes it from the data.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Accelerator peak (e.g. 989 for H100 bf16 dense).')


def main(argv):
  del argv
  c = _CONFIG.value
  if _BATCH.value:
    c.batch_size = _BATCH.value
  if not c.model.vocab_size:
    c.model.vocab_size = _VOCAB.value
  opt = optim.make_optimizer(c, total_steps=1000)
  graphdef, state = train_state.init_state(c, opt)
  params, frozen = state.params, state.frozen
  mesh = sharding.make_mesh(c)
  sh = sharding.state_sharding(state, mesh, c.sharding.fsdp)
  state = jax.device_put(state, sh)
  step = jax.jit(train.make_train_step(graphdef, c, opt),
                 in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, None),
                 donate_argnums=0)
  n, s, length = c.batch_size, c.model.image_size, c.model.max_len
  rs = np.random.default_rng(0)
  tokens = np.zeros((n, length), np.int32)
  tokens[:, 0], tokens[:, 1:9], tokens[:, 9] = 1, rs.integers(4, c.model.vocab_size, (n, 8)), 3
  batch = sharding.global_batch({
      'image_a': rs.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
      'image_b': rs.integers(0, 256, (n, s, s, 3), dtype=np.uint8), 'tokens': tokens,
      'flag': np.where(np.arange(n) % 2 == 0, -1, np.arange(n)).astype(np.int32),
      'caption_id': np.arange(n, dtype=np.int32) % 7}, mesh)
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  state, aux = compiled(state, batch)
  jax.block_until_ready(aux)
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    state, aux = compiled(state, batch)
  jax.block_until_ready(aux)
  dt = (time.perf_counter() - t) / _STEPS.value
  n_params = sum(x.size for x in jax.tree.leaves(params)) + sum(
      x.size for x in jax.tree.leaves(frozen))
  print(f'{jax.devices()[0].device_kind} x{mesh.shape["data"]}: {n_params / 1e6:.1f}M params, '
        f'batch {n} at {s} px, dtype {c.model.dtype or "float32"}')
  print(f'compile {compile_s:.1f} s; step {dt * 1e3:.1f} ms; {n / dt:.1f} pairs/s; '
        f'{flops / 1e9:.1f} GFLOP per step (XLA); {flops / dt / 1e12:.3f} TFLOP/s achieved'
        + (f'; MFU {flops / dt / (_PEAK.value * 1e12):.1%}' if _PEAK.value else ''))


if __name__ == '__main__':
  app.run(main)
