"""What the benchmarks measure, as functions: the train step, captioning, eval embedding and a
matmul peak. `train_step.py`, `decoding.py` and `accelerator.py` are command lines over these, so
a number in the README and one from the accelerator check come from the same code.

Nothing here imports TensorFlow, TFDS, grain or pycocoevalcap: the accelerator machines lack
them. Inputs are random (weights, pictures, captions) at the config's shapes; speed does not
depend on the values except through decoding's stopping, which random weights never reach (every
caption runs to max_len, the worst case).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsicrc_jax import cli
from rsicrc_jax import decoding
from rsicrc_jax import evaluators
from rsicrc_jax import optim
from rsicrc_jax import sharding
from rsicrc_jax import train
from rsicrc_jax import train_state
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from rsicrc_jax.models.encoder import REMAT_POLICIES
from rsicrc_jax.models.rsicrc import RSICRC

SYNTHETIC_VOCAB = 78  # the synthetic dataset's vocabulary: for configs that take it from the data

# Dense peak TFLOP/s per device (vendor data sheets, SXM parts, no sparsity), by compute dtype.
# float32 matmuls run as TF32 on these GPUs under JAX's default precision.
NOMINAL_PEAK_TFLOPS = {
    'H100': {'bfloat16': 989.4, 'float32': 494.7},
    'H200': {'bfloat16': 989.4, 'float32': 494.7},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
}


def nominal_peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in NOMINAL_PEAK_TFLOPS.items():
    if name in device_kind:
      return peaks.get(dtype)
  return None


def _sync(x):
  jax.block_until_ready(x)
  return x


def matmul_peak(n: int, dtype: str = 'float32', repeats: int = 10) -> float:
  """TFLOP/s of an n x n x n matmul chain on the default device: the practical peak that the
  step's achieved FLOP/s is compared against, measured in the same run."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
  # Scaled before the cast: a numpy scalar is strongly typed, so bf16 / np.sqrt(n) is float32,
  # and the "bfloat16" chain ran float32 (TF32) matmuls at half the bf16 rate (H100, H200).
  b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / np.sqrt(n)).astype(dt)

  @jax.jit
  def chain(x):
    for _ in range(repeats):
      x = x @ b
    return x

  # Warm up for a second (a GPU's clocks rise under load), then time back-to-back chains of
  # at least 0.2 s, so launch and sync gaps are a small part of what is timed.
  t = time.perf_counter()
  _sync(chain(a))
  once = max(time.perf_counter() - t, 1e-6)
  while time.perf_counter() - t < 1.0:
    _sync(chain(a))
  calls = max(1, int(np.ceil(0.2 / once)))
  best = float('inf')
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(calls):
      x = chain(a)
    _sync(x)
    best = min(best, (time.perf_counter() - t) / calls)
  return 2 * n**3 * repeats / best / 1e12


HEADROOM = 0.9  # the largest batch leaves a tenth of the device for fragmentation and cuDNN


def largest_batch(fixed_gb: float, per_pair_gb: float, limit_gb: float, multiple: int) -> int:
  """The largest batch, a multiple of `multiple`, whose step fits HEADROOM of the device, given
  that the step's memory is affine in the batch: weights, optimizer state and workspace, plus
  per-pair activations."""
  return int((HEADROOM * limit_gb - fixed_gb) / per_pair_gb) // multiple * multiple


def parse_train_rows(specs: list[str], fit_json: str, limit_gb: float | None,
                     multiple: int) -> list[tuple[str, int, str]]:
  """--train_rows DTYPE:BATCH[:REMAT] -> (dtype, batch, remat); BATCH=largest from the fit."""
  fits = {}
  if fit_json:
    try:
      with open(fit_json, encoding='utf-8') as f:
        fits = {r['dtype']: r for r in json.load(f).get('largest_batch', [])}
    except (OSError, ValueError) as err:
      raise ValueError(f'--fit_json={fit_json}: cannot read it ({err})') from err
  rows = []
  for spec in specs:
    parts = spec.split(':')
    if len(parts) not in (2, 3) or parts[0] not in ('float32', 'bfloat16'):
      raise ValueError(f'--train_rows: {spec!r} is not DTYPE:BATCH[:REMAT] with DTYPE '
                       'float32 or bfloat16')
    dtype, batch, remat = parts[0], parts[1], (parts[2] if len(parts) == 3 else '')
    if remat not in REMAT_POLICIES:
      raise ValueError(f'--train_rows: {spec!r}: REMAT must be one of '
                       f'{", ".join(p for p in REMAT_POLICIES if p)}')
    if batch == 'largest':
      if dtype not in fits or not limit_gb:
        raise ValueError(
            f'--train_rows: {spec!r} needs --fit_json with a {dtype} largest_batch row '
            f'(got {sorted(fits) or "none"} from {fit_json or "no --fit_json"}) and the '
            'device\'s memory (--memory_gb on CPU)')
      fit = fits[dtype]
      n = largest_batch(fit['fixed_gb'], fit['per_pair_mb'] / 1024, limit_gb, multiple)
      if n <= 0:
        raise ValueError(
            f'--train_rows: {spec!r}: by {fit_json}\'s fit ({fit["fixed_gb"]:.2f} GiB + '
            f'{fit["per_pair_mb"]:.1f} MiB per pair) no batch of {multiple} fits '
            f'{HEADROOM:.0%} of {limit_gb:.2f} GiB')
      rows.append((dtype, n, remat))
    elif batch.isdigit() and int(batch) > 0:
      rows.append((dtype, int(batch), remat))
    else:
      raise ValueError(f'--train_rows: {spec!r}: BATCH must be a positive integer or "largest"')
  return rows


