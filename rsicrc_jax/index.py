"""Exact cosine search over embeddings: the one ranking that eval's retrieval metrics, hard-negative
mining and the own-imagery search index share, so the three cannot drift apart.

Embeddings are L2-normalised (float64 here, so the order does not depend on the float32 sums of
one device or another) and ranked by inner product, best first; equal scores keep the lower
index first (a stable sort), which makes every ranking reproducible. This is FAISS's
IndexFlatIP, which the reference uses, computed with one matrix product per block of queries.
"""

from __future__ import annotations

import numpy as np

_QUERY_BLOCK = 1024  # queries ranked per matrix product: bounds memory at (block, keys) floats


def normalize(x: np.ndarray) -> np.ndarray:
  """(N, D) -> rows of unit L2 norm (float64); a zero row stays zero."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be (N, D); got shape {x.shape}')
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _search(queries: np.ndarray, keys: np.ndarray, k: int | None):
  """(scores, indices) of the best min(k, K) keys per query, one matrix product per block."""
  q, keys = normalize(queries), normalize(keys)
  if q.shape[1] != keys.shape[1]:
    raise ValueError(f'queries have {q.shape[1]} dimensions, the keys {keys.shape[1]}')
  k = keys.shape[0] if k is None else min(int(k), keys.shape[0])
  ids = np.empty((q.shape[0], k), np.int64)
  scores = np.empty((q.shape[0], k), np.float64)
  for i in range(0, q.shape[0], _QUERY_BLOCK):
    block = q[i:i + _QUERY_BLOCK] @ keys.T
    ids[i:i + _QUERY_BLOCK] = np.argsort(-block, axis=1, kind='stable')[:, :k]
    scores[i:i + _QUERY_BLOCK] = np.take_along_axis(block, ids[i:i + _QUERY_BLOCK], axis=1)
  return scores, ids


def rank(queries: np.ndarray, keys: np.ndarray, k: int | None = None) -> np.ndarray:
  """(Q, D), (K, D) -> (Q, min(k, K)) int64 key indices, best first (all K when k is None)."""
  return _search(queries, keys, k)[1]


class EmbeddingIndex:
  """Keys (one embedding each) searched exactly by cosine; `search` returns scores and indices
  in rank order. Keys are stored normalised, as FAISS's IndexFlatIP holds them after the
  reference normalises them."""

  def __init__(self, dim: int):
    self.dim = int(dim)
    self._keys = np.zeros((0, self.dim), np.float64)

  def __len__(self) -> int:
    return self._keys.shape[0]

  @property
  def keys(self) -> np.ndarray:
    return self._keys

  def add(self, embeddings: np.ndarray) -> None:
    emb = normalize(embeddings)
    if emb.shape[1] != self.dim:
      raise ValueError(f'the index holds {self.dim}-dimensional embeddings; got {emb.shape[1]}')
    self._keys = np.concatenate([self._keys, emb])

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (scores (Q, k'), indices (Q, k')), k' = min(k, len(self)), best first."""
    return _search(queries, self._keys, k)
