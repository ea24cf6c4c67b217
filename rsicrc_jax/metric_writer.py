"""The one channel a run reports through: metrics.jsonl, TensorBoard and a console line.

Metric names are '<group>/<rest>' ('train/loss', 'val/retrieval/changed/R@10'). Each write
becomes one metrics.jsonl row per group, {'step', 'split': group, <rest>: value, ...}, and
TensorBoard scalars <rest> under tensorboard/<group>. Evaluation groups also get one console line
with their headline numbers (losses, R@10, BLEU-4, CIDEr-D); training progress is the progress
bar's job. Only process 0 writes.

A run resumed from the checkpoint of step S first drops the rows after S (written before the
interruption, about to be written again), so metrics.jsonl reads as if the run had never
stopped. TensorBoard does the same for its event files when it meets a step that goes back.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

_HEADLINE = ('loss', 'R@10', 'BLEU-4', 'CIDEr-D', 'negatives_found')


def _headline(key: str) -> bool:
  last = key.split('/')[-1]
  hit_rates = 'pair_to_text' in key or 'text_to_pair_hit' in key  # the literature's: in the files
  return not hit_rates and (last in _HEADLINE or last.endswith('_loss'))


def _keep_rows_up_to(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without its rows after `step` or cut short by a kill."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line if line.endswith('\n') else line + '\n')
    except (ValueError, KeyError, TypeError):
      pass  # a row cut short by a kill mid-write
  if keep != lines:
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(keep)
    os.replace(tmp, path)


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool = True, console: bool = True,
               resume_step: int = 0):
    self.enabled, self.console = enabled, console
    self._tb = {}
    self._workdir = workdir
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      _keep_rows_up_to(path, resume_step)
      self._jsonl = open(path, 'a', encoding='utf-8')

  def _writer(self, group: str):
    if group not in self._tb:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.set_visible_devices([], 'GPU')  # TensorBoard only: keep TF off accelerators
      self._tb[group] = tf.summary.create_file_writer(
          os.path.join(self._workdir, 'tensorboard', group))
    return self._tb[group]

  def write(self, step: int, metrics: Mapping[str, float], note: str = '') -> None:
    """`note` is appended to the console line (e.g. that this is the best so far)."""
    if not self.enabled or not metrics:
      return
    groups: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
      group, _, rest = name.partition('/')
      if not rest:
        raise ValueError(f'metric name {name!r}: expected "<group>/<name>"')
      groups.setdefault(group, {})[rest] = float(value)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    for group, values in groups.items():
      self._jsonl.write(json.dumps({'step': int(step), 'split': group, **values}) + '\n')
      with self._writer(group).as_default():
        for k, v in values.items():
          tf.summary.scalar(k, v, step=int(step))
      self._writer(group).flush()
    self._jsonl.flush()
    if self.console and set(groups) != {'train'}:
      parts = [f'{g}/{k} {v:.4f}' for g, values in groups.items() if g != 'train'
               for k, v in values.items() if _headline(k)]
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      tqdm.write(f'step {step}: ' + ', '.join(parts) + (f' {note}' if note else ''))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      for w in self._tb.values():
        w.close()
