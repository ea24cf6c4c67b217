"""The training state as pure pytrees, and the model <-> state conversions.

A jitted step must be a pure function of arrays, so the NNX model is split into trainable params,
frozen params (the backbone stem and layer1 when fine-tuning), BatchNorm statistics and the
dropout RNG state; `merge_model` rebuilds the module inside the step.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rsicrc_jax import model_io
from rsicrc_jax import weights
from rsicrc_jax.models.rsicrc import RSICRC, trainable_filter


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trainable nnx.Param values (pure dict)
  frozen: Any  # non-trained nnx.Param values
  batch_stats: Any  # BatchNorm running statistics
  rng: Any  # dropout RNG streams (keys as raw uint32 data, counters)
  opt_state: Any


def filters(model: RSICRC, fine_tune: bool):
  """nnx.split filters, in TrainState order: params, frozen, batch_stats, rng."""
  return (trainable_filter(fine_tune, model.backbone_name), nnx.Param, nnx.BatchStat,
          nnx.RngState)


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
  graphdef, params, frozen, stats, rng = nnx.split(model, *filters(model, fine_tune))
  params, frozen, stats, rng = (nnx.to_pure_dict(s) for s in (params, frozen, stats, rng))
  return graphdef, (params, frozen, stats, pack_rng(rng))


def merge_model(graphdef, params, frozen, batch_stats, rng) -> RSICRC:
  return nnx.merge(graphdef, params, frozen, batch_stats, unpack_rng(rng))


def mutable_state(model: RSICRC, fine_tune: bool):
  """(batch_stats, rng) of a model after a training-mode forward pass, as pure dicts."""
  _, _, _, stats, rng = nnx.split(model, *filters(model, fine_tune))
  return nnx.to_pure_dict(stats), pack_rng(nnx.to_pure_dict(rng))


def model_from_state(graphdef, state: TrainState) -> RSICRC:
  """The model held by a TrainState. On several processes the arrays are first gathered to
  every host (FSDP shards included), so each process holds the whole model."""
  parts = (state.params, state.frozen, state.batch_stats, state.rng)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    parts = multihost_utils.process_allgather(parts, tiled=True)
  return merge_model(graphdef, *parts)


def create_model(config: ml_collections.ConfigDict) -> RSICRC:
  """Randomly initialised model, then the configured initial weights (`config.init`)."""
  init = config.get('init', ml_collections.ConfigDict())
  checkpoint = init.get('checkpoint', '')
  if checkpoint:  # whole model: a model dir from `convert` or a previous run's best/
    model = model_io.load_model(checkpoint, config.model)
  else:
    model = RSICRC(config.model, rngs=nnx.Rngs(config.seed))
    backbone = init.get('backbone', '')
    if backbone:  # a RemoteCLIP / OpenCLIP image tower (.pt, or .npz from `convert`)
      if backbone.endswith('.npz'):
        with np.load(backbone) as f:
          weights.load_flat_arrays(model.encoder.backbone, dict(f), backbone)
      else:
        weights.import_backbone(model.encoder.backbone, weights.load_torch_state_dict(backbone))
  nnx.reseed(model, dropout=config.seed, default=config.seed)
  return model


def init_state(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation):
  """-> graphdef, TrainState at step 0 (host arrays; `sharding.state_sharding` places them)."""
  model = create_model(config)
  model.train()
  graphdef, (params, frozen, stats, rng) = split_model(model, config.model.fine_tune)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                              batch_stats=stats, rng=rng, opt_state=optimizer.init(params))
