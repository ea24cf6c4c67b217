"""The accelerator check: what RSICRC does on a GPU or TPU, in one command of a few minutes.

  bash benchmarks/accelerator.sh                 # on the accelerator machine, from the repo root
  python benchmarks/accelerator.py --out DIR     # what the .sh runs, once wheels are in place
  python benchmarks/accelerator.py --dry_run --platform cpu --out DIR   # CI: tiny sizes

Records, into DIR/accelerator.json and DIR/accelerator.md (both rewritten after every
measurement, so a run cut short keeps what it measured):
  - jax, flax, optax versions, the devices, the driver;
  - a matmul's achieved TFLOP/s (the practical peak) next to the data sheet's;
  - the reference parity tests (tests/test_reference_parity.py) run on the device at float32
    with full matmul precision;
  - the train step of --config (levir) in float32 and bfloat16 at batch 4, 32 and the largest
    that fits (predicted from XLA's memory need at 4 and 32, which is affine in the batch), with
    pairs/s, XLA's FLOP count, MFU against the data sheet and against the measured matmul,
    and the step's device memory; FSDP on as well as off when there are several devices;
  - bfloat16 at batch 32 with config.model.remat='all': its memory and its cost;
  - KV-cached greedy captioning of --pairs pairs (1,929: LEVIR-CC's test split) in captions/s;
  - eval's embedding of the same pairs in pairs/s.
Measurements run most important first; once --budget_s has passed, the rest are skipped and
say so. Weights, pictures and captions are random: speed does not depend on them, except that
random weights never emit END, so every caption runs to max_len (the slowest case).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from rsicrc_jax import cli  # absl only: no jax before --platform is read

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO, 'configs', 'levir.py'), 'Training config whose model and step '
    'are measured (default: the paper\'s recipe).')
_OUT = flags.DEFINE_string('out', os.environ.get('OUT', os.path.join(REPO, 'runs', 'accelerator')),
                           'Output dir for accelerator.json and accelerator.md (default: $OUT, '
                           'else runs/accelerator).')
_PLATFORM = flags.DEFINE_string('platform', '', 'jax platform to run on (cpu, gpu, tpu); '
                                '\'\' = jax\'s default.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Tiny sizes (tests/configs/tiny.py model, batches '
                             '2 and 4, 24 pairs, one parity test): proves the script works, '
                             'in about a minute on a CPU.')
_BUDGET = flags.DEFINE_float('budget_s', 420.0, 'Skip the measurements not started after this '
                             'many seconds.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps per measurement.')
_PAIRS = flags.DEFINE_integer('pairs', 1929, 'Pairs captioned and embedded.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 256, 'Batch of the captioning measurement.')
_EMBED_BATCH = flags.DEFINE_integer('embed_batch', 256, 'Batch of the embedding measurement.')
_MEMORY_GB = flags.DEFINE_float('memory_gb', 0.0, 'Device memory the largest batch must fit in '
                                '(0: what the device reports; needed on CPU, which reports none).')
_PARITY = flags.DEFINE_bool('parity', True, 'Run the reference parity tests on the device.')
SECTIONS = ('matmul', 'parity', 'train_step', 'captioning', 'embedding')
_ONLY = flags.DEFINE_list('only', list(SECTIONS), 'Sections to measure, in this order of '
                          f'priority: {",".join(SECTIONS)} (a rerun of what a first run skipped).')
_TRAIN_ROWS = flags.DEFINE_list(
    'train_rows', [], 'Train steps to time instead of the default plan, each DTYPE:BATCH[:REMAT] '
    '(e.g. bfloat16:32:all); BATCH may be "largest", solved from --fit_json\'s memory fit for '
    'this device\'s memory (a rerun of the largest batches a first run predicted but skipped).')
_FIT_JSON = flags.DEFINE_string('fit_json', '', 'An earlier accelerator.json whose largest_batch '
                                'rows (step memory + memory per pair) size BATCH=largest.')
_PARITY_K = flags.DEFINE_string('parity_k', '', 'pytest -k expression selecting the parity tests '
                                'to run (\'\': all of them).')


class Report:
  """The measurements so far, written to JSON and markdown after each one."""

  def __init__(self, out_dir: str):
    self.out_dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    self.data = {'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds'), 'env': {}, 'matmul': [], 'parity': None, 'train_step': [],
                 'largest_batch': [], 'captioning': [], 'embedding': [], 'skipped': [],
                 'failed': []}

  def add(self, section: str, row) -> None:
    if isinstance(self.data[section], list):
      self.data[section].append(row)
    else:
      self.data[section] = row
    self.write()

  def write(self) -> None:
    self.data['elapsed_s'] = round(time.perf_counter() - START, 1)
    for name, text in (('accelerator.json', json.dumps(self.data, indent=2)),
                       ('accelerator.md', markdown(self.data))):
      path = os.path.join(self.out_dir, name)
      with open(path + '.tmp', 'w') as f:
        f.write(text)
      os.replace(path + '.tmp', path)


START = time.perf_counter()


def _f(x, spec='.1f'):
  return '-' if x is None else format(x, spec)


def markdown(d: dict) -> str:
  env = d['env']
  lines = [f'### Accelerator check: {env.get("device_kind", "?")} x{env.get("device_count", "?")}'
           f' ({d["started"]}, {d.get("elapsed_s", 0):.0f} s)\n',
           f'jax {env.get("jax")}, jaxlib {env.get("jaxlib")}, flax {env.get("flax")}, optax '
           f'{env.get("optax")}, Python {env.get("python")}'
           + (f', driver {env["driver"]}' if env.get('driver') else '') + '\n']
  if d['parity']:
    p = d['parity']
    lines.append(f'Reference parity on the device (float32, highest matmul precision, '
                 f'`{p["command"]}`): **{p["summary"]}** (exit {p["returncode"]})\n')
  if d['matmul']:
    lines += ['| matmul | n | TFLOP/s achieved | data sheet |', '| --- | --- | --- | --- |']
    lines += [f'| {r["dtype"]} | {r["n"]} | {_f(r["tflops"], ".2f")} | {_f(r["nominal"])} |'
              for r in d['matmul']]
    lines.append('')
  if d['train_step']:
    lines += ['| train step | batch | FSDP | remat | ms/step | pairs/s | GFLOP/step | TFLOP/s | '
              'MFU (data sheet) | of measured matmul | memory GiB (XLA) | compile s |',
              '| --- |' + ' --- |' * 11]
    for r in d['train_step']:
      lines.append(
          f'| {r["dtype"]} | {r["batch"]} | {"on" if r["fsdp"] else "off"} | {r["remat"]} | '
          f'{_f(r["step_ms"])} | {_f(r["pairs_per_s"])} | {_f(r["gflop_per_step"])} | '
          f'{_f(r["tflops_achieved"], ".3f")} | {_f(r.get("mfu"), ".1%")} | '
          f'{_f(r.get("of_matmul"), ".1%")} | {_f(r["memory_gb"], ".2f")} | '
          f'{_f(r["compile_s"])} |')
    lines.append('')
  for r in d['largest_batch']:
    lines.append(f'Largest {r["dtype"]} batch: {r["batch"]} (step memory {_f(r["fixed_gb"], ".2f")}'
                 f' GiB + {_f(r["per_pair_mb"])} MiB per pair, to fit {r["headroom"]:.0%} of '
                 f'{_f(r["limit_gb"])} GiB).')
  if d['largest_batch']:
    lines.append('')
  for section, unit in (('captioning', 'captions/s'), ('embedding', 'pairs/s')):
    if d[section]:
      key = 'captions_per_s' if section == 'captioning' else 'pairs_per_s'
      lines += [f'| {section} | pairs | batch | {unit} | seconds | compile s |'
                + (' tokens per caption |' if section == 'captioning' else ''),
                '| --- |' + ' --- |' * (6 if section == 'captioning' else 5)]
      for r in d[section]:
        lines.append(f'| {r["dtype"]} | {r["pairs"]} | {r["batch"]} | {_f(r[key])} | '
                     f'{_f(r["seconds"], ".2f")} | {_f(r["compile_s"])} |'
                     + (f' {r["mean_tokens"]} |' if section == 'captioning' else ''))
      lines.append('')
  for r in d['skipped']:
    lines.append(f'- skipped {r["what"]}: {r["why"]}')
  for r in d['failed']:
    lines.append(f'- FAILED {r["what"]}: {r["error"]}')
  return '\n'.join(lines) + '\n'


def environment(jax) -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  devs = jax.devices()
  env = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
         'optax': optax.__version__, 'python': platform.python_version(),
         'platform': devs[0].platform, 'device_kind': devs[0].device_kind,
         'device_count': len(devs), 'process_count': jax.process_count()}
  try:
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
    if smi.returncode == 0:
      env['driver'] = smi.stdout.strip().splitlines()[0]
  except (OSError, subprocess.TimeoutExpired):
    pass
  stats = devs[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    env['memory_limit_gb'] = stats['bytes_limit'] / 2**30
  return env


def parity(platform_name: str, dry_run: bool) -> dict:
  """tests/test_reference_parity.py in a subprocess on the same platform."""
  cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         'tests/test_reference_parity.py']
  if dry_run:
    cmd += ['-k', 'test_eval_outputs and rn50']
  elif _PARITY_K.value:
    cmd += ['-k', _PARITY_K.value]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  if platform_name:
    env['JAX_PLATFORMS'] = platform_name
  t = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  with open(os.path.join(_OUT.value, 'parity.log'), 'w', encoding='utf-8') as f:
    f.write(out.stdout + out.stderr)  # the failures' diffs, which the summary cannot hold
  tail = (out.stdout + out.stderr).strip().splitlines()
  summary = next((line.strip('= ') for line in reversed(tail)
                  if re.search(r'\d+ (passed|failed|error)', line)), tail[-1] if tail else '')
  return {'command': ' '.join(['pytest'] + cmd[6:]), 'returncode': out.returncode,
          'summary': summary, 'seconds': round(time.perf_counter() - t, 1),
          'failures': [line for line in tail if line.startswith(('FAILED', 'ERROR'))][:20]}


def main(argv):
  del argv
  if _PLATFORM.value:
    os.environ['JAX_PLATFORMS'] = _PLATFORM.value
  import jax  # pylint: disable=import-outside-toplevel
  if _PLATFORM.value:
    jax.config.update('jax_platforms', _PLATFORM.value)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import measure  # pylint: disable=import-outside-toplevel

  dry = _DRY_RUN.value
  config = _CONFIG.value
  if dry:
    sys.path.insert(0, os.path.join(REPO, 'tests', 'configs'))
    import tiny  # pylint: disable=import-outside-toplevel
    config = tiny.get_config()
  small, large = (2, 4) if dry else (4, 32)
  pairs = 24 if dry else _PAIRS.value
  decode_batch = 8 if dry else _DECODE_BATCH.value
  embed_batch = 8 if dry else _EMBED_BATCH.value

  report = Report(_OUT.value)
  report.add('env', environment(jax))
  env = report.data['env']
  print(f'accelerator check: {env["device_kind"]} x{env["device_count"]}, jax {env["jax"]}; '
        f'writing {_OUT.value}', flush=True)

  unknown = set(_ONLY.value) - set(SECTIONS)
  if unknown:
    raise app.UsageError(f'--only: unknown section(s) {sorted(unknown)}; expected some of '
                         f'{",".join(SECTIONS)}')

  # Bad --train_rows stop the run before anything is measured.
  limit_gb = _MEMORY_GB.value or env.get('memory_limit_gb')
  multiple = 8 * env['device_count']
  try:
    explicit_rows = measure.parse_train_rows(_TRAIN_ROWS.value, _FIT_JSON.value, limit_gb,
                                             multiple)
  except ValueError as err:
    raise app.UsageError(str(err)) from err

  def attempt(what: str, section: str, fn):
    """Runs one measurement unless the budget is spent; a failure is recorded, not fatal."""
    if section not in _ONLY.value:
      return None
    if time.perf_counter() - START > _BUDGET.value:
      report.add('skipped', {'what': what, 'why': f'--budget_s={_BUDGET.value:.0f} s spent'})
      print(f'skipped {what}: time budget spent', flush=True)
      return None
    t = time.perf_counter()
    try:
      row = fn()
    except Exception as err:  # pylint: disable=broad-except  # record it, go on with the rest
      msg = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'[:500]
      report.add('failed', {'what': what, 'error': msg})
      print(f'FAILED {what}: {msg}', flush=True)
      traceback.print_exc()
      return None
    report.add(section, row)
    print(f'{what}: {json.dumps(row)} ({time.perf_counter() - t:.0f} s)', flush=True)
    return row

  gpu_like = env['platform'] != 'cpu'
  matmul = {}
  for dtype, n in ((('bfloat16', 8192), ('float32', 8192)) if gpu_like
                   else (('float32', 256 if dry else 2048),)):
    row = attempt(f'matmul {dtype}', 'matmul', lambda dtype=dtype, n=n: {
        'dtype': dtype, 'n': n, 'tflops': measure.matmul_peak(n, dtype),
        'nominal': measure.nominal_peak_tflops(env['device_kind'], dtype)})
    if row:
      matmul[dtype] = row['tflops']
  if _PARITY.value:
    attempt('reference parity', 'parity', lambda: parity(_PLATFORM.value, dry))

  def step(dtype: str, batch: int, fsdp: bool = False, remat: str = ''):
    c = config.copy_and_resolve_references()
    c.model.dtype = '' if dtype == 'float32' else dtype
    c.model.remat = remat
    c.sharding.fsdp = fsdp
    # Captions at max_len (41 slots), not cut to the batch's longest: the memory fit across
    # batches assumes one caption length, and the largest batch's longest caption nears max_len.
    c.data.caption_pad_multiple = 0
    row = measure.train_step(c, batch, steps=2 if dry else _STEPS.value)
    row['dtype'], row['remat'] = dtype, remat or 'off'
    nominal = measure.nominal_peak_tflops(env['device_kind'], dtype)
    n_dev = env['device_count']
    achieved = row['tflops_achieved']
    row['mfu'] = achieved / (nominal * n_dev) if nominal and achieved else None
    peak = matmul.get(dtype) or matmul.get('float32')
    row['of_matmul'] = achieved / (peak * n_dev) if peak and achieved else None
    return row

  # The dry run compiles three steps, not nine (a compile takes ~25 s on a CPU): float32 at
  # both small batches for the fit, and the largest batch with bfloat16, FSDP and remat at once.
  rows = {}
  # An explicit --train_rows list replaces the plan, the fit and the remat row.
  plan = explicit_rows or [(d, b, '') for d, b in (
      [('float32', large), ('float32', small)] if dry else
      [('bfloat16', large), ('float32', large), ('bfloat16', small), ('float32', small)])]
  for dtype, batch, remat in plan:
    rows[dtype, batch] = attempt(
        f'train step {dtype} batch {batch}{f" remat={remat}" if remat else ""}', 'train_step',
        lambda d=dtype, b=batch, r=remat: step(d, b, remat=r))
  for label, what, fn in (
      ('captioning float32', 'captioning', lambda: measure.captioning(
          config.model, pairs, decode_batch)),
      ('captioning bfloat16', 'captioning', lambda: measure.captioning(
          config.model, pairs, decode_batch, 'bfloat16')),
      ('embedding float32', 'embedding', lambda: measure.embedding(
          config.model, pairs, embed_batch)),
      ('embedding bfloat16', 'embedding', lambda: measure.embedding(
          config.model, pairs, embed_batch, 'bfloat16'))):
    attempt(label, what, fn)

  multi = env['device_count'] > 1
  planned = 'train_step' in _ONLY.value and not explicit_rows
  for dtype in () if not planned else ('float32',) if dry else ('bfloat16', 'float32'):
    a, b = rows.get((dtype, small)), rows.get((dtype, large))
    if not (a and b and a['memory_gb'] and b['memory_gb'] and limit_gb):
      report.add('skipped', {'what': f'largest {dtype} batch',
                             'why': 'needs the step\'s memory at both small batches and a '
                                    'device memory size (--memory_gb on CPU)'})
      continue
    # Memory is affine in the batch: weights, optimizer state, workspace + per-pair activations.
    per_pair = (b['memory_gb'] - a['memory_gb']) / (large - small)
    fixed = a['memory_gb'] - small * per_pair
    best = measure.largest_batch(fixed, per_pair, limit_gb, multiple)
    report.add('largest_batch', {'dtype': dtype, 'batch': best, 'per_pair_mb': per_pair * 1024,
                                 'fixed_gb': fixed, 'limit_gb': limit_gb,
                                 'headroom': measure.HEADROOM})
    if best <= large:
      continue
    # The dry run's one large step also takes the bfloat16, FSDP and remat code paths.
    run_dtype, fsdp, remat = ('bfloat16', multi, 'all') if dry else (dtype, False, '')
    attempt(f'train step {run_dtype} batch {best} (largest{", FSDP" if fsdp else ""}'
            f'{", remat" if remat else ""})', 'train_step',
            lambda d=run_dtype, n=best, f=fsdp, r=remat: step(d, n, f, r))
  if planned and not dry:  # what recomputing the backbone and encoder blocks saves and costs
    attempt(f'train step bfloat16 batch {large} remat=all', 'train_step',
            lambda: step('bfloat16', large, remat='all'))
  if multi and not dry:
    attempt(f'train step bfloat16 batch {large} FSDP', 'train_step',
            lambda: step('bfloat16', large, fsdp=True))
  elif not multi:
    report.add('skipped', {'what': 'FSDP on', 'why': 'one device: FSDP has nothing to split '
                           '(the same program as off)'})
  report.write()
  print(markdown(report.data))
  print(f'written to {_OUT.value}/accelerator.json and accelerator.md', flush=True)
  if report.data['failed'] or (report.data['parity'] or {}).get('returncode'):
    sys.exit(1)


if __name__ == '__main__':
  cli.use_transparent_huge_pages()  # as launch.py: what users run
  app.run(main)
