"""Cosine search over embeddings: the one ranking that eval's retrieval metrics, hard-negative
mining and the own-imagery search (`rsicrc_jax.predict`) share, so the three cannot drift apart.

Exact search (`rank`, `EmbeddingIndex`): embeddings are L2-normalised (float64 for metrics and
mining, so the order does not depend on the float32 sums of one device or another) and ranked by
inner product, best first; equal scores keep the lower index first, which makes every ranking
reproducible. This is FAISS's IndexFlatIP, which the reference uses, computed with one matrix
product per block of queries. `ApproximateIndex` is FAISS's inverted file, for archives of
millions of pairs; `TileIndex` is the own-imagery archive on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid

import numpy as np

_QUERY_BLOCK = 1024  # queries ranked per matrix product: bounds memory at (block, keys) floats


def normalize(x: np.ndarray, dtype=np.float64) -> np.ndarray:
  """(N, D) -> rows of unit L2 norm (`dtype`); a zero row stays zero."""
  x = np.asarray(x, dtype)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be (N, D); got shape {x.shape}')
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12).astype(dtype)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """(Q, K) scores -> (Q, k) indices of the k best, best first, equal scores by lower index:
  what a stable sort of all K gives, at the cost of a partition when k is small."""
  n = scores.shape[1]
  if k * 8 >= n:
    return np.argsort(-scores, axis=1, kind='stable')[:, :k]
  kth = np.partition(scores, n - k, axis=1)[:, n - k]  # the k-th best score per query
  out = np.empty((scores.shape[0], k), np.int64)
  for q, (row, v) in enumerate(zip(scores, kth)):
    above = np.flatnonzero(row > v)
    cand = np.concatenate([above, np.flatnonzero(row == v)[:k - len(above)]])
    out[q] = cand[np.lexsort((cand, -row[cand]))]
  return out


def _search(queries: np.ndarray, keys: np.ndarray, k: int | None, dtype=np.float64):
  """(scores, indices) of the best min(k, K) keys per query, one matrix product per block."""
  q = normalize(queries, dtype)
  if q.shape[1] != keys.shape[1]:
    raise ValueError(f'queries have {q.shape[1]} dimensions, the keys {keys.shape[1]}')
  k = keys.shape[0] if k is None else min(int(k), keys.shape[0])
  ids = np.empty((q.shape[0], k), np.int64)
  scores = np.empty((q.shape[0], k), dtype)
  for i in range(0, q.shape[0], _QUERY_BLOCK):
    block = q[i:i + _QUERY_BLOCK] @ keys.T
    ids[i:i + _QUERY_BLOCK] = _top_k(block, k)
    scores[i:i + _QUERY_BLOCK] = np.take_along_axis(block, ids[i:i + _QUERY_BLOCK], axis=1)
  return scores, ids


def rank(queries: np.ndarray, keys: np.ndarray, k: int | None = None) -> np.ndarray:
  """(Q, D), (K, D) -> (Q, min(k, K)) int64 key indices, best first (all K when k is None)."""
  return _search(queries, normalize(keys), k)[1]


class EmbeddingIndex:
  """Keys (one embedding each) searched exactly by cosine; `search` returns scores and indices
  in rank order. Keys are stored normalised, as FAISS's IndexFlatIP holds them after the
  reference normalises them: in float64 by default (metrics and mining, reproducible to the
  last bit), or float32 for an archive (`rsicrc_jax.predict`), half the memory."""

  def __init__(self, dim: int, dtype=np.float64):
    self.dim, self.dtype = int(dim), np.dtype(dtype)
    self._keys = np.zeros((0, self.dim), self.dtype)

  def __len__(self) -> int:
    return self._keys.shape[0]

  @property
  def keys(self) -> np.ndarray:
    return self._keys

  def add(self, embeddings: np.ndarray) -> None:
    emb = normalize(embeddings, self.dtype)
    if emb.shape[1] != self.dim:
      raise ValueError(f'the index holds {self.dim}-dimensional embeddings; got {emb.shape[1]}')
    self._keys = np.concatenate([self._keys, emb])

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (scores (Q, k'), indices (Q, k')), k' = min(k, len(self)), best first."""
    return _search(queries, self._keys, k, self.dtype)


