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
