"""Dubai-CC and SECOND-CC in their distributed layouts (SPEC section 12): generated trees with
the real file, folder and key names, built, read back, and broken on purpose."""

import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from rsicrc_jax.data import builders
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from data_helpers import dataset_files, make_dubai_tree, make_second_tree, second_colour


def _build(builder_cls, root, data_dir, **config):
  cfg = builder_cls.builder_config_cls(name='t', **config) if config else None
  builder = builder_cls(data_dir=str(data_dir), config=cfg)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return builder


def test_dubai_cc_tokens_are_lowercased_captions_kept_and_no_change_derived(tmp_path):
  root = tmp_path / 'Dubai-CC'
  entries = make_dubai_tree(root)
  builder = _build(builders.DubaiCCBuilder, root, tmp_path / 'data', vocab_min_count=0)
  meta = builder.info.metadata
  vocab = meta['vocab']
  # Dubai-CC writes 'Nothing', 'changed.': the vocabulary holds the words, not the spellings.
  assert 'changed' in vocab and 'nothing' in vocab
  assert not [w for w in vocab if w != w.lower() and w not in cap.SPECIAL_TOKENS]
  assert not [w for w in vocab if w.endswith('.')]
  assert meta['pairs_unchanged'] == 4  # odd pairs of 4 + 2 + 2
  source = builder.as_data_source('train')
  seen_ids = set()
  for split, n in (('train', 4), ('val', 2), ('test', 2)):
    source = builder.as_data_source(split)
    assert len(source) == n
    by_name = {e['filename']: e for e in entries[split]}
    for i in range(n):
      ex = source[i]
      entry = by_name[ex['filename'].decode()]
      raws = [s['raw'] for s in entry['sentences']]
      assert [c.decode() for c in ex['captions']] == raws  # kept as written, for references
      assert [t.decode() for t in ex['tokens']] == [
          ' '.join(w.lower().rstrip('.') for w in r.split()) for r in raws]
      assert ex['changeflag'] == int(entry['image_id'] % 2 == 0)
      assert ex['image_a'].shape == (50, 50, 3)  # native size
      before = np.asarray(Image.open(root / 'imgs_tiles/RGB/500_2000' / entry['filename']))
      np.testing.assert_array_equal(ex['image_a'], before)
      seen_ids.add(int(ex['imgid']))
  assert seen_ids == set(range(8))  # unique although each file's image_id restarts at 0
  # The pipeline resizes the 50 px tiles for the model (SPEC section 2).
  ds = pipeline.open_dataset({'name': 'dubai_cc', 'data_dir': str(tmp_path / 'data'),
                              'builder_config': {'name': 't', 'vocab_min_count': 0}})
  batches, _ = pipeline.make_batches(ds, 'val', global_batch=2, max_len=20, image_size=64,
                                     train=False, with_references=True)
  batch = batches[0]
  assert batch['image_a'].shape == (2, 64, 64, 3)
  first = str(batch['filename'][0])
  np.testing.assert_array_equal(batch['image_a'][0], pipeline.resize_center_crop(
      np.asarray(Image.open(root / 'imgs_tiles/RGB/500_2000' / first)), 64))
  changed = {e['filename']: e['image_id'] % 2 == 0 for e in entries['val']}
  assert [f != -1 for f in batch['flag']] == [changed[str(f)] for f in batch['filename']]


def test_dubai_cc_a_pair_is_unchanged_only_when_every_caption_says_so():
  mixed = ['Nothing has changed.'] * 4 + ['A road was built.']
  assert cap.infer_changeflag(mixed, cap.DUBAI_NO_CHANGE_SENTENCES) == 1
  assert cap.infer_changeflag(['NOTHING has changed .', 'the area appears the same'],
                              cap.DUBAI_NO_CHANGE_SENTENCES) == 0
  # LEVIR-CC's own rule would not know Dubai-CC's sentences.
  assert cap.infer_changeflag(['Nothing has changed.']) == 1


