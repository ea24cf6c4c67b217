"""XLA compiler options for the eval-mode programs (embedding, captioning) on the CPU.

XLA:CPU's default YNNPACK fusion hands whole chains of a bottleneck stage to YNNPACK as one
subgraph (1x1 matmuls, BatchNorm, ReLU, 3x3 convolutions, average pools: one `ynn_fusion` per
stage). In an eval-mode forward pass such subgraphs run far slower than the matmuls given to
YNNPACK one at a time, with XLA's own loops and convolutions between them: the levir RN50 tower
on 64 pictures took 5.4-7.6 s against 4.1-4.5 s, and KV-cached captioning of the levir model
0.38-0.44 s against 0.33-0.36 s per pair (2-core CPU, jax 0.10.2; benchmarks/decoding.py and
README). In the training step the default is the faster one (levir: 4.2-4.7 s against 5.2-6.3 s
per step; demo: 0.24-0.31 s against 0.32-0.40 s), so only inference programs take the option.
Elsewhere (GPU, TPU) nothing changes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from absl import logging
import jax

OPTION = 'xla_cpu_experimental_ynn_fusion_type'
INFERENCE_CPU = {OPTION: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


class InferenceJit:
  """`jax.jit(fun, **jit_kwargs)` that compiles with `INFERENCE_CPU` when the default backend is
  the CPU. An XLA that no longer knows the option gets the plain program, with one warning."""

  def __init__(self, fun: Callable[..., Any], **jit_kwargs):
    functools.update_wrapper(self, fun)
    self._plain = jax.jit(fun, **jit_kwargs)
    self._tuned = jax.jit(fun, compiler_options=INFERENCE_CPU, **jit_kwargs)
    self._tuned_ok = True

  def __call__(self, *args, **kwargs):
    if self._tuned_ok and jax.default_backend() == 'cpu':
      try:
        return self._tuned(*args, **kwargs)
      except jax.errors.JaxRuntimeError as err:
        if OPTION not in str(err):
          raise
        logging.warning('XLA refused %s (%s); %s compiles without it', OPTION,
                        str(err).splitlines()[0], getattr(self, '__name__', 'the program'))
        self._tuned_ok = False
    return self._plain(*args, **kwargs)


def inference_jit(fun: Callable[..., Any] | None = None, **jit_kwargs):
  """Decorator (with or without jit keyword arguments) for eval-mode programs: see InferenceJit."""
  if fun is None:
    return functools.partial(inference_jit, **jit_kwargs)
  return InferenceJit(fun, **jit_kwargs)
