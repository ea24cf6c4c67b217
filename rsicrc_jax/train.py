"""Training: a sharded, jit-compiled step, an Orbax-checkpointed loop that resumes exactly.

The model is split into pure pytrees (trainable params, frozen params, BatchNorm statistics,
dropout RNG state) so the step is a pure function of (state, batch) that `jax.jit` shards over a
declared mesh. The batch is split over the mesh's 'data' axis; parameters and optimizer state
are replicated or, with `config.sharding.fsdp`, sharded over the same axis (ZeRO-3 style).
Because jit sees the GLOBAL batch as one array, the contrastive loss spans every device's items,
as SPEC section 6 requires, with no hand-written collectives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsicrc_jax import losses
from rsicrc_jax import model_io
from rsicrc_jax import weights
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from rsicrc_jax.models.rsicrc import RSICRC, trainable_filter


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, incompatible workdir, ...)."""


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trainable nnx.Param values (pure dict)
  frozen: Any  # non-trained nnx.Param values (the backbone stem and layer1 when fine-tuning)
  batch_stats: Any  # BatchNorm running statistics
  rng: Any  # dropout RNG streams (keys and counters)
  opt_state: Any


# ----------------------------------------------------------------------------------------------
# Model <-> pure state.

def _filters(fine_tune: bool):
  return (trainable_filter(fine_tune), nnx.Param, nnx.BatchStat, nnx.RngState)


def _is_key_leaf(path) -> bool:
  return str(getattr(path[-1], 'key', path[-1])) == 'key'


def pack_rng(rng):
  """Typed PRNG keys -> their raw uint32 data, which checkpoints store as plain arrays."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.key_data(x) if _is_key_leaf(p) else x, rng)


def unpack_rng(rng):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.wrap_key_data(x) if _is_key_leaf(p) else x, rng)


def split_model(model: RSICRC, fine_tune: bool):
  """-> graphdef, (params, frozen, batch_stats, rng) as pure dicts (rng keys as raw data)."""
  graphdef, params, frozen, stats, rng = nnx.split(model, *_filters(fine_tune))
  params, frozen, stats, rng = (nnx.to_pure_dict(s) for s in (params, frozen, stats, rng))
  return graphdef, (params, frozen, stats, pack_rng(rng))


def merge_model(graphdef, params, frozen, batch_stats, rng) -> RSICRC:
  return nnx.merge(graphdef, params, frozen, batch_stats, unpack_rng(rng))


def model_from_state(graphdef, state: TrainState) -> RSICRC:
  """The model held by a TrainState (gathered to host memory when sharded)."""
  return merge_model(graphdef, state.params, state.frozen, state.batch_stats, state.rng)


def create_model(config: ml_collections.ConfigDict) -> RSICRC:
  """Randomly initialised model, then the configured initial weights (`config.init`)."""
  init = config.get('init', ml_collections.ConfigDict())
  checkpoint = init.get('checkpoint', '')
  if checkpoint:  # whole model: a model dir from `convert` or a previous run's best/
    model = model_io.load_model(checkpoint, config.model)
  else:
    model = RSICRC(config.model, rngs=nnx.Rngs(config.seed))
    backbone = init.get('backbone', '')
    if backbone:  # RemoteCLIP / OpenCLIP RN50 image tower (.pt, or .npz from `convert`)
      if backbone.endswith('.npz'):
        with np.load(backbone) as f:
          weights.load_flat_arrays(model.encoder.backbone, dict(f), backbone)
      else:
        weights.import_openclip_backbone(model.encoder.backbone,
                                         weights.load_torch_state_dict(backbone))
  nnx.reseed(model, dropout=config.seed, default=config.seed)
  return model


# ----------------------------------------------------------------------------------------------
# Optimizer (SPEC section 7).

def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over warmup_fraction of all steps, then (config.lr_schedule):
  'constant', the reference (HF's get_constant_schedule_with_warmup, whose first update uses
  lr 0); or 'cosine', a cosine decay to 0 at the last step."""
  warmup = int(config.warmup_fraction * total_steps)
  kind = config.get('lr_schedule', 'constant')
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                              max(total_steps, warmup + 1))
  if kind != 'constant':
    raise ValueError(f"config.lr_schedule: expected 'constant' or 'cosine', got {kind!r}")
  if warmup <= 0:
    return optax.constant_schedule(config.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup),
       optax.constant_schedule(config.learning_rate)], [warmup])


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """AdamW over the trainable parameters only (frozen ones get no update and no decay)."""
  chain = []
  if config.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(config.max_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=0.9, b2=0.999,
                           eps=config.adam_eps, weight_decay=config.weight_decay))
  return optax.chain(*chain)


