"""The losses against direct transcriptions of their formulas on hand-built batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsicrc_jax import losses


def fna_loss_transcribed(vis, txt, flags, false_neg, temperature, fne=True, fna=True, top_k=-1):
  """SPEC section 6 / the reference's index-tuple algorithm, written as plain loops."""
  n = len(flags)
  v = vis / np.linalg.norm(vis, axis=1, keepdims=True)
  t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  s = (v @ t.T) / temperature
  pos = [[flags[i] == flags[j] for j in range(n)] for i in range(n)]
  neg = [[not pos[i][j] for j in range(n)] for i in range(n)]
  for i in range(n):
    for j in range(n):
      if false_neg[i][j]:
        if fne:
          neg[i][j] = False
        if fna:
          pos[i][j] = True
    pos[i][i], neg[i][i] = True, False
  neg_pairs = [(i, j) for i in range(n) for j in range(n) if neg[i][j]]
  if top_k > 0:
    neg_pairs = sorted(neg_pairs, key=lambda p: -s[p])[:top_k]
  terms = []
  for a in range(n):
    for p in range(n):
      if pos[a][p]:
        denom = math.exp(s[a, p]) + sum(math.exp(s[a, m]) for (x, m) in neg_pairs if x == a)
        terms.append(-math.log(math.exp(s[a, p]) / denom))
  return sum(terms) / len(terms), len(terms)


@pytest.fixture
def batch():
  """Two no-change items (flag -1), two captions of pair 7, and items 2 and 5 (pairs 5 and 9)
  whose captions are the same sentence: a false negative across different pairs."""
  rng = np.random.default_rng(0)
  vis = rng.normal(size=(6, 8))
  txt = vis + 0.8 * rng.normal(size=(6, 8))
  flags = np.array([-1, -1, 5, 7, 7, 9])
  caption_ids = np.array([100, 101, 200, 300, 301, 200])
  return vis, txt, flags, caption_ids


@pytest.mark.parametrize('fne,fna,top_k', [(True, True, -1), (True, False, -1), (False, False, -1),
                                           (True, True, 3), (False, False, 5)])
def test_fna_matches_transcription(batch, fne, fna, top_k):
  vis, txt, flags, caption_ids = batch
  fn = np.asarray(losses.false_negative_mask(caption_ids=jnp.asarray(caption_ids)))
  # Caption-id equality marks exactly the diagonal and the (2, 5) pair.
  assert sorted(zip(*np.nonzero(fn & ~np.eye(6, dtype=bool)))) == [(2, 5), (5, 2)]
  expected, num_pos = fna_loss_transcribed(vis, txt, flags, fn, 0.1, fne, fna, top_k)
  loss, got_pos = losses.contrastive_loss(jnp.asarray(vis, jnp.float32),
                                          jnp.asarray(txt, jnp.float32), jnp.asarray(flags),
                                          jnp.asarray(fn), temperature=0.1, fne=fne, fna=fna,
                                          top_k=top_k)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert int(got_pos) == num_pos


def test_positive_counts_by_hand(batch):
  vis, txt, flags, caption_ids = batch
  fn = losses.false_negative_mask(caption_ids=jnp.asarray(caption_ids))
  # Diagonal 6, no-change pair (0,1),(1,0), pair 7 (3,4),(4,3) -> 10; FNA adds (2,5),(5,2).
  _, with_fna = losses.contrastive_loss(vis, txt, jnp.asarray(flags), fn, fna=True)
  _, without = losses.contrastive_loss(vis, txt, jnp.asarray(flags), fn, fna=False)
  assert (int(with_fna), int(without)) == (12, 10)


def test_two_items_closed_form():
  vis = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  txt = jnp.asarray([[1.0, 1.0], [0.0, 1.0]])
  c = 1 / math.sqrt(2)  # cos(v0, t0) = cos(v0, ... ) etc.
  s = np.array([[c, 0.0], [c, 1.0]]) / 0.5
  expected = 0.5 * (-math.log(math.exp(s[0, 0]) / (math.exp(s[0, 0]) + math.exp(s[0, 1])))
                    - math.log(math.exp(s[1, 1]) / (math.exp(s[1, 1]) + math.exp(s[1, 0]))))
  loss, _ = losses.contrastive_loss(vis, txt, jnp.asarray([1, 2]), temperature=0.5)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_no_negatives_gives_zero_loss_and_finite_gradients():
  vis, txt = jnp.ones((3, 4)), jnp.arange(12.0).reshape(3, 4)
  flags = jnp.asarray([-1, -1, -1])  # all no-change: everything is positive
  loss, grad = jax.value_and_grad(
      lambda v: losses.contrastive_loss(v, txt, flags)[0])(vis)
  assert float(loss) == 0.0 and np.isfinite(np.asarray(grad)).all()


def test_false_negative_threshold_and_tolerance():
  e = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
  e = e.at[1].set(e[1] * (1 - 3e-7))  # "the same" sentence, off by float rounding
  strict = np.asarray(losses.false_negative_mask(e, threshold=1.0))
  robust = np.asarray(losses.false_negative_mask(e, threshold=1.0, tolerance=1e-6))
  assert not strict[0, 1] and robust[0, 1] and not robust[0, 2]
  both = np.asarray(losses.false_negative_mask(e, jnp.asarray([1, 2, 1]), threshold=1.0))
  assert both[0, 2] and both[2, 0]


def test_caption_loss_ignores_pad_targets():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 5))
  tokens = jnp.asarray([[1, 4, 3, 0], [1, 2, 4, 3]])
  pad = tokens == 0
  logp = jax.nn.log_softmax(logits)
  targets = [(0, 0, 4), (0, 1, 3), (1, 0, 2), (1, 1, 4), (1, 2, 3)]
  expected = -np.mean([float(logp[b, t, y]) for b, t, y in targets])
  np.testing.assert_allclose(float(losses.caption_loss(logits, tokens, pad)), expected, rtol=1e-6)