class ApproximateIndex:
  """Approximate cosine search for archives of millions of keys: FAISS's inverted file
  (IndexIVFFlat, inner product on normalised float32 keys). `nlist` clusters are learned from
  the keys; a query visits the `nprobe` nearest clusters (default: an eighth of them, at least
  32; recall@10 0.96 at 1M keys in benchmarks/search.py). Needs the `faiss` extra
  (pip install -e ".[faiss]")."""

  def __init__(self, keys: np.ndarray, *, nlist: int = 0, nprobe: int = 0, seed: int = 0):
    faiss = _faiss()
    keys = np.ascontiguousarray(normalize(keys, np.float32))
    n, dim = keys.shape
    # sqrt(n) lists, each learned from ~64 keys: k-means over 1M 512-d keys stays ~10 s on 2 cores.
    self.nlist = int(nlist or max(1, min(int(np.sqrt(n)), n // 39)))
    quantizer = faiss.IndexFlatIP(dim)
    self._index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
    rs = np.random.default_rng(seed)
    sample = (keys if n <= 64 * self.nlist
              else keys[rs.choice(n, 64 * self.nlist, replace=False)])
    self._index.cp.seed = seed
    self._index.train(sample)
    self._index.add(keys)
    self.nprobe = nprobe

  def __len__(self) -> int:
    return self._index.ntotal

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (scores, indices) (Q, min(k, len)), best first; approximate: a key may be missed."""
    self._index.nprobe = min(self.nprobe or max(32, self.nlist // 8), self.nlist)
    q = np.ascontiguousarray(normalize(queries, np.float32))
    scores, ids = self._index.search(q, min(int(k), len(self)))
    return scores, ids

  def save(self, path: str) -> None:
    _faiss().write_index(self._index, path)

  @classmethod
  def load(cls, path: str, nprobe: int = 0) -> 'ApproximateIndex':
    self = cls.__new__(cls)
    self._index = _faiss().read_index(path)
    self.nlist, self.nprobe = self._index.nlist, nprobe
    return self


def _faiss():
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError('approximate search needs FAISS: pip install -e ".[faiss]" '
                      '(the faiss-cpu package)') from err
  return faiss


# ----------------------------------------------------------------------------------------------
# The own-imagery archive on disk (`python -m rsicrc_jax.predict index`).

INDEX_FORMAT = 1
MANIFEST = 'index.json'
SEGMENTS = 'segments'


class IndexDirError(ValueError):
  """An index directory that cannot be used as asked; the message names the directory."""


def _tmp_prefix() -> str:
  """Temporary files carry their writer's host and process, so that a later run can tell a
  leftover of a killed writer from another process's write in flight."""
  return f'.tmp-{socket.gethostname()}-{os.getpid()}-'


def _write_atomic(path: str, write) -> None:
  """write(file object) into a temporary file beside `path`, synced, then renamed over it: a
  reader sees the old file or the new one, never half of one."""
  tmp = os.path.join(os.path.dirname(path),
                     f'{_tmp_prefix()}{uuid.uuid4().hex}-{os.path.basename(path)}')
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class TileIndex:
  """A directory of tile-pair embeddings and their metadata, searched with `EmbeddingIndex`
  (float32 keys) or, for very large archives, `ApproximateIndex`.

    IDX/index.json              format, embedding size, the model that made the embeddings
                                (checkpoint path and a fingerprint of its weights), vocabulary
    IDX/segments/<name>.npz     embeddings (n, D) float32, tile_ids (n,), records (JSON lines)

  Every write is one new segment, written whole and then renamed into place, so the index is
  readable at every moment and a killed `index` run loses at most the tiles of the segment in
  flight, which the next run adds (tiles already present are skipped). Several processes may
  add to one index at once: each writes its own segments."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    manifest = os.path.join(self.path, MANIFEST)
    if not os.path.isfile(manifest):
      what = ('does not exist' if not os.path.exists(self.path) else
              f'is not an index (no {MANIFEST}); build one with python -m rsicrc_jax.predict index')
      raise IndexDirError(f'{self.path} {what}')
    try:
      with open(manifest) as f:
        self.manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
      raise IndexDirError(f'{manifest}: unreadable ({err})') from err
    if self.manifest.get('format') != INDEX_FORMAT:
      raise IndexDirError(f'{manifest}: format {self.manifest.get("format")!r}, this version reads '
                        f'format {INDEX_FORMAT}')
    self.dim = int(self.manifest['embedding_dim'])
    self._cache = self._exact = None

  @classmethod
  def open_or_create(cls, path: str, *, embedding_dim: int, model: dict,
                     vocab: dict[str, int]) -> 'TileIndex':
    """The index at `path`, created if absent. An existing one must have been built by the same
    model (same weights fingerprint and embedding size)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
      idx = cls(path)
      theirs = idx.manifest['model']
      if idx.dim != embedding_dim or theirs['fingerprint'] != model['fingerprint']:
        raise IndexDirError(
            f'{path} was built by another model: {theirs["checkpoint"]} (weights '
            f'{theirs["fingerprint"][:12]}, {idx.dim}-d embeddings), not {model["checkpoint"]} '
            f'(weights {model["fingerprint"][:12]}, {embedding_dim}-d); use a new --index '
            'directory for this model')
      return idx
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
      raise IndexDirError(f'{path} exists and is not an index (no {MANIFEST}); give a new or '
                        'empty directory')
    os.makedirs(os.path.join(path, SEGMENTS), exist_ok=True)
    manifest = {'format': INDEX_FORMAT, 'embedding_dim': int(embedding_dim), 'model': model,
                'vocab': vocab}
    # Several processes may create it at once: each writes the same content.
    _write_atomic(os.path.join(path, MANIFEST),
                  lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return cls(path)

  @property
  def vocab(self) -> dict[str, int]:
    return self.manifest['vocab']

  def remove_leftovers(self) -> list[str]:
    """Deletes the temporary files of writers on this host that no longer run (a killed
    `index`); those of live processes, or of other hosts sharing the directory, stay."""
    host, removed = socket.gethostname(), []
    d = os.path.join(self.path, SEGMENTS)
    for name in os.listdir(d):
      parts = name.split('-')
      if not name.startswith('.tmp-') or len(parts) < 4 or parts[1] != host:
        continue
      try:
        os.kill(int(parts[2]), 0)
        continue  # still running
      except ProcessLookupError:
        pass
      except (ValueError, PermissionError):
        continue
      os.remove(os.path.join(d, name))
      removed.append(name)
    return removed

  def segments(self) -> list[str]:
    d = os.path.join(self.path, SEGMENTS)
    return sorted(n for n in os.listdir(d) if n.endswith('.npz') and not n.startswith('.'))

  def add(self, records: list[dict], embeddings: np.ndarray, *, writer: str = 'p0') -> str:
    """Stores one segment: records[i] (JSON-able, with 'tile_id') describes embeddings[i]."""
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2 or emb.shape != (len(records), self.dim):
      raise ValueError(f'expected ({len(records)}, {self.dim}) embeddings, got {emb.shape}')
    name = f'{time.time_ns():020d}-{writer}-{uuid.uuid4().hex[:8]}.npz'
    lines = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records).encode()
    ids = np.asarray([r['tile_id'] for r in records], dtype=str)
    _write_atomic(os.path.join(self.path, SEGMENTS, name), lambda f: np.savez(
        f, embeddings=emb, tile_ids=ids, records=np.frombuffer(lines, np.uint8)))
    self._cache = None
    return name

  def _load(self):
    """(tile_ids, record lines, embeddings) over all segments, in segment order; a tile stored
    twice (two processes given overlapping work) counts once, its first copy."""
    names = self.segments()
    if self._cache is not None and self._cache[0] == names:
      return self._cache[1]
    ids, lines, embs = [], [], []
    for name in names:
      path = os.path.join(self.path, SEGMENTS, name)
      try:
        with np.load(path) as z:
          embs.append(z['embeddings'])
          ids.append(z['tile_ids'])
          lines += bytes(z['records']).decode().splitlines()
      except (OSError, ValueError, KeyError) as err:
        raise IndexDirError(f'{path}: unreadable segment ({err})') from err
    ids = np.concatenate(ids) if ids else np.zeros((0,), str)
    emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32)
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
      keep = np.sort(first)
      ids, emb, lines = ids[keep], emb[keep], [lines[i] for i in keep]
    loaded = (ids, lines, emb)
    self._cache = (names, loaded)
    return loaded

  def __len__(self) -> int:
    return len(self._load()[0])

  def tile_ids(self) -> set[str]:
    """The stored tiles' ids, read without the embeddings (what `index` checks first)."""
    if self._cache is not None:
      return set(self._load()[0].tolist())
    ids = set()
    for name in self.segments():
      with np.load(os.path.join(self.path, SEGMENTS, name)) as z:
        ids.update(z['tile_ids'].tolist())
    return ids

  def embeddings(self) -> np.ndarray:
    return self._load()[2]

  def record(self, i: int) -> dict:
    return json.loads(self._load()[1][i])

  def position(self, tile_id: str) -> int:
    ids = self._load()[0]
    hit = np.flatnonzero(ids == tile_id)
    if not len(hit):
      raise IndexDirError(f'{self.path} holds no tile {tile_id!r} ({len(ids)} tiles, e.g. '
                        f'{ids[:3].tolist()})')
    return int(hit[0])

  def search(self, queries: np.ndarray, k: int, *, approximate: bool = False,
             nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) (Q, k') best first: exact (one matrix product) or through FAISS,
    whose index is built once and kept in IDX/ann/ until the segments change."""
    if approximate:
      return self._approximate(self.embeddings(), nprobe).search(queries, k)
    names = self.segments()
    if self._exact is None or self._exact[0] != names:  # normalised once per archive state
      exact = EmbeddingIndex(self.dim, np.float32)
      exact._keys = normalize(self.embeddings(), np.float32)  # pylint: disable=protected-access
      self._exact = (names, exact)
    return self._exact[1].search(queries, k)

  def _approximate(self, emb: np.ndarray, nprobe: int) -> ApproximateIndex:
    d = os.path.join(self.path, 'ann')
    stamp = hashlib.sha256('\n'.join(self.segments()).encode()).hexdigest()
    path = os.path.join(d, f'ivf-{stamp[:16]}.faiss')
    if os.path.isfile(path):
      return ApproximateIndex.load(path, nprobe)
    ann = ApproximateIndex(emb, nprobe=nprobe)
    # The file is named by the archive's segments: any later `index` run makes a new one.
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f'.tmp-{uuid.uuid4().hex}.faiss')
    ann.save(tmp)
    for old in os.listdir(d):  # an older archive's index is stale
      if old.endswith('.faiss') and not old.startswith('.'):
        os.remove(os.path.join(d, old))
    os.replace(tmp, path)
    return ann
