"""Hard-negative mining against a plain-loop transcription of SPEC section 11 (the reference's
Batcher.mine_negatives), and the shared embedding index against brute force."""

import numpy as np
import pytest

from rsicrc_jax import index as emb_index
from rsicrc_jax import mining


def reference_loop(emb: mining.TrainEmbeddings, n: int) -> np.ndarray:
  """SPEC section 11 as the reference writes it, one item at a time: search the top n*m pairs
  (m = 4, doubling while fewer than n were found and n*m < the number of pairs), keep pairs
  whose flag differs from the item's, take the first n; each gives its first kept item."""
  pairs = len(emb.pair_visual)
  unit = lambda x: x / np.linalg.norm(x)
  table = np.full((len(emb.item_text), n), -1, np.int32)
  for item in range(len(emb.item_text)):
    q = unit(np.asarray(emb.item_text[item], np.float64))
    scores = [float(q @ unit(np.asarray(v, np.float64))) for v in emb.pair_visual]
    ranked = sorted(range(pairs), key=lambda x: (-scores[x], x))
    negatives, m = [], 4
    while len(negatives) < n and n * m < pairs:
      k = n * m
      negatives = [emb.pair_first_item[x] for x in ranked[:k]
                   if emb.pair_flag[x] != emb.item_flag[item]][:n]
      m *= 2
    table[item, :len(negatives)] = negatives
  return table


def random_embeddings(rs, pairs: int, captions: int, changed: float, dim: int = 6):
  """A train split of `pairs` pairs with `captions` items each; flags as the pipeline makes
  them (-1: no change, else the pair's id), so most pairs share the no-change flag."""
  flag = np.where(rs.random(pairs) < changed, np.arange(pairs) + 100, -1)
  items = np.repeat(np.arange(pairs), captions)
  return mining.TrainEmbeddings(
      pair_visual=rs.normal(size=(pairs, dim)).astype(np.float32), pair_flag=flag,
      pair_first_item=np.arange(pairs) * captions,
      item_text=rs.normal(size=(len(items), dim)).astype(np.float32), item_flag=flag[items])


@pytest.mark.parametrize('pairs,captions,changed,n', [
    (40, 2, 0.5, 1), (40, 1, 0.1, 2), (40, 3, 0.05, 3),  # few changed: the search deepens
    (9, 2, 0.3, 1), (9, 1, 0.9, 2),  # 4n < 9 <= 8n: one search, maybe short
    (8, 2, 0.5, 2),  # 4n == pairs: the loop never runs, nothing is mined
    (3, 2, 0.5, 1), (25, 1, 0.0, 2), (25, 1, 1.0, 4)])
def test_mining_equals_the_reference_loop(pairs, captions, changed, n):
  rs = np.random.default_rng(pairs * 100 + n)
  emb = random_embeddings(rs, pairs, captions, changed)
  want = reference_loop(emb, n)
  got = mining.mine(emb, n)
  np.testing.assert_array_equal(got, want)
  if 4 * n >= pairs:
    assert (got == mining.NONE).all()


def test_the_search_deepens_until_enough_negatives_are_found():
  # One changed pair among 40; its items' nearest pairs are all no-change (flag -1) except the
  # pair itself. A no-change item must skip every no-change pair: only one pair qualifies.
  rs = np.random.default_rng(0)
  emb = random_embeddings(rs, 40, 1, 0.0)
  flag = emb.pair_flag.copy()
  flag[17] = 117
  emb = mining.TrainEmbeddings(emb.pair_visual, flag, emb.pair_first_item, emb.item_text,
                               flag[np.arange(40)])
  table = mining.mine(emb, 2)
  np.testing.assert_array_equal(table, reference_loop(emb, 2))
  unchanged = np.flatnonzero(flag == -1)
  # Pair 17 is the only negative of a no-change item, whatever its rank, once the search is
  # deep enough: 8, 16, 32 > rank of 17 or not.
  ranks = emb_index.rank(emb.item_text[unchanged], emb.pair_visual)
  depth = mining.search_depth(2, 40)
  assert depth == 32
  reachable = (ranks[:, :depth] == 17).any(axis=1)
  assert (table[unchanged[reachable], 0] == 17).all()
  assert (table[unchanged[~reachable]] == mining.NONE).all()
  assert (table[unchanged, 1] == mining.NONE).all()
  # The changed pair's item: every other pair differs in flag, so its two nearest others.
  assert 17 not in table[17] and (table[17] >= 0).all()


@pytest.mark.parametrize('n,pairs,depth', [(1, 4, 0), (1, 5, 4), (1, 9, 8), (2, 40, 32),
                                           (3, 12, 0), (3, 13, 12), (1, 6815, 4096)])
def test_search_depth(n, pairs, depth):
  assert mining.search_depth(n, pairs) == depth


def test_pairs_map_to_their_first_kept_item():
  # The reference maps pair x to item 5x; with over-long captions dropped a pair keeps fewer,
  # and pair 1 here keeps none (it cannot be mined: no item to contribute).
  items = np.array([[0, 0], [0, 2], [2, 1], [2, 3], [3, 4]], np.int32)
  run = {'pair': np.array([0, 1, 2, 3]), 'visual': np.eye(4, 3, dtype=np.float32),
         'flag': np.array([-1, 5, 7, -1]),
         'all_text': np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)}
  emb = mining.train_embeddings(run, items)
  np.testing.assert_array_equal(emb.pair_first_item, [0, 2, 4])
  np.testing.assert_array_equal(emb.pair_flag, [-1, 7, -1])
  np.testing.assert_array_equal(emb.item_flag, [-1, -1, 7, 7, -1])
  np.testing.assert_array_equal(emb.item_text, run['all_text'][[0, 0, 2, 2, 3], [0, 2, 1, 3, 4]])
  with pytest.raises(ValueError, match=r'lacks pairs \[9\]'):
    mining.train_embeddings(run, np.array([[9, 0]], np.int32))


def test_embedding_index_is_exact_cosine_search():
  rs = np.random.default_rng(1)
  keys, queries = rs.normal(size=(300, 16)), rs.normal(size=(70, 16))
  idx = emb_index.EmbeddingIndex(16)
  idx.add(keys[:100] * 3.0)  # scale does not matter: cosine
  idx.add(keys[100:])
  scores, ids = idx.search(queries, 7)
  cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
      keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1)[:, :7])
  np.testing.assert_allclose(scores, np.take_along_axis(cos, ids, axis=1), rtol=1e-12)
  # Equal scores keep the lower index first; more than the index holds returns all of it.
  dup = emb_index.rank(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]))
  np.testing.assert_array_equal(dup, [[0, 2, 1]])
  assert idx.search(queries[:1], 1000)[1].shape == (1, 300)
  with pytest.raises(ValueError, match='16-dimensional'):
    idx.add(np.ones((1, 3)))