# Words per LEVIR-CC caption, for random batches of its lengths: a no-change pair carries one of
# the five sentences of SPEC section 1; a changed pair's caption has n words with these counts,
# from the 300 real change captions of the dataset's training split that the project was given
# (mean 11.0 words; with half the pairs unchanged, 7.9, LEVIR-CC's mean).
NO_CHANGE_WORDS = tuple(len(s.split()) for s in cap.NO_CHANGE_SENTENCES)
CHANGE_WORD_COUNTS = {3: 2, 4: 1, 5: 5, 6: 19, 7: 21, 8: 29, 9: 30, 10: 48, 11: 30, 12: 31, 13: 22,
                      14: 17, 15: 12, 16: 8, 17: 10, 18: 4, 19: 4, 20: 2, 21: 1, 22: 1, 25: 2,
                      28: 1}


def _unchanged(batch: int) -> np.ndarray:
  """The benchmark batch's no-change pairs: the even ones."""
  return np.arange(batch) % 2 == 0


def random_captions(config, batch: int, seed: int = 0) -> np.ndarray:
  """(batch, L) int32 `[START] w.. [END] PAD..` captions of LEVIR-CC's lengths: pair i unchanged
  for even i (a no-change sentence's length), otherwise drawn from its change captions'; at most
  max_len - 2 words, the caption axis cut as the pipeline cuts it
  (config.data.caption_pad_multiple)."""
  length, vocab = config.model.max_len, config.model.vocab_size
  rs = np.random.default_rng(seed)
  unchanged = _unchanged(batch)
  counts, weights = zip(*CHANGE_WORD_COUNTS.items())
  drawn = rs.choice(counts, size=batch, p=np.asarray(weights) / sum(weights))
  words = np.where(unchanged, np.resize(NO_CHANGE_WORDS, batch), drawn).clip(1, length - 2)
  tokens = np.full((batch, length), cap.PAD, np.int32)
  for i, n in enumerate(words):
    tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = cap.START, rs.integers(4, vocab, n), cap.END
  multiple = int(config.data.get('caption_pad_multiple', 0))
  return pipeline.cut_captions({'tokens': tokens},
                               cap.padded_length(int(words.max()), multiple, length))['tokens']


def random_train_batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the pipeline's training shapes: uint8 pictures, half the pairs unchanged
  (flag -1), captions from `random_captions`."""
  image_a, image_b = _random_pairs(batch, config.model.image_size, seed)
  return {'image_a': image_a, 'image_b': image_b,
          'tokens': random_captions(config, batch, seed),
          'flag': np.where(_unchanged(batch), -1, np.arange(batch)).astype(np.int32),
          'caption_id': np.arange(batch, dtype=np.int32) % 7}


def caption_slots(config, batch: int) -> int:
  """Caption slots of the benchmarks' batch of `batch` pairs for `config` (its decoder's share
  of the step depends on them), without drawing its pictures."""
  return int(random_captions(_step_config(config, batch)[0], batch).shape[1])


def _memory_bytes(compiled) -> int | None:
  """Device memory the executable needs (arguments + outputs - donated aliases + temporaries),
  from XLA's buffer assignment."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def _step_config(config, batch: int):
  """(config at `batch` pairs with a vocabulary, its optimizer) for a benchmark step."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch
  if not config.model.vocab_size:
    config.model.vocab_size = SYNTHETIC_VOCAB
  return config, optim.make_optimizer(config, total_steps=1000)


def compiled_step(config, batch: int):
  """(compiled train step, device state, device batch, compile seconds, model FLOPs) for
  `config` at `batch` pairs: the step launch.py runs (jit over the mesh, AdamW, BN updates,
  dropout)."""
  config, opt = _step_config(config, batch)
  graphdef, state = train_state.init_state(config, opt)
  mesh = sharding.make_mesh(config)
  sh = sharding.state_sharding(state, mesh, config.sharding.fsdp)
  state = jax.device_put(state, sh)
  step = train.jit_train_step(graphdef, config, opt, sh, sharding.batch_sharding(mesh))
  device_batch = sharding.global_batch(random_train_batch(config, batch), mesh)
  t = time.perf_counter()
  compiled = step.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - t
  return compiled, state, device_batch, compile_s, model_flops(step.__wrapped__, state,
                                                              device_batch)


def model_flops(fn, *args) -> float | None:
  """XLA's FLOP count of fn(*args) before optimisation, lowered for the CPU: the same count on
  every platform. (XLA:GPU counts nothing before optimisation, and after it leaves out the
  convolutions handed to cuDNN: 160 GFLOP for the levir step at batch 4 on an H100, against 586.)
  """
  # Placed on a CPU device, so the lowering's backend is the CPU's: a GPU plugin (PJRT C API)
  # answers a cost analysis with nothing, even for a lowering made for the CPU platform.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
  return _flops(jax.jit(fn).trace(*abstract).lower())


def step_flops(config, batch: int) -> float | None:
  """model_flops of the train step of `config` at `batch` pairs, without compiling it."""
  config, opt = _step_config(config, batch)
  graphdef, state = jax.eval_shape(lambda: train_state.init_state(config, opt))
  return model_flops(train.make_train_step(graphdef, config, opt), state,
                     random_train_batch(config, batch))


def _flops(stage) -> float | None:
  """XLA's FLOP count of a lowered or compiled stage; None where the backend counts none."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # e.g. NotImplementedError on a PJRT plugin
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  return flops or None


