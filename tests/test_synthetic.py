"""The synthetic change-caption dataset: deterministic, grounded captions, visible changes."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from rsicrc_jax.data import synthetic
from data_helpers import tiny_synthetic_cfg

# An independent reading of the captions: which object, which action, where, how many.
HOUSE = {'house', 'houses', 'building', 'buildings', 'villa', 'villas'}
TREE = {'trees', 'woods', 'vegetation'}
ADD = {'built', 'appear', 'appears', 'constructed'}
REMOVE = {'removed', 'disappear', 'disappears', 'disappeared', 'demolished', 'down', 'cleared'}
COUNTS = {'a': 1, 'two': 2, 'three': 3}


def read_location(words):
  row = 0 if {'top', 'upper'} & words else 2 if {'bottom', 'lower'} & words else 1
  col = 0 if 'left' in words else 2 if 'right' in words else 1
  return row, col


def read_clause(text):
  words = set(text.split())
  objects = set()
  if HOUSE & words:
    objects.add('houses')
  if TREE & words:
    objects.add('trees')
  if 'road' in words:
    objects.add('road')
  count = None
  m = re.search(r'\b(a|two|three|some|several|many) (house|building|villa)s?\b', text)
  if m:
    count = COUNTS.get(m.group(1), 'many')
  return objects, words, read_location(words), count


def check_grounded(scene):
  if not scene.events:
    assert scene.captions == cap.NO_CHANGE_SENTENCES
    return
  assert len(set(scene.captions)) == 5
  for caption in scene.captions:
    clauses = caption.split(' and ')
    assert len(clauses) == len(scene.events), caption
    for clause, event in zip(clauses, scene.events):
      objects, words, where, count = read_clause(clause)
      assert where == synthetic.LOCATIONS[event.location], (clause, event)
      before, after = synthetic.EVENTS[event.kind]
      expected = {x for x in (before, after) if x != 'bareland'}
      assert objects == expected, (clause, event)
      if after == 'bareland':  # something was taken away
        assert words & REMOVE or 'replaced by bareland' in clause or 'replaces' in words, clause
      else:
        assert words & (ADD | {'replaced'}), clause
      if 'houses' in expected:
        if event.count == 1:
          assert count == 1, (clause, event)
        else:
          assert count in (event.count, 'many') and count != 1, (clause, event)


def test_captions_are_grounded_in_the_scene():
  kinds = set()
  changed = 0
  for i in range(400):
    scene = synthetic.make_scene(11, 'train', i)
    check_grounded(scene)
    kinds.update(e.kind for e in scene.events)
    changed += scene.changed
  assert kinds == set(synthetic.EVENTS)
  assert 160 <= changed <= 240  # about half the pairs change


def test_deterministic_from_the_seed():
  a1, b1, s1 = synthetic.make_pair(5, 'val', 3, size=48)
  a2, b2, s2 = synthetic.make_pair(5, 'val', 3, size=48)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(b1, b2)
  assert s1.captions == s2.captions
  a3, _, _ = synthetic.make_pair(6, 'val', 3, size=48)
  assert not np.array_equal(a1, a3)


def cell_diffs(a, b):
  d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1)
  n = a.shape[0]
  return {cell: d[cell[0] * n // 3:(cell[0] + 1) * n // 3,
                  cell[1] * n // 3:(cell[1] + 1) * n // 3].mean()
          for cell in synthetic.LOCATIONS.values()}


def test_changes_are_drawn_where_the_captions_say():
  for i in range(120):
    scene = synthetic.make_scene(2, 'test', i)
    a, b = synthetic.render_pair(scene, 64, nuisance=False)
    diffs = cell_diffs(a, b)
    cells = {synthetic.LOCATIONS[e.location] for e in scene.events}
    for cell, d in diffs.items():
      if cell in cells:
        assert d > 4.0, (scene.events, cell, d)  # clearly visible
      else:
        assert d < 1.0, (scene.events, cell, d)  # at most a shadow's edge spills over
    # With nuisance, a no-change pair still differs (illumination, noise, misregistration).
    if not scene.changed:
      na, nb = synthetic.render_pair(scene, 64)
      assert np.abs(na.astype(np.float32) - nb).mean() > 1.0


def test_render_pairs_on_several_processes_draws_the_same_pixels_in_order():
  scenes = [synthetic.make_scene(4, 'train', i) for i in range(7)]
  serial = [synthetic.render_pair(s, 32) for s in scenes]
  drawn = list(synthetic.render_pairs(scenes, 32, workers=2, chunk=2))
  assert len(drawn) == len(serial)
  for (a, b), (sa, sb) in zip(drawn, serial):
    np.testing.assert_array_equal(a, sa)
    np.testing.assert_array_equal(b, sb)


def test_render_pairs_from_a_script_without_a_main_guard_falls_back_to_this_process(tmp_path):
  # The spawned workers import the main script; unguarded, it starts a pool again and
  # multiprocessing stops those workers. The pairs are then drawn in the script's own process.
  script = tmp_path / 'unguarded.py'
  script.write_text(textwrap.dedent("""
      import numpy as np
      from rsicrc_jax.data import synthetic
      scenes = [synthetic.make_scene(4, 'val', i) for i in range(5)]
      drawn = list(synthetic.render_pairs(scenes, 32, workers=2, chunk=1))
      again = list(synthetic.render_pairs(scenes, 32, workers=2, chunk=1))
      same = all(np.array_equal(a, s[0]) and np.array_equal(b, s[1]) for (a, b), s in
                 zip(drawn + again, [synthetic.render_pair(s, 32) for s in scenes] * 2))
      print('pairs', len(drawn), len(again), 'same', same)
      """))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'pairs 5 5 same True' in out.stdout
  # One warning: the second call knows the workers cannot start and draws here at once.
  assert out.stderr.count('the render workers stopped') == 1, out.stderr[-2000:]
  assert "if __name__ == '__main__':" in out.stderr


def test_tiny_builder_and_its_vocabulary(tmp_path):
  cfg = tiny_synthetic_cfg(tmp_path)
  ds = pipeline.open_dataset(cfg, build_if_missing=True)
  assert {s: len(v) for s, v in ds.caption_lengths.items()} == {'train': 40, 'val': 12, 'test': 12}
  words = {w for w in ds.vocab if w not in cap.SPECIAL_TOKENS}
  assert {'there', 'difference', 'houses', 'road', 'trees', 'left', 'top'} <= words
  source = ds.source('val')
  for i in range(len(source)):
    ex = source[i]
    scene_json = json.loads(ex['scene'])
    assert int(ex['changeflag']) == int(scene_json['changed'])
    assert ex['image_a'].shape == (64, 64, 3) and ex['image_a'].dtype == np.uint8
    # The stored images are the generator's, pixel for pixel (records are stored in TFDS's
    # shuffled key order; the filename says which pair this is).
    index = int(ex['filename'].decode()[len('val_'):-len('.png')])
    a, b, scene = synthetic.make_pair(0, 'val', index, size=64)
    np.testing.assert_array_equal(ex['image_a'], a)
    np.testing.assert_array_equal(ex['image_b'], b)
    assert [c.decode() for c in ex['captions']] == [f' {c} .' for c in scene.captions]


def test_config_errors(tmp_path):
  with pytest.raises(cap.DataError, match=r"unknown fields \['num_pairs'\]"):
    pipeline.open_dataset(tiny_synthetic_cfg(tmp_path, num_pairs=3))
  with pytest.raises(cap.DataError, match='not built under .*run: tfds build datasets/levir_cc'):
    pipeline.open_dataset({'name': 'levir_cc', 'data_dir': str(tmp_path)})
  with pytest.raises(cap.DataError, match="unknown dataset 'levir', expected one of"):
    pipeline.open_dataset({'name': 'levir', 'data_dir': str(tmp_path)})
  with pytest.raises(cap.DataError, match='registered config of synthetic_cc'):
    pipeline.open_dataset({'name': 'synthetic_cc', 'data_dir': str(tmp_path),
                           'builder_config': {'name': 'default', 'num_train': 3}})
