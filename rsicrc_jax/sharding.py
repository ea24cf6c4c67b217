"""Where arrays live: a 1-D ('data',) device mesh, parameter and batch shardings, and global
batches assembled from each process's slice.

The batch is split over 'data'. Parameters and optimizer state are replicated or, with
`config.sharding.fsdp`, split over the same axis (ZeRO-3 style). jit sees the GLOBAL batch as one
array, so the contrastive loss spans every device's items (SPEC section 6) with no hand-written
collectives; the same code runs on 1 CPU, 8 fake devices, one GPU or a pod.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The batch entries the model and the losses read; the pipeline's other fields stay on the host.
MODEL_INPUTS = ('image_a', 'image_b', 'tokens', 'flag', 'caption_id', 'caption_emb', 'valid')


def make_mesh(config) -> Mesh:
  devices = jax.devices()
  n = config.get('sharding', {}).get('num_devices', 0) or len(devices)
  if n > len(devices):
    raise ValueError(f'config.sharding.num_devices={n} but only {len(devices)} devices exist')
  return Mesh(np.asarray(devices[:n]), ('data',))


def local_mesh() -> Mesh:
  """This process's devices on a 'data' axis: for work each process does whole (evaluation)."""
  return Mesh(np.asarray(jax.local_devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


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


def state_sharding(state, mesh: Mesh, fsdp: bool):
  """NamedShardings for a TrainState: params and optimizer state per `param_spec`; the step,
  RNG keys and BN statistics (small, read everywhere) replicated."""
  def leaf(x):
    shape = tuple(getattr(x, 'shape', ()))
    return NamedSharding(mesh, param_spec(shape, mesh, fsdp))
  sharded = jax.tree.map(leaf, state)
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


def check_batch_divides(config, mesh: Mesh, accum: int) -> None:
  if config.batch_size % (accum * mesh.shape['data']):
    raise ValueError(
        f'config.batch_size={config.batch_size} must be divisible by config.grad_accum_steps '
        f'({accum}) times the number of devices on the data axis ({mesh.shape["data"]})')
