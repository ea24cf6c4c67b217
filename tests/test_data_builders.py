"""The TFDS builders (LEVIR-CC, LEVIR-MCI, WHU-CDC): real pairs, all splits, FNA inputs, change
masks, and every bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from rsicrc_jax.data import builders
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from data_helpers import (build_levir, copy_mini, dataset_files, make_levir_tree, MINI,
                          tiny_synthetic_cfg)


def test_builds_the_real_levir_cc_pairs(tmp_path):
  builder = build_levir(MINI, tmp_path / 'data')
  assert list(builder.info.splits) == ['train']
  source = builder.as_data_source('train')
  records = cap.read_captions(os.path.join(MINI, 'LevirCCcaptions.json'))
  assert len(source) == 3
  by_id = {int(source[i]['imgid']): source[i] for i in range(3)}
  for rec in records:
    ex = by_id[rec.imgid]
    for side, key in (('A', 'image_a'), ('B', 'image_b')):
      png = np.asarray(Image.open(os.path.join(MINI, 'images', 'train', side, rec.filename)))
      np.testing.assert_array_equal(ex[key], png)  # lossless, pixel for pixel
    assert ex['filename'].decode() == rec.filename and int(ex['changeflag']) == 1
    assert [c.decode() for c in ex['captions']] == list(rec.raws)
    assert [t.decode().split() for t in ex['tokens']] == [list(t) for t in rec.tokens]
  meta = builder.info.metadata
  assert meta['vocab'] == cap.build_vocabulary(t for r in records for t in r.tokens)
  assert meta['caption_lengths']['train'] == [[len(t) for t in r.tokens] for r in records]


def test_all_splits_no_change_pairs_and_caption_ids(tmp_path):
  entries = make_levir_tree(tmp_path / 'levir', with_changeflag=False)
  builder = build_levir(tmp_path / 'levir', tmp_path / 'data')
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'val', 'test')} == {
      'train': 6, 'val': 3, 'test': 3}
  all_ids = {}
  for split in ('train', 'val', 'test'):
    source = builder.as_data_source(split)
    for i in range(len(source)):
      ex = source[i]
      entry = entries[int(ex['imgid'])]
      raws = [s['raw'] for s in entry['sentences']]
      # No changeflag in this JSON: derived from the five no-change sentences.
      expect_flag = 0 if raws[0] == ' there is no difference .' else 1
      assert int(ex['changeflag']) == expect_flag
      for raw, cid in zip(raws, ex['caption_ids']):
        all_ids.setdefault(cap.normalize_caption(raw), set()).add(int(cid))
  # One id per distinct normalised sentence, distinct sentences get distinct ids.
  assert all(len(v) == 1 for v in all_ids.values())
  assert len({next(iter(v)) for v in all_ids.values()}) == len(all_ids)
  for s in cap.NO_CHANGE_SENTENCES:
    assert s in all_ids


@pytest.mark.parametrize('damage, message', [
    ('no_json', 'LevirCCcaptions.json: caption file not found'),
    ('bad_schema', re.escape('LevirCCcaptions.json: images[1] (train_000051.png): expected key '
                             '"split"')),
    ('missing_images', r'lists 6 images; 2 are missing under .*images, e\.g\. .*train_000016.png'),
    ('corrupt_png', r'B/train_000051.png: cannot decode the image'),
    ('wrong_size', r'A/train_000054.png: image is 200x200, expected 256x256'),
    ('size_mismatch', r'train_000054.png: image is 128x128, expected 256x256'),
])
def test_bad_input_fails_clearly_and_leaves_nothing(tmp_path, damage, message):
  root = copy_mini(tmp_path / 'levir')
  images = os.path.join(root, 'images', 'train')
  json_path = os.path.join(root, 'LevirCCcaptions.json')
  if damage == 'no_json':
    os.remove(json_path)
  elif damage == 'bad_schema':
    data = json.load(open(json_path))
    del data['images'][1]['split']
    json.dump(data, open(json_path, 'w'))
  elif damage == 'missing_images':
    os.remove(os.path.join(images, 'A', 'train_000016.png'))
    os.remove(os.path.join(images, 'B', 'train_000016.png'))
  elif damage == 'corrupt_png':
    with open(os.path.join(images, 'B', 'train_000051.png'), 'r+b') as f:
      f.seek(200)
      f.write(b'\0' * 4000)
  elif damage == 'wrong_size':
    Image.new('RGB', (200, 200)).save(os.path.join(images, 'A', 'train_000054.png'))
  elif damage == 'size_mismatch':
    Image.new('RGB', (128, 128)).save(os.path.join(images, 'B', 'train_000054.png'))
  data_dir = tmp_path / 'data'
  with pytest.raises(cap.DataError, match=message):
    build_levir(root, data_dir)
  assert dataset_files(data_dir) == []
  assert not (data_dir / 'levir_cc' / 'default' / '1.0.0').exists()


def test_tfds_build_command_line(tmp_path):
  """The README's command, through the real `tfds` CLI."""
  tfds_cli = os.path.join(os.path.dirname(sys.executable), 'tfds')
  if not os.path.exists(tfds_cli):
    pytest.skip('the tfds command is not installed next to this Python')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [tfds_cli, 'build', os.path.join(repo, 'datasets', 'levir_cc'), '--manual_dir', MINI,
       '--data_dir', str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  version_dir = tmp_path / 'levir_cc' / 'default' / '1.0.0'
  meta = json.load(open(version_dir / 'metadata.json'))
  assert meta['vocab']['the'] == 4 and meta['caption_lengths']['train'][0][0] == 9
  assert any('array_record' in p for p in os.listdir(version_dir))


@pytest.mark.parametrize('name,builder_cls,captions_file,values,classes', [
    ('levir_mci', builders.LevirMCIBuilder, 'LevirCCcaptions.json', (128, 255), (1, 2)),
    ('whu_cdc', builders.WhuCDCBuilder, 'whuCCcaptions.json', (255,), (1,)),
])
def test_change_mask_datasets_keep_their_masks(tmp_path, name, builder_cls, captions_file, values,
                                               classes):
  """LEVIR-MCI and WHU-CDC in their own layout: captions as LEVIR-CC, plus grey label pictures
  kept as class ids (SPEC section 12)."""
  root = tmp_path / 'download'
  entries = make_levir_tree(root, sizes=(('train', 4), ('val', 2), ('test', 2)),
                            captions_file=captions_file, mask_values=values)
  builder = builder_cls(data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  ds = tfds.data_source(name, data_dir=str(tmp_path / 'data'))
  train = ds['train']
  assert len(train) == 4
  by_name = {e['filename']: e for e in entries}
  for i in range(len(train)):
    ex = train[i]
    filename = ex['filename'].decode()
    mask = ex['change_mask']
    assert mask.shape == (256, 256, 1) and mask.dtype == np.uint8
    label = np.asarray(Image.open(root / 'images' / 'train' / 'label' / filename))
    for value, cls in zip(values, classes):  # each grey value became its class id
      np.testing.assert_array_equal(mask[..., 0] == cls, label == value)
    assert mask.any() == bool(by_name[filename]['changeflag'])


@pytest.mark.parametrize('damage, message', [
    ('missing_label', r'lists 36 images; 1 are missing under .*label/train_000001.png'),
    ('unknown_value', r'label/train_000002.png: mask values \[77\] are not classes of levir_mci; '
                      r'expected grey values \[0, 128, 255\] \(0 no change, 128 road, 255 '
                      r'building\)'),
    ('colour_label', r'label/train_000000.png: a change mask must be grey'),
])
def test_bad_masks_fail_clearly_and_leave_nothing(tmp_path, damage, message):
  root = tmp_path / 'download'
  make_levir_tree(root, sizes=(('train', 4), ('val', 4), ('test', 4)), mask_values=(128, 255))
  labels = root / 'images' / 'train' / 'label'
  if damage == 'missing_label':
    os.remove(labels / 'train_000001.png')
  elif damage == 'unknown_value':
    im = np.asarray(Image.open(labels / 'train_000002.png')).copy()
    im[100:110] = 77
    Image.fromarray(im).save(labels / 'train_000002.png')
  else:
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(labels / 'train_000000.png')
  data_dir = tmp_path / 'data'
  with pytest.raises(cap.DataError, match=message):
    builders.LevirMCIBuilder(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert dataset_files(data_dir) == []


def test_tfds_build_command_line_whu_cdc(tmp_path):
  """A second dataset through the real `tfds build` command, in WHU-CDC's own layout."""
  tfds_cli = os.path.join(os.path.dirname(sys.executable), 'tfds')
  if not os.path.exists(tfds_cli):
    pytest.skip('the tfds command is not installed next to this Python')
  root = tmp_path / 'WHU-CDC'
  make_levir_tree(root, sizes=(('train', 4), ('val', 2), ('test', 2)),
                  captions_file='whuCCcaptions.json', mask_values=(255,))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [tfds_cli, 'build', os.path.join(repo, 'datasets', 'whu_cdc'), '--manual_dir', str(root),
       '--data_dir', str(tmp_path / 'data')], capture_output=True, text=True, cwd=tmp_path,
      timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  version_dir = tmp_path / 'data' / 'whu_cdc' / 'default' / '1.0.0'
  meta = json.load(open(version_dir / 'metadata.json'))
  assert meta['caption_lengths'].keys() == {'train', 'val', 'test'}
  info = json.load(open(version_dir / 'features.json'))
  assert 'change_mask' in json.dumps(info)


def test_pictures_stored_at_the_model_size_are_what_the_pipeline_would_make(tmp_path):
  """stored_size + raw: the bicubic resize and crop done once at build time give the very bytes
  the pipeline makes when reading the native pictures, and the host only copies them."""
  native = pipeline.open_dataset(tiny_synthetic_cfg(tmp_path / 'a'), build_if_missing=True)
  ds = pipeline.open_dataset(tiny_synthetic_cfg(tmp_path / 'b', name='tiny48', stored_size=48,
                                                raw=True), build_if_missing=True)
  a, b = native.source('train'), ds.source('train')
  assert len(a) == len(b)
  for i in range(0, len(a), 7):
    for k in ('image_a', 'image_b'):
      np.testing.assert_array_equal(b[i][k], pipeline.resize_center_crop(a[i][k], 48))
  with pytest.raises(cap.DataError, match=r'stores its pictures resized to 48 px, but '
                     r'config.model.image_size=64: resizing them again'):
    pipeline.make_batches(ds, 'train', global_batch=4, max_len=32, image_size=64, train=True)
  batches, _ = pipeline.make_batches(ds, 'train', global_batch=4, max_len=32, image_size=48,
                                     train=True)
  assert batches[0]['image_a'].shape == (4, 48, 48, 3)


def test_a_dataset_built_before_a_new_builder_field_still_opens(tmp_path):
  """Its metadata lacks stored_size and raw: they read as their defaults, not as a mismatch."""
  ds = pipeline.open_dataset(tiny_synthetic_cfg(tmp_path), build_if_missing=True)
  meta_path = os.path.join(ds.builder.data_dir, 'metadata.json')
  meta = json.load(open(meta_path))
  for field in ('stored_size', 'raw'):
    del meta['builder_config'][field]
  json.dump(meta, open(meta_path, 'w'))
  reopened = pipeline.open_dataset(tiny_synthetic_cfg(tmp_path))
  assert len(reopened.source('train')) == len(ds.source('train'))
  with pytest.raises(cap.DataError, match='was built with'):  # a real difference still counts
    pipeline.open_dataset(tiny_synthetic_cfg(tmp_path, raw=True))
