"""Training RSICRC: the loss, the step, and the loop.

The model is split into pure pytrees (`train_state`) so the step is a pure function of
(state, batch) that `jax.jit` shards over the mesh (`sharding`). Checkpoints (`checkpointing`)
hold the train state, the data position and the run's progress, so a relaunch resumes exactly.
Evaluators (`evaluators`, declared in `config.evals`) run on their schedule; the one named by
`config.best_metric` chooses `workdir/best`. Everything is reported through one MetricWriter.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rsicrc_jax import checkpointing
from rsicrc_jax import config_check
from rsicrc_jax import evaluators
from rsicrc_jax import losses
from rsicrc_jax import mining
from rsicrc_jax import optim
from rsicrc_jax import preemption
from rsicrc_jax import sharding
from rsicrc_jax import train_state as ts
from rsicrc_jax import xla_options
from rsicrc_jax.checkpointing import TrainingError
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from rsicrc_jax.metric_writer import MetricWriter
from rsicrc_jax.models.rsicrc import RSICRC


# ----------------------------------------------------------------------------------------------
# The loss.

def compute_losses(model: RSICRC, batch: Mapping[str, jax.Array], loss_cfg, dtype=jnp.float32):
  """caption, contrastive (over the whole batch) and total loss, plus the positive-pair count.
  Items with valid=False (eval padding) take no part."""
  tokens = batch['tokens']
  valid = batch.get('valid')
  pad_mask = tokens == cap.PAD
  img_a = pipeline.normalize_images(batch['image_a'], dtype, model.normalization)
  img_b = pipeline.normalize_images(batch['image_b'], dtype, model.normalization)
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


def _compute_dtype(config):
  return jnp.dtype(config.model.dtype) if config.model.dtype else jnp.float32


def make_grad_fn(graphdef, config):
  """(params, frozen, batch_stats, rng, batch) -> ((loss, (aux, new_batch_stats, new_rng)),
  grads w.r.t. the trainable params). Training-mode forward: dropout on, BN batch statistics."""
  def loss_fn(params, frozen, stats, rng, batch):
    model = ts.merge_model(graphdef, params, frozen, stats, rng)
    total, aux = compute_losses(model, batch, config.loss, _compute_dtype(config))
    return total, (aux, *ts.mutable_state(model, config.model.fine_tune))

  return jax.value_and_grad(loss_fn, has_aux=True)


# ----------------------------------------------------------------------------------------------
# The step.

def accumulate_gradients(grad_fn, state: ts.TrainState, batch, accum: int):
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
  accum = optim.grad_accum_steps(config)
  grad_fn = make_grad_fn(graphdef, config)

  def step(state: ts.TrainState, batch):
    grads, aux, stats, rng = accumulate_gradients(grad_fn, state, batch, accum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = dict(aux, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, batch_stats=stats, rng=rng,
                         opt_state=opt_state), aux

  return step


def jit_train_step(graphdef, config, optimizer: optax.GradientTransformation, state_sharding,
                   batch_sharding):
  """The compiled training step launch.py runs (and the benchmarks time): the state sharded as
  `state_sharding` and donated, the batch as `batch_sharding`; on the CPU with
  `xla_options.TRAIN_CPU`."""
  return xla_options.train_jit(make_train_step(graphdef, config, optimizer),
                               in_shardings=(state_sharding, batch_sharding),
                               out_shardings=(state_sharding, None), donate_argnums=0)


def make_eval_step(graphdef, config):
  """(state, batch) -> the losses of the eval-mode model (no dropout, BN running statistics)."""
  def step(state: ts.TrainState, batch):
    model = ts.merge_model(graphdef, state.params, state.frozen, state.batch_stats, state.rng)
    model.eval()
    return compute_losses(model, batch, config.loss, _compute_dtype(config))[1]

  return step


# ----------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class RunResult:
  final_step: int
  best_metric: str
  best_value: float
  history: list  # one dict per epoch: train loss and the evaluators' metrics


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


def _open_dataset(config, is_main: bool) -> pipeline.Dataset:
  if jax.process_count() > 1:  # process 0 builds the synthetic data if needed; the others wait
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if is_main:
      pipeline.open_dataset(config.data, build_if_missing=True)
    multihost_utils.sync_global_devices('rsicrc_jax: dataset ready')
  return pipeline.open_dataset(config.data, build_if_missing=is_main)


def _progress(progress: dict, best_metric: str) -> dict:
  """Checkpointed progress; runs saved before config.best_metric existed kept 'best_val_loss'."""
  if 'best' not in progress:
    progress = {'best': {'metric': 'val/loss', 'value': progress.get('best_val_loss'),
                         'step': None}, 'history': progress.get('history', [])}
  if progress['best']['metric'] != best_metric:
    raise TrainingError(f'the checkpointed run chose best/ by {progress["best"]["metric"]}, the '
                        f'config by config.best_metric={best_metric}')
  return progress


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains per `config`, resuming from `workdir` when it holds checkpoints. On SIGINT/SIGTERM,
  saves a checkpoint at the current step and raises preemption.Preempted."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  config_check.validate(config)  # before anything is written
  is_main = jax.process_index() == 0
  dataset = _open_dataset(config, is_main)
  _ready_model_config(config, dataset)
  checkpointing.check_resumable(workdir, config)
  maximize = evaluators.best_is_max(config)

  mesh = sharding.make_mesh(config)
  sharding.check_batch_divides(config, mesh, optim.grad_accum_steps(config))
  # Train batches cut to their longest caption (rounded up): one compiled step per length.
  caption_pad_multiple = int(config.data.get('caption_pad_multiple', 0))
  train_batches, plan = pipeline.make_batches(
      dataset, 'train', global_batch=config.batch_size, max_len=config.model.max_len,
      image_size=config.model.image_size, train=True, seed=config.seed,
      num_epochs=config.epochs, process_index=jax.process_index(),
      process_count=jax.process_count(), caption_pad_multiple=caption_pad_multiple)
  optimizer = optim.make_optimizer(config, plan.num_steps)
  schedule = optim.learning_rate_schedule(config, plan.num_steps)
  graphdef, state = ts.init_state(config, optimizer)
  shardings = sharding.state_sharding(state, mesh, bool(config.sharding.fsdp))
  state = jax.device_put(state, shardings)
  batch_sh = sharding.batch_sharding(mesh)
  train_step = jit_train_step(graphdef, config, optimizer, shardings, batch_sh)
  model_fn = lambda s: ts.model_from_state(graphdef, s)
  evals = evaluators.from_config(
      config, dataset, mesh=mesh, process_index=jax.process_index(),
      process_count=jax.process_count(), model_fn=model_fn,
      loss_step=xla_options.inference_jit(make_eval_step(graphdef, config),
                                          in_shardings=(shardings, batch_sh)))
  evaluators.check_best_metric(config, evals)
  if is_main:
    logging.info('data: %s', pipeline.dataset_summary(dataset))
    checkpointing.write_config(workdir, config, vocab=dataset.vocab)

  ckpt = checkpointing.Checkpoints(workdir, keep=config.checkpoint.keep)
  data_iter = pipeline.iterate(train_batches, num_threads=config.data.num_threads,
                               prefetch=config.data.prefetch)
  progress = {'best': {'metric': config.best_metric, 'value': None, 'step': None},
              'history': []}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  hard_negatives = int(config.get('hard_negatives', 0))
  train_items = pipeline.train_items(dataset, config.model.max_len) if hard_negatives else None
  table = None  # this epoch's mined negatives (config.hard_negatives), saved with checkpoints
  if (restored := ckpt.restore_latest(abstract)) is not None:
    start, state, data_state, progress = restored
    progress = _progress(progress, config.best_metric)
    data_iter.set_state(data_state)
    if hard_negatives and start % plan.steps_per_epoch:
      table = ckpt.mining_table(start)
    logging.info('resumed from %s at step %d', ckpt.directory, start)
  step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, enabled=is_main, resume_step=step)
  # Saves: at each epoch end, every config.checkpoint.every_steps steps, every
  # config.checkpoint.every_minutes of wall clock, and on SIGINT/SIGTERM.
  every_minutes = float(config.checkpoint.get('every_minutes', 0))
  saved_at = time.monotonic()

  def save(epoch_loss):
    nonlocal saved_at
    progress['epoch_loss'] = list(epoch_loss)
    ckpt.save(step, state, data_iter.get_state(), progress, table)
    saved_at = time.monotonic()

  def mine(epoch: int):
    """The epoch's hard negatives and this process's iterator over them from `step` on."""
    nonlocal table
    if table is None:  # else restored with a mid-epoch checkpoint: the same negatives
      model = model_fn(state)
      model.eval()
      run = evaluators.run_model(model, dataset, 'train', config,
                                 batch_size=config.eval_batch_size or config.batch_size,
                                 decode=False, progress=is_main)
      table = mining.mine(mining.train_embeddings(run, train_items), hard_negatives)
      # Logged at the first step trained with them (a rerun from the epoch's start rewrites it).
      writer.write(step + 1, {'mining/negatives_found': float((table >= 0).mean())})
    start_step = step - (epoch - 1) * plan.steps_per_epoch
    return pipeline.iterate(
        pipeline.mined_batches(dataset, plan, table, epoch=epoch - 1, start_step=start_step,
                               max_len=config.model.max_len,
                               image_size=config.model.image_size, seed=config.seed,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(),
                               caption_pad_multiple=caption_pad_multiple),
        num_threads=config.data.num_threads, prefetch=config.data.prefetch)

  def stopped() -> preemption.Preempted:  # after a save at `step`
    return preemption.Preempted(step, signals.received or signal.SIGTERM, ckpt.directory)

  def run_evals(epoch: int, epoch_end: bool) -> dict[str, float]:
    """The evaluators due now; saves best/ when config.best_metric improved."""
    results = {}
    for ev in evals:
      if ev.due(step, epoch, epoch_end):
        results.update({k: float(v) for k, v in ev.run(state).items()})
    note = ''
    if config.best_metric in results:
      value, best = results[config.best_metric], progress['best']['value']
      if best is None or (value > best if maximize else value < best):
        progress['best'].update(value=value, step=step)
        model = ts.merge_model(graphdef, state.params, state.frozen, state.batch_stats,
                               state.rng)  # global arrays: every process writes its shards
        ckpt.save_best(step, model, config.model, is_main)
        note = f'* best {config.best_metric}'
    writer.write(step, results, note)
    return results

  try:
    with preemption.StopSignals() as signals:
      while step < plan.num_steps:
        epoch = step // plan.steps_per_epoch + 1
        epoch_end = epoch * plan.steps_per_epoch
        bar = tqdm(total=plan.steps_per_epoch,
                   initial=step - (epoch - 1) * plan.steps_per_epoch,
                   desc=f'epoch {epoch}/{config.epochs}', disable=not is_main, dynamic_ncols=True)
        # The epoch's mean train loss survives a mid-epoch resume through the checkpoint.
        mid_epoch = step > (epoch - 1) * plan.steps_per_epoch
        train_sum, count = progress.get('epoch_loss', [0.0, 0]) if mid_epoch else (0.0, 0)
        t0, seen = None, 0
        mined = mine(epoch) if hard_negatives else None
        while step < epoch_end:
          local = next(data_iter)
          if mined is not None:  # the items' hard negatives follow the items
            local = pipeline.concat_items(local, next(mined))
          state, aux = train_step(state, sharding.global_batch(local, mesh))
          step += 1
          if t0 is None:  # pairs/s from the end of the first step (compilation excluded)
            jax.block_until_ready(aux)
            t0 = time.perf_counter()
          else:
            seen += config.batch_size * (1 + hard_negatives)
          if step % config.log_every_steps == 0 or step == epoch_end:
            aux = {k: float(v) for k, v in jax.device_get(aux).items()}
            if not all(map(math.isfinite, aux.values())):
              raise TrainingError(
                  f'non-finite loss at step {step} ({aux}); the last good checkpoint is step '
                  f'{ckpt.latest_step()} in {ckpt.directory}')
            train_sum, count = train_sum + aux['loss'], count + 1
            rate, lr = seen / max(time.perf_counter() - t0, 1e-9), float(schedule(step - 1))
            bar.set_postfix(loss=f'{aux["loss"]:.3f}', cap=f'{aux["caption_loss"]:.3f}',
                            con=f'{aux["contrastive_loss"]:.3f}', lr=f'{lr:.1e}',
                            pairs_s=f'{rate:.0f}')
            writer.write(step, {f'train/{k}': v for k, v in
                                dict(aux, learning_rate=lr, pairs_per_s=rate).items()})
          bar.update(1)
          if step == epoch_end:
            break
          if any(ev.due(step, epoch, False) for ev in evals):
            run_evals(epoch, epoch_end=False)
          stop, late = False, False
          # One process decides alone; several agree at logged steps (a collective per step
          # would cost a host round trip each).
          if jax.process_count() == 1 or step % config.log_every_steps == 0:
            stop, late = preemption.agree(
                signals.received is not None,
                every_minutes > 0 and time.monotonic() - saved_at > 60 * every_minutes)
          if stop or late or (config.checkpoint.every_steps
                              and step % config.checkpoint.every_steps == 0):
            save((train_sum, count))
          if stop:
            bar.close()
            raise stopped()
        bar.close()
        results = run_evals(epoch, epoch_end=True)
        progress['history'].append({'epoch': epoch, 'step': step,
                                    'train/loss': train_sum / max(count, 1), **results})
        save((0.0, 0))
        table = None  # the next epoch mines afresh, with the model as it is now
        if preemption.agree(signals.received is not None)[0] and step < plan.num_steps:
          raise stopped()
  finally:
    writer.close()
    ckpt.close()
  return RunResult(step, config.best_metric, progress['best']['value'], progress['history'])
