"""Train-step speed: seconds per step, pairs/s, XLA's FLOP count per step, and the achieved
FLOP/s next to a matmul peak measured in the same run.

  python benchmarks/train_step.py --config configs/demo.py [--batch 32] [--steps 10]
  python benchmarks/train_step.py --config configs/levir.py --batch 4 --steps 3
  python benchmarks/train_step.py --config configs/levir.py --batch 1416 --count_only

Random weights and random inputs of the config's shapes (no dataset needed); the step is the one
launch.py runs (jit over the device mesh, AdamW, BN updates, dropout), measured by
`measure.train_step`, as in the accelerator check. MFU = achieved FLOP/s / peak: the data sheet's
for known accelerators, and always the measured matmul's.
"""

import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402  (benchmarks/measure.py)

from rsicrc_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile step).')
_MATMUL = flags.DEFINE_integer('matmul_n', 2048, 'Size of the n x n x n matmul whose speed is the '
                               'practical peak (0: skip).')
_COUNT_ONLY = flags.DEFINE_bool('count_only', False, 'Only print XLA\'s FLOP count of the step '
                                '(traced, not compiled or run: seconds on a CPU, for any batch), '
                                'to turn a step time measured elsewhere into MFU.')


def _slots(c, slots: int) -> str:
  """The caption slots of the benchmark's batch (LEVIR-CC's caption lengths, cut as training
  cuts them): the decoder's share of the step depends on them."""
  return (f'captions in {slots} of {c.model.max_len} slots '
          f'(config.data.caption_pad_multiple={c.data.get("caption_pad_multiple", 0)})')


def main(argv):
  del argv
  c = _CONFIG.value
  dtype = c.model.dtype or 'float32'
  if _COUNT_ONLY.value:
    batch = _BATCH.value or c.batch_size
    flops = measure.step_flops(c, batch)
    if flops is None:
      raise SystemExit('XLA counted no FLOPs for this step on the CPU backend')
    print(f'{flops / 1e9:.1f} GFLOP per step (XLA, before optimisation): batch {batch}, dtype '
          f'{dtype}, remat {c.model.remat or "off"}, {c.model.image_size} px, '
          f'{_slots(c, measure.caption_slots(c, batch))}')
    return
  r = measure.train_step(c, _BATCH.value or c.batch_size, steps=_STEPS.value)
  dev = jax.devices()[0]
  print(f'{dev.device_kind} x{r["devices"]}: {r["params_m"]:.1f}M params, batch {r["batch"]} at '
        f'{c.model.image_size} px, dtype {dtype}, {_slots(c, r["caption_slots"])}')
  achieved = r['tflops_achieved']  # None where XLA counted no FLOPs
  print(f'compile {r["compile_s"]:.1f} s; step {r["step_ms"]:.1f} ms; {r["pairs_per_s"]:.1f} '
        f'pairs/s; {r["gflop_per_step"] or 0:.1f} GFLOP per step (XLA); '
        f'{(achieved or 0) * 1e3:.1f} GFLOP/s achieved; step memory '
        f'{r["memory_gb"] or 0:.2f} GiB (XLA)')
  if r['sys_s_per_step'] is not None:
    print(f'per step: {r["sys_s_per_step"]:.2f} s of system time, '
          f'{r["minor_faults_per_step"]:,.0f} minor page faults (malloc huge pages '
          f'{"on" if r["huge_pages"] else "off"})')
  if achieved is None:
    print('XLA counted no FLOPs: no MFU (count them with --count_only on a CPU)')
    return
  nominal = measure.nominal_peak_tflops(dev.device_kind, dtype)
  if nominal:
    print(f'MFU {achieved / (nominal * r["devices"]):.1%} of the data sheet\'s '
          f'{nominal:.0f} TFLOP/s per device')
  if _MATMUL.value:
    peak = measure.matmul_peak(_MATMUL.value, dtype)
    print(f'{dtype} matmul {_MATMUL.value}^3 in the same run: {peak * 1e3:.1f} GFLOP/s per device '
          f'-> the step reaches {achieved / (peak * r["devices"]):.0%} of it')


if __name__ == '__main__':
  cli.use_transparent_huge_pages()  # as launch.py: what users run
  app.run(main)
