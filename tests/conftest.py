import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Parity is checked in float32 at full matmul precision (XLA:CPU's default, but be explicit).
jax.config.update('jax_default_matmul_precision', 'highest')

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


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