@pytest.mark.parametrize('damage, message', [
    ('no_val_file', r'Validation_Dubai_CC.json: caption file not found; expected Dubai-CC\'s '
                    r'description_jsontr_te_val/\{Train_Dubai_CC.json,'),
    ('missing_tile', r'the caption files list 16 tiles; 1 are missing, e.g. .*500_2010/0x1.tif'),
    ('no_words', r'Test_Dubai_CC.json: images\[1\] \(0x7.tif\).sentences\[2\]: expected a caption '
                 r'with words, got \'\.\.\.\''),
    ('duplicate', r'Train_Dubai_CC.json: images\[3\] \(0x0.tif\).filename: expected a file listed '
                  r'once, it is also images\[0\]'),
    ('bad_tile', r'500_2000/0x2.tif: cannot decode the image'),
])
def test_dubai_cc_bad_input_names_the_file_and_leaves_nothing(tmp_path, damage, message):
  root = tmp_path / 'Dubai-CC'
  make_dubai_tree(root)
  captions = root / 'description_jsontr_te_val'
  if damage == 'no_val_file':
    os.remove(captions / 'Validation_Dubai_CC.json')
  elif damage == 'missing_tile':
    os.remove(root / 'imgs_tiles/RGB/500_2010/0x1.tif')
  elif damage in ('no_words', 'duplicate'):
    name = 'Test_Dubai_CC.json' if damage == 'no_words' else 'Train_Dubai_CC.json'
    data = json.load(open(captions / name))
    if damage == 'no_words':
      data['images'][1]['sentences'][2] = {'raw': '...', 'tokens': ['...']}
    else:
      data['images'][3]['filename'] = data['images'][0]['filename']
    json.dump(data, open(captions / name, 'w'))
  else:
    (root / 'imgs_tiles/RGB/500_2000/0x2.tif').write_bytes(b'not a tiff')
  with pytest.raises(cap.DataError, match=message):
    _build(builders.DubaiCCBuilder, root, tmp_path / 'data')
  assert dataset_files(tmp_path / 'data') == []


def test_second_cc_keeps_its_semantic_maps_as_class_ids(tmp_path):
  root = tmp_path / 'SECOND-CC-AUG'
  entries = make_second_tree(root)
  builder = _build(builders.SecondCCBuilder, root, tmp_path / 'data')
  meta = builder.info.metadata
  assert meta['semantic_classes'][5] == 'building' and meta['pairs_unchanged'] == 4
  by_name = {e['filename']: e for e in entries}
  train = builder.as_data_source('train')
  assert len(train) == 4
  for i in range(len(train)):
    ex = train[i]
    name = ex['filename'].decode()
    for side, cls in (('a', 1), ('b', 5)):
      sem = ex[f'semantic_{side}']
      assert sem.shape == (256, 256, 1) and sem.dtype == np.uint8
      colours = np.asarray(Image.open(root / 'train' / 'sem' / side.upper() / name))
      np.testing.assert_array_equal(sem[..., 0] == cls,
                                    (colours == second_colour(cls)).all(-1))
      assert set(np.unique(sem)) <= {0, cls}
    assert ex['semantic_b'].any() == bool(by_name[name]['changeflag'])
    np.testing.assert_array_equal(
        ex['image_b'], np.asarray(Image.open(root / 'train' / 'rgb' / 'B' / name)))


@pytest.mark.parametrize('damage, message', [
    ('missing_sem', r'SECOND-CC-AUG.json lists 32 pictures \(rgb and sem, A and B\); 1 are '
                    r'missing, e.g. .*val/sem/B/00005.png'),
    ('unknown_colour', r'train/sem/A/00002.png: colours \[\(1, 2, 3\)\] are not SECOND-CC '
                       r'classes'),
])
def test_second_cc_bad_input_names_the_file_and_leaves_nothing(tmp_path, damage, message):
  root = tmp_path / 'SECOND-CC-AUG'
  make_second_tree(root)
  if damage == 'missing_sem':
    os.remove(root / 'val' / 'sem' / 'B' / '00005.png')
  else:
    path = root / 'train' / 'sem' / 'A' / '00002.png'
    sem = np.asarray(Image.open(path)).copy()
    sem[0, 0] = (1, 2, 3)
    Image.fromarray(sem).save(path)
  with pytest.raises(cap.DataError, match=message):
    _build(builders.SecondCCBuilder, root, tmp_path / 'data')
  assert dataset_files(tmp_path / 'data') == []


def test_dubai_cc_pairs_with_other_than_five_captions_are_filled_or_cut():
  six = [{'raw': f'A road was built {k}.', 'tokens': ['A', 'road', 'was', 'built', f'{k}.']}
         for k in range(6)]
  data = {'images': [{'filename': '1x1.tif', 'sentences': six},
                     {'filename': '1x2.tif', 'sentences': [{'raw': 'Nothing has changed.'},
                                                           {'raw': 'No change was made.'}]}]}
  records, dropped = cap.parse_dubai_captions(data, 'Test_Dubai_CC.json', 'test', first_imgid=7)
  assert dropped == 1 and [r.imgid for r in records] == [7, 8]
  assert records[0].raws == tuple(s['raw'] for s in six[:5])
  assert records[0].tokens[4] == ('a', 'road', 'was', 'built', '4')
  assert records[1].raws == ('Nothing has changed.', 'No change was made.') * 2 + (
      'Nothing has changed.',)
  assert records[1].tokens[1] == ('no', 'change', 'was', 'made')  # from raw when no tokens
  assert [r.changeflag for r in records] == [1, 0]
