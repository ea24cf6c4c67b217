"""Runs training steps of a small RSICRC on a 1-device mesh and on an 8-device mesh (replicated,
FSDP, and with gradient accumulation) over the same global batches, and gradient accumulation
against the same done by hand; prints the results as JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_train.py does).
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update('jax_default_matmul_precision', 'highest')

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs'))
import tiny  # noqa: E402  (tests/configs/tiny.py)
from rsicrc_jax import optim, sharding, train, train_state  # noqa: E402


def tiny_config():
  c = tiny.get_config()
  # No dataset here: random tokens below 40, short captions (the tolerances below were set at
  # this length; longer sequences add rounding to the 1-vs-8-device comparison).
  c.model.vocab_size, c.model.max_len = 40, 12
  c.batch_size = 16
  return c


def batch(n, c, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, c.model.max_len), np.int32)
  for i in range(n):
    k = rng.integers(2, c.model.max_len - 2)
    tokens[i, 0], tokens[i, 1:k + 1], tokens[i, k + 1] = 1, rng.integers(4, 40, k), 3
  flags = np.where(rng.random(n) < 0.4, -1, rng.integers(0, 6, n)).astype(np.int32)
  return {'image_a': rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
          'image_b': rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
          'tokens': tokens, 'flag': flags,
          'caption_id': rng.integers(0, 5, n).astype(np.int32)}


def _flat(tree, n):
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)).ravel()[:n].tolist()
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(num_devices, fsdp, accum=1):
  c = tiny_config()
  c.sharding.num_devices, c.sharding.fsdp = num_devices, fsdp
  c.grad_accum_steps = accum
  model = train_state.create_model(c)
  model.train()
  graphdef, (params, frozen, stats, rng) = train_state.split_model(model, c.model.fine_tune)
  opt = optim.make_optimizer(c, total_steps=100)
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                           batch_stats=stats, rng=rng, opt_state=opt.init(params))
  mesh = sharding.make_mesh(c)
  sh = sharding.state_sharding(state, mesh, fsdp)
  state = jax.device_put(state, sh)
  step = jax.jit(train.make_train_step(graphdef, c, opt),
                 in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, None))
  grads = None
  # The full-batch gradient, compared tensor by tensor: once replicated (dp8). Not for the
  # accumulation runs (the gradient function ignores grad_accum_steps: it would repeat) nor for
  # FSDP, whose gradients show in the two steps' grad_norm and the second step's losses; each
  # of these programs costs ~30 s of compilation.
  if accum == 1 and not fsdp:
    grad_fn = jax.jit(train.make_grad_fn(graphdef, c),
                      in_shardings=(sh.params, sh.frozen, sh.batch_stats, sh.rng,
                                    sharding.batch_sharding(mesh)))
    (_, _), grads = grad_fn(state.params, state.frozen, state.batch_stats, state.rng,
                            sharding.global_batch(batch(c.batch_size, c, seed=0), mesh))
    grads = {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)).tolist()
             for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
  losses = []
  for s in range(2):  # the second step sees updated params, BN stats and advanced dropout RNG
    state, aux = step(state, sharding.global_batch(batch(c.batch_size, c, seed=s), mesh))
    losses.append({k: float(v) for k, v in aux.items()})
  spec_kinds = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
  return {'losses': losses, 'grads': grads, 'params': _flat(state.params, 64),
          'stats': _flat(state.batch_stats, 16), 'specs': spec_kinds,
          'devices': int(mesh.shape['data'])}


def accumulate_by_hand(accum):
  """Gradient accumulation written out step by step (each microbatch = items j, j+k, ...; its
  gradient at the same params; BN statistics and dropout RNG carried to the next microbatch;
  gradients averaged) against `train.accumulate_gradients` under jit."""
  c = tiny_config()
  model = train_state.create_model(c)
  model.train()
  graphdef, (params, frozen, stats, rng) = train_state.split_model(model, c.model.fine_tune)
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                           batch_stats=stats, rng=rng, opt_state=None)
  grad_fn = train.make_grad_fn(graphdef, c)
  full = batch(c.batch_size, c, seed=0)
  total, losses = None, []
  jit_grad_fn = jax.jit(grad_fn)
  for j in range(accum):
    micro = {k: v[j::accum] for k, v in full.items()}
    (_, (aux, stats, rng)), g = jit_grad_fn(params, frozen, stats, rng, micro)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    losses.append(float(aux['loss']))
  by_hand = jax.tree.map(lambda g: g / accum, total)
  grads, aux, jit_stats, _ = jax.jit(
      lambda s, b: train.accumulate_gradients(grad_fn, s, b, accum))(state, full)
  return {'by_hand': {'loss': float(np.mean(losses)), 'grads': _flat(by_hand, 256),
                      'stats': _flat(stats, 16)},
          'step': {'loss': float(aux['loss']), 'grads': _flat(grads, 256),
                   'stats': _flat(jit_stats, 16)}}


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  out = {'single': run(1, False), 'dp8': run(8, False), 'fsdp8': run(8, True),
         'single_accum2': run(1, False, accum=2), 'dp8_accum2': run(8, False, accum=2),
         'by_hand_accum2': accumulate_by_hand(2)}
  json.dump(out, sys.stdout)
