"""`change_captions`: a user's own pairs with a captions CSV or JSON, built into the dataset the
trainer and eval read."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rsicrc_jax.data import builders
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from rsicrc_jax.data import synthetic
from data_helpers import dataset_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CHANGE = list(cap.NO_CHANGE_SENTENCES[:2])


def _pictures(root, names, size=(80, 64)):
  """(w, h) RGB pairs from the synthetic generator under root/<before|after>/<name>."""
  out = {}
  for i, name in enumerate(names):
    a, b, _ = synthetic.make_pair(4, 'train', i, size=max(size))
    for side, img in (('before', a), ('after', b)):
      path = root / side / name
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(img[:size[1], :size[0]]).save(path)
      out[(side, name)] = np.asarray(Image.open(path).convert('RGB'))
  return out


def _csv_tree(root):
  """Four pairs with 1, 3, 5 and 7 captions; one of them only no-change sentences."""
  pics = _pictures(root, ['p0.png', 'p1.png', 'p2.jpg', 'p3.png'])
  rows = [('p0.png', 'train', ['Houses are built on the bareland.'])]
  rows.append(('p1.png', 'train', ['a road appears', 'A new road is built .', 'a road is built']))
  rows.append(('p2.jpg', 'val', NO_CHANGE + NO_CHANGE[:1] + [cap.NO_CHANGE_SENTENCES[2]] * 2))
  rows.append(('p3.png', 'test', [f'the trees number {i} are removed' for i in range(7)]))
  with open(root / 'captions.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['before', 'after', 'split', 'caption', 'annotator'])
    for name, split, caps in rows:
      for c in caps:
        w.writerow([f'before/{name}', f'after/{name}', split, c, 'me'])
  return pics


def _build(root, data_dir, **config):
  cfg = (builders.ChangeCaptionsConfig(name=config.pop('name', 'default'), **config) if config
         else None)
  b = builders.ChangeCaptionsBuilder(data_dir=str(data_dir), config=cfg)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return b


def test_csv_through_the_tfds_command_any_size_resized_at_build(tmp_path):
  tfds_cli = os.path.join(os.path.dirname(sys.executable), 'tfds')
  if not os.path.exists(tfds_cli):
    pytest.skip('the tfds command is not installed next to this Python')
  root = tmp_path / 'mine'
  pics = _csv_tree(root)
  out = subprocess.run(
      [tfds_cli, 'build', os.path.join(REPO, 'datasets', 'change_captions'), '--manual_dir',
       str(root), '--data_dir', str(tmp_path / 'data'), '--config',
       json.dumps({'name': 's48', 'stored_size': 48})], capture_output=True, text=True,
      cwd=tmp_path, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  ds = pipeline.open_dataset({'name': 'change_captions', 'data_dir': str(tmp_path / 'data'),
                              'builder_config': {'name': 's48', 'stored_size': 48}})
  meta = ds.builder.info.metadata
  assert meta['captions_file'] == 'captions.csv' and meta['captions_dropped'] == 2
  assert meta['pairs_unchanged'] == 1 and ds.splits == ('train', 'val', 'test')
  train = ds.source('train')
  by_name = {str(train[i]['filename'], 'utf-8') if isinstance(train[i]['filename'], bytes)
             else train[i]['filename']: train[i] for i in range(len(train))}
  p0 = by_name['before/p0.png']
  # One caption fills all five; tokens are its normalised words.
  assert [c.decode() for c in p0['captions']] == ['Houses are built on the bareland.'] * 5
  assert [t.decode() for t in p0['tokens']] == ['houses are built on the bareland'] * 5
  assert len(set(p0['caption_ids'].tolist())) == 1 and p0['changeflag'] == 1
  p1 = by_name['before/p1.png']
  assert [c.decode() for c in p1['captions']] == ['a road appears', 'A new road is built .',
                                                  'a road is built', 'a road appears',
                                                  'A new road is built .']
  # Pictures of any size, resized and centre-cropped once to the stored size.
  np.testing.assert_array_equal(p0['image_b'], pipeline.resize_center_crop(
      pics[('after', 'p0.png')], 48))
  val = ds.source('val')[0]
  assert val['changeflag'] == 0  # only no-change sentences: unchanged by the SPEC rule
  test = ds.source('test')[0]
  assert [c.decode() for c in test['captions']] == [
      f'the trees number {i} are removed' for i in range(5)]  # the first five of seven
  # The SPEC vocabulary rule over the filled captions of all splits: words seen MORE than 5
  # times ('the' 15, 'is' 7), not 'road' (5: p1's three captions filled to five).
  assert {'the', 'is'} <= set(ds.vocab) and 'road' not in ds.vocab


def test_json_in_the_levir_layout_without_ids_or_tokens(tmp_path):
  root = tmp_path / 'mine'
  entries = []
  for i, (split, caps) in enumerate((('train', ['A house is built', 'a villa appears']),
                                     ('test', NO_CHANGE))):
    name = f'x{i}.png'
    a, b, _ = synthetic.make_pair(6, 'train', i, size=256)
    for side, img in (('A', a), ('B', b)):
      (root / 'images' / split / side).mkdir(parents=True, exist_ok=True)
      Image.fromarray(img).save(root / 'images' / split / side / name)
    entries.append({'filepath': split, 'filename': name, 'split': split,
                    'sentences': [{'raw': c} for c in caps]})
  (root / 'captions.json').write_text(json.dumps({'images': entries}))
  b = _build(root, tmp_path / 'data')
  meta = b.info.metadata
  assert meta['captions_file'] == 'captions.json' and meta['pairs_unchanged'] == 1
  rec = b.as_data_source('train')[0]
  assert [t.decode() for t in rec['tokens']] == ['a house is built', 'a villa appears'] * 2 + [
      'a house is built']
  assert rec['imgid'] == 0 and b.as_data_source('test')[0]['changeflag'] == 0


@pytest.mark.parametrize('damage,message', [
    ('both', r'expected one captions file.*found captions\.json and captions\.csv'),
    ('neither', r'expected one captions file.*found neither'),
    ('no_split_column', r"captions\.csv: the header lacks column\(s\) \['split'\]"),
    ('two_splits', r"line 4: before/p1\.png -> after/p1\.png is in split 'val' here but "
                   r"'train' on line 3"),
    ('bad_split', r"line 2: split 'training', expected one of"),
    ('empty_caption', r'line 3: empty "caption"'),
    ('missing_image', r'lists 8 images; 1 are missing, e\.g\. .*after/p3\.png'),
    ('wrong_size', r'before/p0\.png: image is 80x64, expected 256x256'),
])
def test_bad_input_names_the_file_or_line_and_leaves_nothing(tmp_path, damage, message):
  root = tmp_path / 'mine'
  _csv_tree(root)
  lines = (root / 'captions.csv').read_text().splitlines()
  if damage == 'both':
    (root / 'captions.json').write_text('{"images": []}')
  elif damage == 'neither':
    os.remove(root / 'captions.csv')
  elif damage == 'no_split_column':
    (root / 'captions.csv').write_text('\n'.join(
        [l.replace(',split', ',part') for l in lines[:1]] + lines[1:]) + '\n')
  elif damage == 'two_splits':
    lines[3] = lines[3].replace(',train,', ',val,')
    (root / 'captions.csv').write_text('\n'.join(lines) + '\n')
  elif damage == 'bad_split':
    lines[1] = lines[1].replace(',train,', ',training,')
    (root / 'captions.csv').write_text('\n'.join(lines) + '\n')
  elif damage == 'empty_caption':
    cells = lines[2].split(',')
    cells[3] = ''
    lines[2] = ','.join(cells)
    (root / 'captions.csv').write_text('\n'.join(lines) + '\n')
  elif damage == 'missing_image':
    os.remove(root / 'after' / 'p3.png')
  data_dir = tmp_path / 'data'
  with pytest.raises(cap.DataError, match=message):
    _build(root, data_dir)  # wrong_size: 80x64 pictures with no stored_size
  assert dataset_files(data_dir) == []


def test_pairs_named_by_paths_get_flat_figure_files():
  """eval draws figures per pair; a CSV pair is named by its path ('before/0001.png')."""
  from rsicrc_jax import eval as rsicrc_eval  # pylint: disable=import-outside-toplevel
  assert rsicrc_eval.figure_file(7, 'before/0001.png') == '007_before_0001.png'
  assert rsicrc_eval.figure_file(0, 'train_000016.png') == '000_train_000016.png'
  assert rsicrc_eval.figure_file(3, 'a b/c:d.jpg') == '003_a_b_c_d.png'