# ----------------------------------------------------------------------------------------------
# Sharding.

def make_mesh(config) -> Mesh:
  devices = jax.devices()
  n = config.get('sharding', {}).get('num_devices', 0) or len(devices)
  if n > len(devices):
    raise TrainingError(f'config.sharding.num_devices={n} but only {len(devices)} devices exist')
  return Mesh(np.asarray(devices[:n]), ('data',))


def param_spec(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> P:
  """Replicated, or (FSDP) split over 'data' along the largest axis it divides evenly."""
  n = mesh.shape['data']
  if not fsdp or n == 1 or not shape:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0 and shape[axis] >= n:
      spec = [None] * len(shape)
      spec[axis] = 'data'
      return P(*spec)
  return P()


def state_sharding(state: TrainState, mesh: Mesh, fsdp: bool):
  def leaf(x):
    shape = tuple(getattr(x, 'shape', ()))
    return NamedSharding(mesh, param_spec(shape, mesh, fsdp))
  sharded = jax.tree.map(leaf, state)
  # RNG keys and BN statistics are small and read everywhere: keep them replicated.
  replicated = lambda t: jax.tree.map(lambda _: NamedSharding(mesh, P()), t)
  return sharded.replace(rng=replicated(state.rng), batch_stats=replicated(state.batch_stats),
                         step=NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays split over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items() if k in MODEL_INPUTS}


MODEL_INPUTS = ('image_a', 'image_b', 'tokens', 'flag', 'caption_id', 'caption_emb', 'valid')


# ----------------------------------------------------------------------------------------------
# The step.

def compute_losses(model: RSICRC, batch: Mapping[str, jax.Array], loss_cfg, dtype=jnp.float32):
  """caption, contrastive (over the whole batch) and total loss, plus the positive-pair count.
  Items with valid=False (eval padding) take no part."""
  tokens = batch['tokens']
  valid = batch.get('valid')
  pad_mask = tokens == cap.PAD
  img_a = pipeline.normalize_images(batch['image_a'], dtype)
  img_b = pipeline.normalize_images(batch['image_b'], dtype)
  out = model(img_a, img_b, tokens, pad_mask)
  caption_mask = pad_mask if valid is None else pad_mask | ~valid[:, None]
  cap_loss = losses.caption_loss(out.logits.astype(jnp.float32), tokens, caption_mask)
  fn = losses.false_negative_mask(batch.get('caption_emb'), batch['caption_id'],
                                  threshold=loss_cfg.s_threshold, tolerance=loss_cfg.s_tolerance)
  flags = batch['flag']
  if valid is not None:
    # Padding items get unique negative flags and no false negatives: they are then only their
    # own positive; their rows and columns are removed below by the valid mask.
    n = flags.shape[0]
    flags = jnp.where(valid, flags, -2 - jnp.arange(n))
    fn = fn & valid[:, None] & valid[None, :]
  con_loss, num_pos = losses.contrastive_loss(
      out.visual_emb.astype(jnp.float32), out.text_emb.astype(jnp.float32), flags, fn,
      temperature=loss_cfg.temperature, fne=loss_cfg.fne, fna=loss_cfg.fna, top_k=loss_cfg.top_k,
      valid=valid)
  total = losses.total_loss(cap_loss, con_loss, loss_cfg.lamb)
  return total, {'loss': total, 'caption_loss': cap_loss, 'contrastive_loss': con_loss,
                 'positive_pairs': num_pos}


def make_grad_fn(graphdef, config):
  """(params, frozen, batch_stats, rng, batch) -> ((loss, (aux, new_batch_stats, new_rng)),
  grads w.r.t. the trainable params). Training-mode forward: dropout on, BN batch statistics."""
  loss_cfg = config.loss
  dtype = jnp.dtype(config.model.dtype) if config.model.dtype else jnp.float32

  def loss_fn(params, frozen, stats, rng, batch):
    model = merge_model(graphdef, params, frozen, stats, rng)
    total, aux = compute_losses(model, batch, loss_cfg, dtype)
    _, _, _, new_stats, new_rng = nnx.split(model, *_filters(config.model.fine_tune))
    return total, (aux, nnx.to_pure_dict(new_stats), pack_rng(nnx.to_pure_dict(new_rng)))

  return jax.value_and_grad(loss_fn, has_aux=True)


def grad_accum_steps(config) -> int:
  """Microbatches per update (config.grad_accum_steps; absent or < 1 means 1)."""
  return max(int(config.get('grad_accum_steps', 1)), 1)


def accumulate_gradients(grad_fn, state: TrainState, batch, accum: int):
  """Gradients of the trainable params averaged over `accum` microbatches, run in sequence with
  BN statistics and dropout RNG carried from one to the next; each microbatch is its own
  contrastive batch. Microbatch j = items j, j+k, j+2k, ...: each device's slice of the batch
  splits evenly over the microbatches, so every microbatch stays spread over all devices.
  Returns (grads, aux averaged over microbatches, new batch_stats, new rng)."""
  if accum == 1:
    (_, (aux, stats, rng)), grads = grad_fn(state.params, state.frozen, state.batch_stats,
                                            state.rng, batch)
    return grads, aux, stats, rng
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch)

  def body(carry, mb):
    grads, stats, rng = carry
    (_, (aux, stats, rng)), g = grad_fn(state.params, state.frozen, stats, rng, mb)
    return (jax.tree.map(jnp.add, grads, g), stats, rng), aux

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, stats, rng), auxes = jax.lax.scan(body, (zeros, state.batch_stats, state.rng), micro)
  return jax.tree.map(lambda g: g / accum, grads), jax.tree.map(jnp.mean, auxes), stats, rng


