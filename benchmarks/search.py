"""Archive search at scale: exact top-k (one matrix product, `rsicrc_jax.index.EmbeddingIndex`)
against FAISS's inverted file (`ApproximateIndex`, what `predict search --approximate` uses).

  python benchmarks/search.py [--sizes 100000,1000000] [--dim 512] [--queries 200]

Prints, per archive size: build time, query latency (one query at a time, as `search` runs),
and the approximate index's recall@10 against exact search, for a few nprobe values.

The embeddings are synthetic but shaped like an archive's: pair embeddings cluster by what
changed (here 2,000 clusters of unequal size, unit-norm directions plus noise), and the queries
are text-like points near a cluster, not keys themselves. Uniform random vectors would have no
neighbours worth finding and make any approximate index look bad.
"""

import argparse
import platform
import time

import numpy as np

from rsicrc_jax import index as emb_index


def archive(n: int, dim: int, clusters: int, rs: np.random.Generator) -> np.ndarray:
  """(n, dim) unit float32 keys: cluster centres plus noise of norm ~0.35."""
  centres = emb_index.normalize(rs.normal(size=(clusters, dim)), np.float32)
  which = rs.zipf(1.6, size=n) % clusters  # unequal clusters, as change types are
  out = np.empty((n, dim), np.float32)
  for i in range(0, n, 100_000):  # in chunks: a float64 (1M, 512) draw alone is 4 GB
    m = min(n, i + 100_000) - i
    noise = rs.standard_normal(size=(m, dim), dtype=np.float32) * (0.35 / np.sqrt(dim))
    out[i:i + m] = emb_index.normalize(centres[which[i:i + m]] + noise, np.float32)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', default='100000,1000000')
  p.add_argument('--dim', type=int, default=512, help='Embedding size (levir d_model: 512).')
  p.add_argument('--queries', type=int, default=200)
  p.add_argument('--k', type=int, default=10)
  p.add_argument('--nprobe', default='8,32,0,256', help='0: the default, max(32, nlist / 8)')
  args = p.parse_args()
  rs = np.random.default_rng(0)
  print(f'machine: {platform.processor() or platform.machine()}, '
        f'{len(__import__("os").sched_getaffinity(0))} cores; dim {args.dim}, '
        f'k {args.k}, {args.queries} queries')
  rows = []
  for n in (int(s) for s in args.sizes.split(',')):
    keys = archive(n, args.dim, 2000, rs)
    q = emb_index.normalize(keys[rs.choice(n, args.queries)] + rs.standard_normal(
        size=(args.queries, args.dim), dtype=np.float32) * (0.5 / np.sqrt(args.dim)), np.float32)
    t = time.perf_counter()
    exact = emb_index.EmbeddingIndex(args.dim, np.float32)
    exact.add(keys)
    build_exact = time.perf_counter() - t
    truth, lat = [], []
    for i in range(args.queries):
      t = time.perf_counter()
      truth.append(exact.search(q[i:i + 1], args.k)[1][0])
      lat.append(time.perf_counter() - t)
    rows.append((n, 'exact', '', build_exact, np.median(lat) * 1e3, 1.0))
    t = time.perf_counter()
    ann = emb_index.ApproximateIndex(keys)
    build_ann = time.perf_counter() - t
    for nprobe in (int(x) for x in args.nprobe.split(',')):
      ann.nprobe = nprobe
      shown = nprobe or f'{max(32, ann.nlist // 8)} (default)'
      found, lat = [], []
      for i in range(args.queries):
        t = time.perf_counter()
        found.append(ann.search(q[i:i + 1], args.k)[1][0])
        lat.append(time.perf_counter() - t)
      recall = np.mean([len(set(f) & set(g)) / args.k for f, g in zip(found, truth)])
      rows.append((n, f'FAISS IVF (nlist {ann.nlist})', shown, build_ann,
                   np.median(lat) * 1e3, recall))
    del keys, exact, ann
  print('| stored | index | nprobe | build s | query ms (median) | recall@10 |')
  print('| --- | --- | --- | --- | --- | --- |')
  for n, kind, nprobe, build, ms, rec in rows:
    print(f'| {n:,} | {kind} | {nprobe} | {build:.1f} | {ms:.2f} | {rec:.3f} |')


if __name__ == '__main__':
  main()
