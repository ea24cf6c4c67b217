"""Builds small LEVIR-CC-shaped trees and TFDS datasets for the data tests."""

import json
import os
import shutil

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from rsicrc_jax.data import builders
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import synthetic

MINI = os.path.join(os.path.dirname(__file__), 'fixtures', 'levir_cc_mini')


def make_levir_tree(root, sizes=(('train', 6), ('val', 3), ('test', 3)), image_size=256,
                    with_changeflag=True, captions_file='LevirCCcaptions.json', mask_values=None):
  """A LEVIR-CC download in miniature: JSON + images/<split>/{A,B}/<split>_NNNNNN.png.

  Pairs alternate change / no-change; pictures and change captions come from the synthetic
  generator. With `mask_values` (grey values, e.g. (128, 255) for LEVIR-MCI's road and building)
  a grey images/<split>/label/ picture per pair, as LEVIR-MCI and WHU-CDC ship them: changed
  pairs get a band of each value, unchanged pairs are all 0. Returns the list of JSON entries.
  """
  entries, imgid = [], 0
  for split, n in sizes:
    for i in range(n):
      scene = synthetic.make_scene(7, split, i, change_fraction=1.0)
      changed = i % 2 == 0
      texts = scene.captions if changed else cap.NO_CHANGE_SENTENCES
      a, b = synthetic.render_pair(scene, image_size)
      if not changed:
        b = a
      name = f'{split}_{i:06d}.png'
      for side, im in (('A', a), ('B', b)):
        os.makedirs(os.path.join(root, 'images', split, side), exist_ok=True)
        Image.fromarray(im).save(os.path.join(root, 'images', split, side, name))
      if mask_values:
        label = np.zeros((image_size, image_size), np.uint8)
        if changed:
          for k, value in enumerate(mask_values):
            label[8 * k:8 * k + 8 + i] = value  # a band per class, its height varies per pair
        os.makedirs(os.path.join(root, 'images', split, 'label'), exist_ok=True)
        Image.fromarray(label).save(os.path.join(root, 'images', split, 'label', name))
      entry = {'filepath': split, 'filename': name, 'imgid': imgid, 'split': split,
               'sentids': list(range(5 * imgid, 5 * imgid + 5)),
               'sentences': [{'tokens': t.split(), 'raw': f' {t} .', 'imgid': imgid,
                              'sentid': 5 * imgid + k} for k, t in enumerate(texts)]}
      if with_changeflag:
        entry['changeflag'] = int(changed)
      entries.append(entry)
      imgid += 1
  with open(os.path.join(root, captions_file), 'w') as f:
    json.dump({'images': entries}, f)
  return entries


def copy_mini(dst):
  shutil.copytree(MINI, dst)
  return dst