def make_train_step(graphdef, config, optimizer: optax.GradientTransformation):
  accum = grad_accum_steps(config)
  grad_fn = make_grad_fn(graphdef, config)

  def step(state: TrainState, batch):
    grads, aux, stats, rng = accumulate_gradients(grad_fn, state, batch, accum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = dict(aux, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, batch_stats=stats, rng=rng,
                         opt_state=opt_state), aux

  return step


def make_eval_step(graphdef, config):
  dtype = jnp.dtype(config.model.dtype) if config.model.dtype else jnp.float32

  def step(state: TrainState, batch):
    model = model_from_state(graphdef, state)
    model.eval()
    _, aux = compute_losses(model, batch, config.loss, dtype)
    return aux

  return step


# ----------------------------------------------------------------------------------------------
# Metrics: JSON lines and TensorBoard event files in the workdir.

class MetricWriter:
  """Appends {'step', 'split', metrics...} to workdir/metrics.jsonl and writes TensorBoard
  scalars under workdir/tensorboard/<split> (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = {}
    self._workdir = workdir
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

  def _writer(self, split: str):
    if split not in self._tb:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.set_visible_devices([], 'GPU')  # TensorBoard only: keep TF off accelerators
      self._tb[split] = tf.summary.create_file_writer(
          os.path.join(self._workdir, 'tensorboard', split))
    return self._tb[split]

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'split': split, **metrics}) + '\n')
    self._jsonl.flush()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with self._writer(split).as_default():
      for k, v in metrics.items():
        tf.summary.scalar(k, v, step=int(step))
    self._writer(split).flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      for w in self._tb.values():
        w.close()


# ----------------------------------------------------------------------------------------------
# Checkpoints.

# What must match for a workdir's checkpoint to be resumed by a config.
_RESUME_KEYS = ('model', 'loss', 'data', 'seed', 'batch_size', 'epochs', 'learning_rate',
                'adam_eps', 'weight_decay', 'warmup_fraction', 'lr_schedule', 'max_grad_norm',
                'grad_accum_steps')


def resume_fingerprint(config) -> dict:
  d = config.to_dict()
  out = {k: d.get(k) for k in _RESUME_KEYS}
  out['data'] = {k: v for k, v in (out['data'] or {}).items()
                 if k not in ('num_threads', 'prefetch', 'data_dir')}
  return json.loads(json.dumps(out, sort_keys=True, default=str))


def check_resumable(workdir: str, config) -> None:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  want = resume_fingerprint(config)
  have = resume_fingerprint(ml_collections.ConfigDict(saved))
  diffs = []

  def walk(a, b, prefix):
    for k in sorted(set(a) | set(b)):
      x, y = a.get(k), b.get(k)
      if isinstance(x, dict) and isinstance(y, dict):
        walk(x, y, f'{prefix}{k}.')
      elif x != y:
        diffs.append(f'{prefix}{k}: workdir has {x!r}, config has {y!r}')

  walk(have, want, 'config.')
  if diffs:
    raise TrainingError(
        f'{workdir} holds a run with an incompatible config ({"; ".join(diffs[:6])}'
        f'{"; ..." if len(diffs) > 6 else ""}). Use another --workdir, or the saved config '
        f'({path}).')


class Checkpoints:
  """Periodic checkpoints (train state + data iterator position) with `keep` retention, and the
  best-by-validation-loss model as a model dir (`workdir/best`, loadable by model_io / eval).
  Orbax writes each step to a temporary folder renamed into place, so a crash mid-save leaves the
  previous checkpoints intact."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = workdir
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'progress': ocp.JsonCheckpointHandler()})
    # The best model is a model dir (config.json + <step>/state) that eval/model_io load; every
    # process takes part in the save, as Orbax requires on multi-host runs.
    self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler()})

  def save_best(self, step: int, model, model_config, is_main: bool) -> None:
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(model_io.state_dict_of(model))), force=True)
    self.best.wait_until_finished()
    if is_main:
      cfg_path = os.path.join(self.best.directory, 'config.json')
      with model_io.atomic_output(str(cfg_path), is_dir=False, overwrite=True) as tmp:
        with open(tmp, 'w') as f:
          f.write(model_config.to_json(indent=2))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, progress: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        progress=ocp.args.JsonSave(progress)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: TrainState):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        progress=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], restored['progress']

  def check_shapes(self, step: int, abstract_state: TrainState) -> None:
    """Fails with the names at fault before Orbax restores anything."""
    meta = self.manager.item_metadata(step)['state']
    name = lambda path: '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                                 for k in path)
    saved = {name(p): tuple(getattr(v, 'shape', ()))
             for p, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
    want = {name(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = sorted(f'{k}: saved {saved.get(k)}, expected {want.get(k)}'
                      for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if problems:
      raise TrainingError(f'{self.manager.directory}/{step}: the checkpoint does not match the '
                          f'config: {"; ".join(problems[:5])}')

  def close(self) -> None:
    self.manager.close()
    self.best.close()


# ----------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class RunResult:
  final_step: int
  best_val_loss: float
  history: list  # one dict per epoch


def _tree_float(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _ready_model_config(config, dataset: pipeline.Dataset) -> None:
  """vocab_size 0 means 'from the dataset'; otherwise it must match the vocabulary."""
  with config.unlocked():
    if not config.model.vocab_size:
      config.model.vocab_size = len(dataset.vocab)
  if config.model.vocab_size != len(dataset.vocab):
    raise TrainingError(
        f'config.model.vocab_size={config.model.vocab_size} but the vocabulary has '
        f'{len(dataset.vocab)} entries ({config.data.vocab_path or "the dataset metadata"}); set '
        '--config.model.vocab_size=0 to take it from the data')


def evaluate_losses(eval_step, state, dataset, split, config, mesh, *, process_index,
                    process_count, desc='val') -> dict[str, float]:
  """Mean losses over a split, batch by batch as the reference does (padding excluded)."""
  batches, plan = pipeline.make_batches(
      dataset, split, global_batch=config.eval_batch_size or config.batch_size,
      max_len=config.model.max_len, image_size=config.model.image_size, train=False,
      process_index=process_index, process_count=process_count)
  totals, n = {}, 0
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  for local in tqdm(pipeline.iterate(batches, num_threads=config.data.num_threads),
                    total=plan.steps_per_epoch, desc=desc, leave=False,
                    disable=process_index != 0):
    aux = _tree_float(eval_step(state, global_batch(local, mesh)))
    for k, v in aux.items():
      totals[k] = totals.get(k, 0.0) + v
    n += 1
  return {k: v / n for k, v in totals.items() if k != 'positive_pairs'}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains per `config`, resuming from `workdir` when it holds checkpoints."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  os.makedirs(workdir, exist_ok=True)

  if process_count > 1:  # process 0 builds the synthetic data if needed; the others wait
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if is_main:
      pipeline.open_dataset(config.data, build_if_missing=True)
    multihost_utils.sync_global_devices('rsicrc_jax: dataset ready')
  dataset = pipeline.open_dataset(config.data, build_if_missing=is_main)
  _ready_model_config(config, dataset)
  check_resumable(workdir, config)
  if is_main:
    logging.info('data: %s', pipeline.dataset_summary(dataset))
    with model_io.atomic_output(os.path.join(workdir, 'config.json'), is_dir=False,
                                overwrite=True) as tmp:
      with open(tmp, 'w') as f:
        f.write(config.to_json(indent=2))

  mesh = make_mesh(config)
  accum = grad_accum_steps(config)
  if config.batch_size % (accum * mesh.shape['data']):
    raise TrainingError(
        f'config.batch_size={config.batch_size} must be divisible by config.grad_accum_steps '
        f'({accum}) times the number of devices on the data axis ({mesh.shape["data"]})')
  train_batches, plan = pipeline.make_batches(
      dataset, 'train', global_batch=config.batch_size, max_len=config.model.max_len,
      image_size=config.model.image_size, train=True, seed=config.seed,
      num_epochs=config.epochs, process_index=process_index, process_count=process_count)
  optimizer = make_optimizer(config, plan.num_steps)
  schedule = learning_rate_schedule(config, plan.num_steps)

  model = create_model(config)
  model.train()
  graphdef, (params, frozen, stats, rng) = split_model(model, config.model.fine_tune)
  del model
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                     batch_stats=stats, rng=rng, opt_state=optimizer.init(params))
  fsdp = bool(config.get('sharding', {}).get('fsdp', False))
  shardings = state_sharding(state, mesh, fsdp)
  state = jax.device_put(state, shardings)
  batch_sh = batch_sharding(mesh)
  train_step = jax.jit(make_train_step(graphdef, config, optimizer),
                       in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, config), in_shardings=(shardings, batch_sh))

  ckpt = Checkpoints(workdir, keep=config.checkpoint.keep)
  data_iter = pipeline.iterate(train_batches, num_threads=config.data.num_threads,
                               prefetch=config.data.prefetch)
  progress = {'best_val_loss': math.inf, 'history': []}
  start = ckpt.latest_step()
  if start is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
    ckpt.check_shapes(start, abstract)
    state, data_state, progress = ckpt.restore(start, abstract)
    data_iter.set_state(data_state)
    logging.info('resumed from %s at step %d', ckpt.manager.directory, start)
  step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, enabled=is_main)
  every = config.checkpoint.every_steps

  def save(step_now):
    ckpt.save(step_now, state, data_iter.get_state(), progress)

  try:
    while step < plan.num_steps:
      epoch = step // plan.steps_per_epoch
      epoch_end = (epoch + 1) * plan.steps_per_epoch
      bar = tqdm(total=plan.steps_per_epoch, initial=step - epoch * plan.steps_per_epoch,
                 desc=f'epoch {epoch + 1}/{config.epochs}', disable=not is_main,
                 dynamic_ncols=True)
      t0, seen, sums, count = None, 0, {}, 0
      while step < epoch_end:
        local = next(data_iter)
        state, aux = train_step(state, global_batch(local, mesh))
        step += 1
        if t0 is None:  # pairs/s from the end of the first step (compilation excluded)
          jax.block_until_ready(aux)
          t0 = time.perf_counter()
        else:
          seen += config.batch_size
        if step % config.log_every_steps == 0 or step == epoch_end:
          aux = _tree_float(aux)
          if not all(math.isfinite(v) for v in aux.values()):
            raise TrainingError(
                f'non-finite loss at step {step} ({aux}); the last good checkpoint is step '
                f'{ckpt.latest_step()} in {ckpt.manager.directory}')
          for k, v in aux.items():
            sums[k] = sums.get(k, 0.0) + v
          count += 1
          rate = seen / max(time.perf_counter() - t0, 1e-9)
          lr = float(schedule(step - 1))
          bar.set_postfix(loss=f'{aux["loss"]:.3f}', cap=f'{aux["caption_loss"]:.3f}',
                          con=f'{aux["contrastive_loss"]:.3f}', lr=f'{lr:.1e}',
                          pairs_s=f'{rate:.0f}')
          writer.write(step, 'train', dict(aux, learning_rate=lr, pairs_per_s=rate))
        bar.update(1)
        if every and step % every == 0 and step != epoch_end:
          save(step)
      bar.close()
      val = evaluate_losses(eval_step, state, dataset, 'val', config, mesh,
                            process_index=process_index, process_count=process_count)
      train_mean = {k: v / max(count, 1) for k, v in sums.items()}
      record = {'epoch': epoch + 1, 'step': step,
                'train_loss': train_mean.get('loss', float('nan')),
                **{f'val_{k}': v for k, v in val.items()}}
      improved = val['loss'] < progress['best_val_loss']
      if improved:
        progress['best_val_loss'] = val['loss']
        ckpt.save_best(step, model_from_state(graphdef, state), config.model, is_main)
      progress['history'].append(record)
      writer.write(step, 'val', val)
      if is_main:
        logging.info('epoch %d step %d: train loss %.4f | val loss %.4f (caption %.4f, '
                     'contrastive %.4f)%s', epoch + 1, step, record['train_loss'], val['loss'],
                     val['caption_loss'], val['contrastive_loss'],
                     ' * best' if improved else '')
        print(f'epoch {epoch + 1}: val loss {val["loss"]:.4f} (caption {val["caption_loss"]:.4f},'
              f' contrastive {val["contrastive_loss"]:.4f}){" *best" if improved else ""}',
              flush=True)
      save(step)
  finally:
    writer.close()
    ckpt.close()
  return RunResult(step, progress['best_val_loss'], progress['history'])
