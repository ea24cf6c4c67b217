"""Hard-negative mining (SPEC section 11; the reference's `--hd n`).

At the start of training and after every epoch the model, in eval mode, embeds every train pair
(one visual embedding per pair) and every train caption item (its text embedding). For each item,
its text is searched against the pairs; the first n pairs in rank order whose flag differs from
the item's are its hard negatives, each contributing that pair's first caption item. A batch of
B items then carries their B*n mined items too, as ordinary items of both losses.

The reference searches the top n*m pairs for m = 4, doubling m until n negatives are found or
n*m reaches the number of pairs (and mines nothing when 4n already does). Rankings are nested,
so that loop returns the first n qualifying pairs within the top `search_depth(n, pairs)`: one
search per item (`mine`; `tests/test_mining.py` checks it against a transcription of the loop).

Quirk fixed (SPEC): the reference maps pair x to item 5x, assuming every pair keeps five
captions; here a pair maps to its first kept item.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rsicrc_jax import index as emb_index

NONE = -1  # a table slot with no negative (the batch carries an invalid item there)


def search_depth(n: int, num_pairs: int) -> int:
  """How deep the reference's last search goes: n*m for the largest m in 4, 8, 16, ... with
  n*m < num_pairs; 0 when 4n >= num_pairs (its loop never runs)."""
  depth, m = 0, 4
  while n * m < num_pairs:
    depth, m = n * m, m * 2
  return depth


@dataclasses.dataclass(frozen=True)
class TrainEmbeddings:
  """The train split as mining sees it. Pairs are those with at least one kept caption item."""
  pair_visual: np.ndarray  # (P, D) one visual embedding per pair
  pair_flag: np.ndarray  # (P,) the pair's flag (-1: no change, else its imgid)
  pair_first_item: np.ndarray  # (P,) row of the pair's first kept item in the item table
  item_text: np.ndarray  # (N, D) text embedding of every train item
  item_flag: np.ndarray  # (N,) the item's flag (its pair's)


def mine(emb: TrainEmbeddings, n: int) -> np.ndarray:
  """(N, n) int32 item rows of each item's hard negatives in rank order, NONE where fewer than n
  were found."""
  num_items, num_pairs = len(emb.item_text), len(emb.pair_visual)
  table = np.full((num_items, n), NONE, np.int32)
  depth = search_depth(n, num_pairs)
  if depth == 0 or n == 0:
    return table
  top = emb_index.rank(emb.item_text, emb.pair_visual, depth)  # (N, depth) pair positions
  qualifies = emb.pair_flag[top] != emb.item_flag[:, None]
  # The first n qualifying ranks of each row, in order.
  order = np.argsort(~qualifies, axis=1, kind='stable')[:, :n]
  found = np.take_along_axis(qualifies, order, axis=1)
  pairs = np.take_along_axis(top, order, axis=1)
  table[found] = emb.pair_first_item[pairs[found]]
  return table


def train_embeddings(run: dict, items: np.ndarray) -> TrainEmbeddings:
  """From `evaluators.run_model` over the train split (one row per pair: 'pair', 'visual',
  'flag', 'all_text' (P, captions, D)) and the train item table `items` (N, 2) of (pair,
  caption) rows, as the train pipeline reads them."""
  position = {int(p): i for i, p in enumerate(run['pair'])}
  missing = sorted({int(p) for p in items[:, 0]} - set(position))
  if missing:
    raise ValueError(f'the embedded train split lacks pairs {missing[:5]} that train items use')
  pos = np.asarray([position[int(p)] for p in items[:, 0]], np.int64)
  first = np.full(len(run['pair']), NONE, np.int64)
  pairs_with_items, first_row = np.unique(pos, return_index=True)  # first occurrence per pair
  first[pairs_with_items] = first_row
  keep = first >= 0  # pairs without a kept item cannot be mined (no item to contribute)
  return TrainEmbeddings(
      pair_visual=np.asarray(run['visual'])[keep], pair_flag=np.asarray(run['flag'])[keep],
      pair_first_item=first[keep],
      item_text=np.asarray(run['all_text'])[pos, items[:, 1]],
      item_flag=np.asarray(run['flag'])[pos])
