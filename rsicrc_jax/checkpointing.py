"""Checkpoints: Orbax managers for the train state and the best model, and the resume check.

Orbax writes each step to a temporary folder renamed into place, so a crash mid-save leaves the
previous checkpoints intact; `model_io.atomic_output` does the same for single files.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from rsicrc_jax.models import backbone as backbones
from rsicrc_jax.models.vit import VisionTransformer
from rsicrc_jax import model_io


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, incompatible workdir, ...)."""


# Config fields that may change between a run and its resumption: how the run is observed,
# scheduled or fed, not what it computes. Every other field is part of the run's identity, so a
# new config field is checked unless it is added here.
RESUME_IGNORES = (
    'checkpoint', 'log_every_steps', 'final_eval', 'evals', 'eval', 'eval_batch_size',
    'sharding', 'init', 'data.num_threads', 'data.prefetch', 'data.cache_mb',
    'data.data_dir',
    'model.remat',  # memory policy: the same numbers
)


def _drop(tree: dict, dotted: str) -> None:
  head, _, rest = dotted.partition('.')
  if rest:
    if isinstance(tree.get(head), dict):
      _drop(tree[head], rest)
  else:
    tree.pop(head, None)


def resume_fingerprint(config) -> dict:
  """The config as a plain dict, less RESUME_IGNORES and the size fields of the backbone family
  the run does not use (an RN50 run ignores vit_*). A workdir written before `model.backbone`
  (or hard_negatives, the builder config's stored_size and raw) existed has them at their
  defaults; one written before `data.caption_pad_multiple` padded captions to max_len (0)."""
  d = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
  for key in RESUME_IGNORES:
    _drop(d, key)
  data = d.get('data')
  if isinstance(data, dict):  # fields added later, at the values runs before them had
    data.setdefault('caption_pad_multiple', 0)
    if isinstance(data.get('builder_config'), dict):
      data['builder_config'].setdefault('stored_size', 0)
      data['builder_config'].setdefault('raw', False)
  d.setdefault('hard_negatives', 0)
  model = d.get('model')
  if isinstance(model, dict):
    model.setdefault('backbone', 'RN50')
    vit = backbones.FAMILIES.get(model['backbone']) is VisionTransformer
    for k in list(model):
      if (k.startswith('vit_') and not vit) or (k.startswith('backbone_') and vit):
        del model[k]
  return d


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a checkpoint folder in workdir/checkpoints (read without creating anything)."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def check_resumable(workdir: str, config) -> None:
  """Raises TrainingError, listing the differing fields, when the workdir holds checkpoints of a
  run whose saved config differs from `config` in a field outside RESUME_IGNORES. A workdir
  without checkpoints (e.g. a launch that failed early) never blocks a new run."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not checkpoint_steps(workdir):
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


def write_config(workdir: str, config, vocab: dict[str, int] | None = None) -> None:
  """workdir/config.json and, given the dataset's vocabulary, workdir/vocab.json: what the
  run's models need to be used without the dataset (`rsicrc_jax.predict`)."""
  with model_io.atomic_output(os.path.join(workdir, 'config.json'), is_dir=False,
                              overwrite=True) as tmp:
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2))
  if vocab is not None:
    with model_io.atomic_output(os.path.join(workdir, 'vocab.json'), is_dir=False,
                                overwrite=True) as tmp:
      with open(tmp, 'w') as f:
        json.dump(vocab, f)


class Checkpoints:
  """Periodic checkpoints (train state, data iterator position, progress) with `keep` retention,
  and the best model as a model dir (`workdir/best`: config.json + <step>/state, which model_io
  and eval load)."""

  def __init__(self, workdir: str, keep: int):
    root = os.path.abspath(workdir)
    self.manager = ocp.CheckpointManager(
        os.path.join(root, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'progress': ocp.JsonCheckpointHandler(),
                       'mining': ocp.StandardCheckpointHandler()})
    # Every process takes part in a save, as Orbax requires on multi-host runs.
    self.best = ocp.CheckpointManager(
        os.path.join(root, 'best'),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler()})

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, progress: dict,
           mining_table=None) -> None:
    """`mining_table`: the epoch's hard negatives (runs with config.hard_negatives), saved so
    that a run resumed mid-epoch trains on the same ones."""
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                 progress=ocp.args.JsonSave(progress))
    if mining_table is not None:
      items['mining'] = ocp.args.StandardSave({'table': mining_table})
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def mining_table(self, step: int):
    """The hard-negative table saved with `step`, or None when it holds none."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'mining')):
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        mining=ocp.args.StandardRestore()))
    return np.asarray(restored['mining']['table'])

  def save_best(self, step: int, model, model_config, is_main: bool) -> None:
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(model_io.state_dict_of(model))), force=True)
    self.best.wait_until_finished()
    if is_main:
      with model_io.atomic_output(os.path.join(self.best.directory, 'config.json'),
                                  is_dir=False, overwrite=True) as tmp:
        with open(tmp, 'w') as f:
          f.write(model_config.to_json(indent=2))

  def check_shapes(self, step: int, abstract_state) -> None:
    """Fails with the names at fault before Orbax restores anything."""
    meta = self.manager.item_metadata(step)['state']
    name = lambda path: jax.tree_util.keystr(path, simple=True, separator='/')
    saved = {name(p): tuple(getattr(v, 'shape', ()))
             for p, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
    want = {name(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = sorted(f'{k}: saved {saved.get(k)}, expected {want.get(k)}'
                      for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if problems:
      raise TrainingError(f'{self.directory}/{step}: the checkpoint does not match the '
                          f'config: {"; ".join(problems[:5])}')

  def restore(self, step: int, abstract_state):
    """-> (state, data iterator state, progress) of `step`, shapes checked first."""
    self.check_shapes(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        progress=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], restored['progress']

  def restore_latest(self, abstract_state):
    """-> (step, state, data iterator state, progress) of the newest checkpoint that reads back
    whole, or None when there is none. Damaged ones (truncated or missing files) are named,
    moved to workdir/damaged_checkpoints/ so that the run can save that step again, and
    skipped. A checkpoint that does not match the config is an error, not damage."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data, progress = self.restore(step, abstract_state)
      except TrainingError:
        raise
      except Exception as err:  # pylint: disable=broad-except  # Orbax/TensorStore raise bare ones
        reason = model_io.read_error_summary(err)
        logging.warning('checkpoint %s/%d is damaged and will not be used (%s)', self.directory,
                        step, reason)
        damaged.append((step, reason))
        continue
      if damaged:
        logging.warning('resuming from step %d, the newest intact checkpoint', step)
        self._set_aside([s for s, _ in damaged])
      return step, state, data, progress
    if damaged:
      raise TrainingError(f'every checkpoint in {self.directory} is damaged: ' + '; '.join(
          f'step {s} ({r})' for s, r in damaged) + '. Move the folder away to start afresh.')
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_count() > 1:  # every process has finished reading before any folder moves
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('rsicrc_jax: damaged checkpoints read')
    if jax.process_index() == 0:
      root = os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')
      os.makedirs(root, exist_ok=True)
      for step in steps:
        dest = os.path.join(root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
        shutil.move(os.path.join(self.directory, str(step)), dest)
        logging.warning('moved the damaged checkpoint of step %d to %s', step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('rsicrc_jax: damaged checkpoints moved')
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()
    self.best.close()
