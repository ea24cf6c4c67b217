"""The whole training config checked before anything runs or is written: each bad value is named
with what is allowed (one ConfigError listing them all), instead of a traceback from deep inside
grain, optax or the model on the first step."""

from __future__ import annotations

import numbers

from rsicrc_jax.cli import ConfigError

# (dotted field, test, what is allowed). Fields absent from a config (older saved runs) are skipped.
_INT, _REAL = 'an integer', 'a number'


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive_int(v):
  return _is_int(v) and v > 0


def _nonneg_int(v):
  return _is_int(v) and v >= 0


def _positive(v):
  return _is_real(v) and v > 0


def _nonneg(v):
  return _is_real(v) and v >= 0


def _backbone_names() -> list[str]:
  from rsicrc_jax.models import backbone  # pylint: disable=import-outside-toplevel
  return list(backbone.FAMILIES)


def _is_vit(name) -> bool:
  from rsicrc_jax.models import backbone  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.models.vit import VisionTransformer  # pylint: disable=import-outside-toplevel
  return backbone.FAMILIES.get(name) is VisionTransformer


def _normalizations() -> list[str]:
  from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return list(pipeline.NORMALIZATION)


RULES = (
    ('batch_size', _positive_int, 'a positive integer'),
    ('epochs', _positive_int, 'a positive integer'),
    ('seed', _is_int, _INT),
    ('learning_rate', _positive, 'a positive number'),
    ('adam_eps', _positive, 'a positive number'),
    ('weight_decay', _nonneg, 'a number >= 0'),
    ('warmup_fraction', lambda v: _is_real(v) and 0 <= v < 1, 'a number in [0, 1)'),
    ('lr_schedule', lambda v: v in ('constant', 'cosine'), "'constant' or 'cosine'"),
    ('max_grad_norm', _nonneg, 'a number >= 0 (0 = no clipping)'),
    ('grad_accum_steps', _positive_int, 'a positive integer'),
    ('hard_negatives', _nonneg_int, 'an integer >= 0 (0 = no mining)'),
    ('eval_batch_size', _nonneg_int, 'an integer >= 0 (0 = batch_size)'),
    ('log_every_steps', _positive_int, 'a positive integer'),
    ('best_metric_mode', lambda v: v in ('auto', 'min', 'max'), "'auto', 'min' or 'max'"),
    ('checkpoint.keep', _positive_int, 'a positive integer'),
    ('checkpoint.every_steps', _nonneg_int, 'an integer >= 0 (0 = per epoch only)'),
    ('checkpoint.every_minutes', _nonneg, 'a number >= 0 (0 = no time-based saves)'),
    ('sharding.num_devices', _nonneg_int, 'an integer >= 0 (0 = all devices)'),
    ('model.backbone', lambda v: v in _backbone_names(), 'one of ' + ', '.join(
        _backbone_names())),
    ('model.normalization', lambda v: v in _normalizations(),
     'one of ' + ', '.join(_normalizations())),
    ('model.vit_width', _positive_int, 'a positive integer'),
    ('model.vit_layers', _positive_int, 'a positive integer'),
    ('model.vit_heads', _positive_int, 'a positive integer'),
    ('model.vit_patch_size', _positive_int, 'a positive integer'),
    ('model.vit_quick_gelu', lambda v: isinstance(v, bool), 'True or False'),
    ('model.backbone_layers',
     lambda v: len(v) == 4 and all(_positive_int(x) for x in v), 'four positive integers'),
    ('model.backbone_width', _positive_int, 'a positive integer'),
    ('model.image_size', lambda v: _is_int(v) and v >= 32, 'an integer >= 32 (pixels)'),
    ('model.pos_table_size', _positive_int, 'a positive integer'),
    ('model.d_model', _positive_int, 'a positive integer'),
    ('model.encoder_layers', _positive_int, 'a positive integer'),
    ('model.decoder_layers', _positive_int, 'a positive integer'),
    ('model.num_heads', _positive_int, 'a positive integer'),
    ('model.a_dim', _positive_int, 'a positive integer'),
    ('model.h_dim', _positive_int, 'a positive integer'),
    ('model.vocab_size', _nonneg_int, 'an integer >= 0 (0 = from the dataset)'),
    ('model.max_len', lambda v: _is_int(v) and v >= 3, 'an integer >= 3 (START, a word, END)'),
    ('model.dropout', lambda v: _is_real(v) and 0 <= v < 1, 'a number in [0, 1)'),
    ('model.dtype', lambda v: v in ('', 'float32', 'bfloat16'),
     "'' (float32), 'float32' or 'bfloat16'"),
    ('model.remat', lambda v: v in ('', 'none', 'backbone', 'encoder', 'all'),
     "'' (off), 'backbone', 'encoder' or 'all'"),
    ('loss.lamb', _nonneg, 'a number >= 0'),
    ('loss.temperature', _positive, 'a positive number'),
    ('loss.top_k', lambda v: _is_int(v) and (v == -1 or v > 0), '-1 (all) or a positive integer'),
    ('data.num_threads', _positive_int, 'a positive integer'),
    ('data.prefetch', _nonneg_int, 'an integer >= 0'),
    ('data.cache_mb', _nonneg, 'a number of MB >= 0 (0 = no cache)'),
    ('data.caption_pad_multiple', _nonneg_int, 'an integer >= 0 (0 = pad captions to max_len)'),
)


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def validate(config) -> None:
  """Raises ConfigError naming every field of `config` whose value is not allowed."""
  problems = []
  for field, ok, allowed in RULES:
    try:
      value = _get(config, field)
    except KeyError:
      continue
    try:
      good = bool(ok(value))
    except TypeError:
      good = False
    if not good:
      problems.append(f'config.{field}={value!r}: expected {allowed}')
  m = config.get('model', {})
  if not problems and m:
    for field in ('a_dim', 'd_model'):  # attention widths split over the heads
      if field in m and 'num_heads' in m and m[field] % m.num_heads:
        problems.append(f'config.model.{field}={m[field]}: expected a multiple of '
                        f'config.model.num_heads={m.num_heads}')
    if _is_vit(m.get('backbone')) and 'vit_patch_size' in m:
      patch, size = m.vit_patch_size, m.get('image_size', 0)
      if size % patch:
        problems.append(f'config.model.image_size={size}: expected a multiple of '
                        f'config.model.vit_patch_size={patch}')
      elif m.get('pos_table_size', size // patch) < size // patch:
        problems.append(f'config.model.pos_table_size={m.pos_table_size}: expected >= '
                        f'{size // patch}, the ViT feature-map side (image_size / vit_patch_size)')
      if m.vit_width % m.vit_heads:
        problems.append(f'config.model.vit_width={m.vit_width}: expected a multiple of '
                        f'config.model.vit_heads={m.vit_heads}')
  if not problems and config.get('hard_negatives', 0) and config.get('grad_accum_steps', 1) > 1:
    problems.append(f'config.hard_negatives={config.hard_negatives} with '
                    f'config.grad_accum_steps={config.grad_accum_steps}: mined items belong to '
                    'their batch, which microbatches would split; use one of the two')
  if 'data' in config:
    from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    try:
      names = pipeline.parse_names(config.data.get('name'))
    except ValueError as err:
      problems.append(str(err))
    else:
      if len(names) > 1 and config.get('hard_negatives', 0):
        problems.append(f'config.hard_negatives={config.hard_negatives} with the mixture '
                        f'config.data.name={config.data.name!r}: mining runs on one dataset; '
                        'train on one, or set hard_negatives=0')
  if 'evals' in config:
    from rsicrc_jax import evaluators  # pylint: disable=import-outside-toplevel
    for name, entry in config.evals.items():
      try:
        evaluators.check_entry(name, entry)
      except ValueError as err:
        problems.append(str(err))
  if 'best_metric_mode' in config and not problems:
    from rsicrc_jax import evaluators  # pylint: disable=import-outside-toplevel
    try:
      evaluators.best_is_max(config)
    except ValueError as err:
      problems.append(str(err))
  if problems:
    raise ConfigError('; '.join(problems))