def train_step(config, batch: int, steps: int = 10) -> dict[str, Any]:
  """Seconds per step, pairs/s, XLA's FLOP count and memory for one train step of `config`."""
  timer = StepTimer(config, batch)
  return timer.result(timer.time(steps))


class StepTimer:
  """The compiled train step of `config` at `batch` pairs, run once (allocation, autotuning
  leftovers). Each `time(steps)` times that many more steps on the carried state, so a caller
  can interleave rounds with other work (side_by_side.py alternates with the reference, as
  this machine's speed drifts by 10-20% between minutes)."""

  def __init__(self, config, batch: int):
    self.config, self.batch = config, batch
    self.compiled, self.state, self.device_batch, self.compile_s, self.flops = compiled_step(
        config, batch)
    self.state, self.aux = self.compiled(self.state, self.device_batch)
    _sync(self.aux)
    self.kernel = {}

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps; also records the kernel counters per step."""
    kernel = _kernel_counters()
    t = time.perf_counter()
    for _ in range(steps):
      self.state, self.aux = self.compiled(self.state, self.device_batch)
    _sync(self.aux)
    dt = (time.perf_counter() - t) / steps
    self.kernel = {k: (v - kernel[k]) / steps for k, v in _kernel_counters().items()}
    return dt

  def result(self, dt: float) -> dict[str, Any]:
    """The benchmark's record for a step time `dt` (checks that the loss is finite)."""
    config, batch, flops = self.config, self.batch, self.flops
    loss = float(self.aux['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'non-finite loss {loss} at batch {batch}')
    n_params = sum(x.size for x in jax.tree.leaves((self.state.params, self.state.frozen)))
    return {'batch': batch, 'dtype': config.model.dtype or 'float32',
            'fsdp': bool(config.sharding.fsdp), 'devices': len(jax.devices()),
            'params_m': n_params / 1e6, 'compile_s': self.compile_s, 'step_ms': dt * 1e3,
            'pairs_per_s': batch / dt, 'gflop_per_step': _div(flops, 1e9),
            'gflop_compiled': _div(_flops(self.compiled), 1e9),
            'tflops_achieved': _div(flops, dt * 1e12),
            'memory_gb': _gb(_memory_bytes(self.compiled)), 'loss': loss,
            'caption_slots': int(self.device_batch['tokens'].shape[1]),
            'sys_s_per_step': self.kernel.get('sys_s'),
            'minor_faults_per_step': self.kernel.get('minor_faults'),
            'huge_pages': cli.huge_pages_on()}


def alternating_rounds(reference: Callable[[], float], ours: Callable[[], float],
                       rounds: int, others: dict[str, Callable[[], float]] | None = None
                       ) -> dict[str, Any]:
  """Calls reference() then ours() (each returns seconds), `rounds` times: both sides' times, the
  per-round ratios reference/ours, and their medians and range. One machine's speed drifts
  between minutes, so a ratio is only fair between neighbouring measurements. `others` (name ->
  callable), variants of ours, run after ours in each round and reported the same way under
  `others[name]`, their ratios taken against the same round's reference time."""
  others = others or {}
  ref_s, ours_s, other_s = [], [], {k: [] for k in others}
  for _ in range(rounds):
    ref_s.append(reference())
    ours_s.append(ours())
    for name, fn in others.items():
      other_s[name].append(fn())

  def summary(times):
    ratios = [r / o for r, o in zip(ref_s, times)]
    return {'s': float(np.median(times)), 'speedup': float(np.median(ratios)),
            'speedup_min': min(ratios), 'speedup_max': max(ratios), 'rounds_s': times,
            'rounds_speedup': ratios}

  main = summary(ours_s)
  out = {'reference_s': float(np.median(ref_s)), 'ours_s': main['s'],
         'speedup': main['speedup'], 'speedup_min': main['speedup_min'],
         'speedup_max': main['speedup_max'],
         'rounds': {'reference_s': ref_s, 'ours_s': ours_s, 'speedup': main['rounds_speedup']}}
  if others:
    out['others'] = {name: summary(times) for name, times in other_s.items()}
  return out


def _kernel_counters() -> dict[str, float]:
  """This process's system CPU seconds and minor page faults so far (none off Unix): XLA:CPU
  touches each step's temporaries afresh, so without huge pages a step pays in page faults."""
  try:
    import resource  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {}
  r = resource.getrusage(resource.RUSAGE_SELF)
  return {'sys_s': r.ru_stime, 'minor_faults': r.ru_minflt}


def _div(x, y):
  return None if x is None else x / y


def _gb(n):
  return None if n is None else n / 2**30


def random_model(model_cfg, dtype: str = '') -> RSICRC:
  cfg = model_cfg.copy_and_resolve_references()
  if not cfg.vocab_size:
    cfg.vocab_size = SYNTHETIC_VOCAB
  cfg.dtype = dtype
  model = RSICRC(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def _random_pairs(n: int, size: int, seed: int = 0):
  rs = np.random.default_rng(seed)
  return (rs.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          rs.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _batches(n: int, batch: int):
  """Index ranges covering n items in batches of `batch`; the last one is padded (repeating
  item 0) so one compiled shape serves all, as eval's pipeline does."""
  for i in range(0, n, batch):
    idx = np.arange(i, i + batch)
    yield np.where(idx < n, idx, 0)


def _timed_batches(run, n: int, batch: int):
  """run(indices) over n items in padded batches, after one untimed warm-up batch (the compile).
  Returns (warm-up seconds, timed seconds, the outputs in order)."""
  t = time.perf_counter()
  run(next(_batches(n, batch)))
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  outputs = [run(idx) for idx in _batches(n, batch)]
  return compile_s, time.perf_counter() - t, outputs


def captioning(model_cfg, pairs: int, batch: int, dtype: str = '') -> dict[str, Any]:
  """KV-cached greedy captioning of `pairs` pairs (uint8 in, normalised on device), captions/s.
  The first batch is a warm-up (compile) and is not timed."""
  model = random_model(model_cfg, dtype)
  a, b = _random_pairs(pairs, model_cfg.image_size)

  def run(idx):
    # as eval does: the model casts
    na = pipeline.normalize_images(jnp.asarray(a[idx]), normalization=model.normalization)
    nb = pipeline.normalize_images(jnp.asarray(b[idx]), normalization=model.normalization)
    return np.asarray(decoding.greedy_decode_cached(model, na, nb)[0])

  compile_s, dt, outputs = _timed_batches(run, pairs, batch)
  tokens = np.concatenate(outputs)[:pairs]
  steps = int((tokens[:, 1:] != cap.PAD).sum(1).mean())
  return {'pairs': pairs, 'batch': batch, 'dtype': dtype or 'float32', 'compile_s': compile_s,
          'seconds': dt, 'captions_per_s': pairs / dt, 'mean_tokens': steps}


def embedding(model_cfg, pairs: int, batch: int, dtype: str = '') -> dict[str, Any]:
  """Eval's embedding of `pairs` pairs and their captions (evaluators' jitted function): pairs/s."""
  model = random_model(model_cfg, dtype)
  a, b = _random_pairs(pairs, model_cfg.image_size)
  cfg = model.decoder
  tokens = np.full((pairs, cfg.max_len), cap.PAD, np.int32)
  tokens[:, 0], tokens[:, 1:9], tokens[:, 9] = cap.START, 5, cap.END
  graphdef, state = nnx.split(model)

  def run(idx):
    v, t = evaluators.embed_pairs(graphdef, state, jnp.asarray(a[idx]), jnp.asarray(b[idx]),
                                  jnp.asarray(tokens[idx]))
    return np.asarray(v), np.asarray(t)

  compile_s, dt, _ = _timed_batches(run, pairs, batch)
  return {'pairs': pairs, 'batch': batch, 'dtype': dtype or 'float32', 'compile_s': compile_s,
          'seconds': dt, 'pairs_per_s': pairs / dt}
