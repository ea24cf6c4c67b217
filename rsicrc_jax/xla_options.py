"""XLA compiler options for the CPU: one set for the eval-mode programs (embedding, captioning,
the val loss), one for the training step.

Inference. XLA:CPU's default YNNPACK fusion hands whole chains of a bottleneck stage to YNNPACK
as one subgraph (1x1 matmuls, BatchNorm, ReLU, 3x3 convolutions, average pools: one `ynn_fusion`
per stage). In an eval-mode forward pass such subgraphs run far slower than the matmuls given to
YNNPACK one at a time, with XLA's own loops and convolutions between them: the levir RN50 tower
on 64 pictures took 5.4-7.6 s against 4.1-4.5 s, and KV-cached captioning of the levir model
0.38-0.44 s against 0.33-0.36 s per pair (2-core CPU, jax 0.10.2; benchmarks/decoding.py and
README). In the training step the default is the faster one (levir: 4.2-4.7 s against 5.2-6.3 s
per step; demo: 0.24-0.31 s against 0.32-0.40 s), so only inference programs take the option.

Training. The step donates its state, so each parameter's new value goes into the buffer of its
old one. XLA:CPU's copy insertion cannot tell, without its region analysis, that every read of
the old value (forward, backward) comes before the optimizer's write, and copies each donated
parameter first: 184 copies of 313M floats a step for the levir config, about 0.1 s of
memory-bound work that held up the AdamW updates at the end of the step. With the analysis on
there are none, and the levir step ran 3.96 against 4.37 s (and 4.02 against 4.29 s with the
order swapped; 6 alternating rounds each, same losses), with 4.63 against 4.85 GB of buffers.
The demo's 2.9M parameters make its copies negligible (no change in 12 rounds either way), and
the eval-mode programs donate nothing (captioning no different).

Elsewhere (GPU, TPU) nothing changes: the options are given only when the default backend is
the CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from absl import logging
import jax

OPTION = 'xla_cpu_experimental_ynn_fusion_type'
INFERENCE_CPU = {OPTION: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
TRAIN_CPU = {'xla_cpu_copy_insertion_use_region_analysis': True}


class CpuTunedJit:
  """`jax.jit(fun, **jit_kwargs)` that compiles with the compiler options `cpu_options` when the
  default backend is the CPU. An XLA that no longer knows an option gets the plain program, with
  one warning. `__wrapped__` is `fun` (e.g. for a FLOP count of the uncompiled function)."""

  def __init__(self, fun: Callable[..., Any], cpu_options: dict[str, Any], **jit_kwargs):
    functools.update_wrapper(self, fun)
    self.cpu_options = dict(cpu_options)
    self._plain = jax.jit(fun, **jit_kwargs)
    self._tuned = jax.jit(fun, compiler_options=self.cpu_options, **jit_kwargs)
    self._tuned_ok = bool(self.cpu_options)

  def _use_tuned(self) -> bool:
    return self._tuned_ok and jax.default_backend() == 'cpu'

  def __call__(self, *args, **kwargs):
    if self._use_tuned():
      try:
        return self._tuned(*args, **kwargs)
      except jax.errors.JaxRuntimeError as err:
        if not any(name in str(err) for name in self.cpu_options):
          raise
        logging.warning('XLA refused %s (%s); %s compiles without it',
                        ', '.join(self.cpu_options), str(err).splitlines()[0],
                        getattr(self, '__name__', 'the program'))
        self._tuned_ok = False
    return self._plain(*args, **kwargs)

  def lower(self, *args, **kwargs) -> jax.stages.Lowered:
    """The lowering that a call with these arguments compiles (benchmarks time the same
    program as training)."""
    return (self._tuned if self._use_tuned() else self._plain).lower(*args, **kwargs)


def inference_jit(fun: Callable[..., Any] | None = None, **jit_kwargs):
  """Decorator (with or without jit keyword arguments) for eval-mode programs: CpuTunedJit with
  INFERENCE_CPU."""
  if fun is None:
    return functools.partial(inference_jit, **jit_kwargs)
  return CpuTunedJit(fun, INFERENCE_CPU, **jit_kwargs)


def train_jit(fun: Callable[..., Any], **jit_kwargs) -> CpuTunedJit:
  """CpuTunedJit with TRAIN_CPU, for the training step."""
  return CpuTunedJit(fun, TRAIN_CPU, **jit_kwargs)
