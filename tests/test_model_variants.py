"""Non-default model options: they build, run, and survive export -> import unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import reference_tiny
from rsicrc_jax import weights
from rsicrc_jax.models import RSICRC, attention, model_skeleton


def _inputs():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  img_a = jax.random.normal(k1, (2, 96, 96, 3))
  img_b = jax.random.normal(k2, (2, 96, 96, 3))
  tokens = jnp.asarray([[1, 5, 6, 7, 3, 0, 0, 0], [1, 9, 3, 0, 0, 0, 0, 0]])
  return img_a, img_b, tokens, tokens == 0


_forward = nnx.jit(lambda m, *a: m(*a))


@pytest.mark.parametrize('overrides', [
    dict(prenorm=True, learnable=True),
    dict(tie_embeddings=False, value_from_key=False),
])
def test_variant_round_trips_through_pytorch_names(overrides):
  config = reference_tiny.get_config()
  config.model.update(overrides)
  model = RSICRC(config.model, rngs=nnx.Rngs(1))
  exported = weights.to_torch_state_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  if not overrides.get('value_from_key', True):
    assert 'encoder.encoder_trans.selftrans.0.0.att.to_v.weight' in exported
  if not overrides.get('tie_embeddings', True):
    assert 'decoder.lm_head.weight' in exported
  clone = model_skeleton(config.model)
  weights.import_rsicrc(clone, exported)
  a, b = _forward(model, *_inputs()), _forward(clone, *_inputs())
  for name in ('logits', 'visual_emb', 'text_emb', 'cross_attention'):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))


def test_real_value_projection_changes_the_output():
  config = reference_tiny.get_config()
  model = RSICRC(config.model, rngs=nnx.Rngs(1))
  state = weights.to_torch_state_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  config.model.value_from_key = False
  clean = model_skeleton(config.model)
  with pytest.raises(weights.CheckpointError, match="missing key '.*att.to_v.weight'"):
    weights.import_rsicrc(clean, state)
  for key in [k for k in state if k.endswith('att.to_k.weight')]:
    state[key.replace('to_k', 'to_v')] = state[key]  # to_v = to_k reproduces the quirk exactly
  weights.import_rsicrc(clean, state)
  np.testing.assert_allclose(np.asarray(_forward(clean, *_inputs()).visual_emb),
                             np.asarray(_forward(model, *_inputs()).visual_emb), atol=1e-5)


def test_bfloat16_compute_tracks_float32():
  config = reference_tiny.get_config()
  model = RSICRC(config.model, rngs=nnx.Rngs(1))
  config.model.dtype = 'bfloat16'
  half = model_skeleton(config.model)
  nnx.update(half, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  full, low = _forward(model, *_inputs()), _forward(half, *_inputs())
  assert low.logits.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(half, nnx.Param)))
  cos = lambda x, y: float(jnp.sum(x * y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y)))
  assert cos(low.visual_emb.astype(jnp.float32).ravel(), full.visual_emb.ravel()) > 0.99
  assert cos(low.logits.astype(jnp.float32).ravel(), full.logits.ravel()) > 0.99


def test_fused_attention_equals_the_weights_path():
  """Without weights and without active dropout (eval mode) attention runs through
  jax.nn.dot_product_attention; it equals the explicit softmax path, masks included, in float32
  and (to bfloat16 rounding) in bfloat16. With dropout active the explicit path runs."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 7, 4, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 1, 5, 7)) < 0.6).at[..., 0].set(True)
  explicit, weights = attention.dot_product_attention(q, k, v, mask, 0.35)
  fused, none = attention.dot_product_attention(q, k, v, mask, 0.35, need_weights=False)
  assert none is None and weights.shape == (2, 4, 5, 7)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit), rtol=1e-5, atol=1e-6)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  fused_half, _ = attention.dot_product_attention(*half, mask, 0.35, need_weights=False)
  assert fused_half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(fused_half, np.float32), np.asarray(explicit), atol=0.05)

  dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
  dropped, kept_weights = attention.dot_product_attention(q, k, v, mask, 0.35, dropout,
                                                          need_weights=False)
  assert kept_weights is not None and not np.allclose(np.asarray(dropped), np.asarray(explicit))
  dropout.deterministic = True
  out, none = attention.dot_product_attention(q, k, v, mask, 0.35, dropout, need_weights=False)
  assert none is None
  np.testing.assert_allclose(np.asarray(out), np.asarray(explicit), rtol=1e-5, atol=1e-6)
