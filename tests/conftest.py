import json
import os
import shutil
import tempfile

# One persistent XLA compilation cache per test session, inherited by every process the tests
# start: the same tiny train step, evaluator and decoder programs are otherwise compiled again by
# each training run the resume, preemption and multi-process tests launch. A cache hit is the same
# executable, so nothing a test compares changes. Set JAX_COMPILATION_CACHE_DIR to keep your own.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='rsicrc_jax_xla_cache_')

# On a GPU, XLA autotunes its convolution and matmul kernels. With autotuning on, an H100 and an
# H200 put 15 of the RN50 fixture's 170 reference gradients (layer2's and layer3's first
# bottlenecks) over the 1e-4 bound, up to 128x; with it off (XLA's default kernels) that test
# passes (README, the accelerator). Parity checks the port's math, not the autotuner's choice of
# kernel, so tests run with it off unless XLA_FLAGS says otherwise. CPUs ignore the flag.
if '--xla_gpu_autotune_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
      filter(None, (os.environ.get('XLA_FLAGS'), '--xla_gpu_autotune_level=0')))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest

# Parity is checked in float32 at full matmul precision (XLA:CPU's default, but be explicit).
jax.config.update('jax_default_matmul_precision', 'highest')

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


@pytest.fixture(scope='session')
def reference():
  """Arrays from the reference PyTorch RSICRC at a tiny size (see tests/fixtures/README.md)."""
  with np.load(os.path.join(FIXTURES, 'rsicrc_reference_tiny.npz')) as d:
    return {k: d[k] for k in d.files}


@pytest.fixture(scope='session')
def reference_json():
  """The fixture's configuration and trainable parameter names."""
  with open(os.path.join(FIXTURES, 'rsicrc_reference_tiny.json')) as f:
    return json.load(f)


def nhwc(x):
  """Reference NCHW images -> the NHWC arrays the Flax model takes."""
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope='session')
def reference_state(reference):
  """The reference state_dict, keyed by its PyTorch names."""
  return {k[len('state/'):]: v for k, v in reference.items() if k.startswith('state/')}


def assert_close(actual, expected, rtol=1e-4, atol=1e-6, name=''):
  """|actual - expected| <= rtol * max|expected| + atol (relative to the tensor's scale)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, f'{name}: shape {actual.shape} != {expected.shape}'
  err = np.abs(actual - expected).max() if actual.size else 0.0
  bound = rtol * np.abs(expected).max() + atol
  assert err <= bound, f'{name}: max abs error {err:.3g} > {bound:.3g}'
