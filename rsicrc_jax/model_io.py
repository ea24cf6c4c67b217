"""Saving and loading model weights (parameters + BatchNorm statistics) with Orbax.

Layout of a model directory (what `convert rsicrc` writes and eval/training load):
  DIR/state/        Orbax checkpoint of the model's Param and BatchStat leaves
  DIR/config.json   the `config.model` it was built with
Writes go to a sibling temporary directory that is renamed into place only when complete, so
an interrupted write never leaves a half-written DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from rsicrc_jax.models import RSICRC, model_skeleton

_STATE_FILTER = nnx.Any(nnx.Param, nnx.BatchStat)


def read_error_summary(err: Exception) -> str:
  """One short line for an Orbax/TensorStore read failure (their messages run to pages)."""
  text = str(err).split('See full TensorStore details')[0].strip()
  text = text.splitlines()[0] if text else ''
  return f'{type(err).__name__}: {text[:200]}'


class DamagedCheckpointError(ValueError):
  """Saved weights that cannot be read back: truncated, missing or corrupt files."""

  def __init__(self, path: str, err: Exception):
    super().__init__(f'{path}: the saved weights cannot be read; the files are damaged or '
                     f'incomplete ({read_error_summary(err)})')


@contextlib.contextmanager
def atomic_output(path: str, *, is_dir: bool, overwrite: bool = False):
  """Yields a temporary path beside `path`; on success renames it to `path`, else deletes it."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; remove it or pass --overwrite')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + '.partial-', dir=parent)
  target = tmp if is_dir else os.path.join(tmp, os.path.basename(path))
  try:
    yield target
    if os.path.exists(path):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.replace(target, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def save_model(path: str, model: nnx.Module, model_config: ml_collections.ConfigDict, *,
               overwrite: bool = False, vocab: dict[str, int] | None = None) -> None:
  """Writes a model dir; with `vocab`, also DIR/vocab.json, so that the own-imagery tool can
  use the model without its dataset."""
  state = nnx.to_pure_dict(nnx.state(model, _STATE_FILTER))
  with atomic_output(path, is_dir=True, overwrite=overwrite) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, 'state'), state)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(model_config.to_json(indent=2))
    if vocab is not None:
      with open(os.path.join(tmp, 'vocab.json'), 'w') as f:
        json.dump(vocab, f)


def _check_same_tree(path: str, saved, expected) -> None:
  flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(v.shape)
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, expected = flat(saved), flat(expected)
  problems = [f'{k}: missing' for k in sorted(set(expected) - set(saved))]
  problems += [f'{k}: unexpected' for k in sorted(set(saved) - set(expected))]
  problems += [f'{k}: saved shape {saved[k]}, config.model expects {expected[k]}'
               for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
  if problems:
    more = f' (+{len(problems) - 5} more)' if len(problems) > 5 else ''
    raise ValueError(f'{path}: the saved weights do not match config.model: '
                     + '; '.join(problems[:5]) + more)


def state_dir(path: str) -> str:
  """The Orbax state folder of a model dir: `path/state` (convert, save_model) or, for a
  training run's `best/`, the state of its newest step (`path/<step>/state`)."""
  path = os.path.abspath(path)
  direct = os.path.join(path, 'state')
  if os.path.isdir(direct):
    return direct
  steps = sorted((int(d) for d in os.listdir(path) if d.isdigit()
                  and os.path.isdir(os.path.join(path, d, 'state'))), reverse=True)
  if not steps:
    raise FileNotFoundError(f'{path}: no saved weights (expected {direct} or <step>/state)')
  return os.path.join(path, str(steps[0]), 'state')


def state_dict_of(model: nnx.Module) -> dict:
  """What a model dir stores: parameters and BatchNorm statistics as a pure nested dict."""
  return nnx.to_pure_dict(nnx.state(model, _STATE_FILTER))


def load_model(path: str, model_config: ml_collections.ConfigDict | None = None) -> RSICRC:
  """Builds an RSICRC from `model_config` (default: the saved one) and restores its weights."""
  cfg_file = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f'{path}: not a model directory (no config.json); create one with '
                            'python -m rsicrc_jax.convert or a training run')
  if model_config is None:
    with open(cfg_file) as f:
      model_config = ml_collections.ConfigDict(json.load(f))
  graphdef, target, rest = nnx.split(model_skeleton(model_config), _STATE_FILTER, ...)
  expected = nnx.to_pure_dict(target)
  state_path = state_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    # Compare shapes first: a failed Orbax restore is slow and leaves background work behind.
    try:
      saved = ckptr.metadata(state_path).item_metadata
    except Exception as err:  # pylint: disable=broad-except  # Orbax raises bare ones
      raise DamagedCheckpointError(state_path, err) from err
    _check_same_tree(path, dict(saved), expected)
    try:
      restored = ckptr.restore(state_path, expected)
    except Exception as err:  # pylint: disable=broad-except
      raise DamagedCheckpointError(state_path, err) from err
  nnx.replace_by_pure_dict(target, restored)
  model = nnx.merge(graphdef, target, rest)
  model.eval()
  return model