def build_levir(manual_dir, data_dir, **config):
  config = builders.LevirCCConfig(name=config.pop('name', 'default'), **config) if config else None
  builder = builders.LevirCCBuilder(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def dataset_files(data_dir):
  """Every record file under data_dir (what a failed build must not leave behind)."""
  out = []
  for base, _, files in os.walk(data_dir):
    out += [os.path.join(base, f) for f in files if 'array_record' in f or f.endswith('.json')
            and 'downloads' not in base and '.config' not in base]
  return out


def tiny_synthetic_cfg(data_dir, **over):
  fields = builders.config_fields(builders.SyntheticCCBuilder.PRESETS['tiny'])
  fields['name'] = 'tiny'
  fields.update(over)
  return {'name': 'synthetic_cc', 'builder_config': fields, 'data_dir': str(data_dir)}


def words_of(ids, vocab):
  return cap.decode_caption(np.asarray(ids), cap.id_to_word(vocab))


def make_dubai_tree(root, sizes=(('train', 4), ('val', 2), ('test', 2))):
  """Dubai-CC as distributed, in miniature: description_jsontr_te_val/<Split>_Dubai_CC.json and
  50x50 RGB TIFF tiles <R>x<C>.tif under imgs_tiles/RGB/500_2000 (before) and 500_2010 (after).
  Tokens keep case and attached punctuation as Dubai-CC's do ('changed.'); image_id restarts in
  each file. Even pairs change; odd ones carry five of Dubai-CC's no-change sentences. Returns
  {split: entries}."""
  files = {'train': 'Train_Dubai_CC.json', 'val': 'Validation_Dubai_CC.json',
           'test': 'Test_Dubai_CC.json'}
  out, tile = {}, 0
  for split, n in sizes:
    entries = []
    for i in range(n):
      scene = synthetic.make_scene(11, split, i, change_fraction=1.0)
      changed = i % 2 == 0
      a, b = synthetic.render_pair(scene, 50)
      if changed:
        texts = [t[0].upper() + t[1:] + '.' for t in scene.captions]
      else:
        b = a
        texts = [s + '.' for s in cap.DUBAI_NO_CHANGE_SENTENCES[i % 3::3][:5]]
      name = f'{tile // 20}x{tile % 20}.tif'
      tile += 1
      for folder, im in (('500_2000', a), ('500_2010', b)):
        os.makedirs(os.path.join(root, 'imgs_tiles', 'RGB', folder), exist_ok=True)
        Image.fromarray(im).save(os.path.join(root, 'imgs_tiles', 'RGB', folder, name))
      entries.append({'filename': name, 'image_id': i, 'split': split,
                      'sentids': list(range(5 * i, 5 * i + 5)),
                      'sentences': [{'raw': t, 'tokens': t.split(), 'imgid': i, 'sentid': 5 * i + k}
                                    for k, t in enumerate(texts)]})
    os.makedirs(os.path.join(root, 'description_jsontr_te_val'), exist_ok=True)
    with open(os.path.join(root, 'description_jsontr_te_val', files[split]), 'w') as f:
      json.dump({'images': entries}, f)
    out[split] = entries
  return out


def second_colour(cls):
  """The base SECOND-CC colour of a land-cover class id."""
  return next(c for c, k in builders.SECOND_COLOURS.items() if k == cls)


def make_second_tree(root, sizes=(('train', 4), ('val', 2), ('test', 2))):
  """SECOND-CC as its zip unpacks, in miniature: SECOND-CC-AUG.json and
  <split>/rgb/{A,B}/<name>.png with colour-coded <split>/sem/{A,B}/<name>.png. Changed pairs
  (even ones) have a block of low vegetation (class 1) before and building (class 5) after,
  white (no change) elsewhere; their rows grow with the pair. Returns the JSON entries."""
  entries, imgid = [], 0
  for split, n in sizes:
    for i in range(n):
      scene = synthetic.make_scene(13, split, i, change_fraction=1.0)
      changed = i % 2 == 0
      a, b = synthetic.render_pair(scene, 256)
      texts = scene.captions if changed else cap.NO_CHANGE_SENTENCES
      if not changed:
        b = a
      name = f'{imgid:05d}.png'
      for kind, side, im in (('rgb', 'A', a), ('rgb', 'B', b)):
        os.makedirs(os.path.join(root, split, kind, side), exist_ok=True)
        Image.fromarray(im).save(os.path.join(root, split, kind, side, name))
      for side, cls in (('A', 1), ('B', 5)):
        sem = np.full((256, 256, 3), 255, np.uint8)
        if changed:
          sem[40:60 + 4 * i, 30:90] = second_colour(cls)
        os.makedirs(os.path.join(root, split, 'sem', side), exist_ok=True)
        Image.fromarray(sem).save(os.path.join(root, split, 'sem', side, name))
      entries.append({'filepath': split, 'filename': name, 'imgid': imgid, 'split': split,
                      'changeflag': int(changed), 'sentids': list(range(5 * imgid, 5 * imgid + 5)),
                      'sentences': [{'tokens': t.split(), 'raw': f'{t} .', 'sentid': 5 * imgid + k}
                                    for k, t in enumerate(texts)]})
      imgid += 1
  with open(os.path.join(root, 'SECOND-CC-AUG.json'), 'w') as f:
    json.dump({'images': entries}, f)
  return entries
