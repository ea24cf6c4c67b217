"""Eval's embedding and decoding run data parallel over a process's devices (simulated here)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_eval_on_eight_devices_matches_one_device(tmp_path):
  """Same model and split on a 1-device and an 8-device mesh: the batches really are split
  over 8 devices, pairs come back in the same order, greedy and beam captions are identical and
  embeddings and attention agree to float rounding, with the batch of 5 rounded up to 8."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=REPO + os.pathsep + os.environ.get(
                 'PYTHONPATH', ''))
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'workers', 'sharded_eval.py'),
                        str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['devices'] == 8
  for beam in ('beam1', 'beam2'):
    got = r[beam]
    assert got['split_over'] == [[1], [8]], got['split_over']
    assert got['pairs'] == [13, 13] and got['same_order'] and got['same_captions']
    assert all(len(c.split()) > 0 for c in got['captions'])
    for k in ('visual', 'text', 'all_text'):
      assert got[f'max_diff_{k}'] <= 1e-5 * got['scale_visual'] + 1e-6, (beam, k, got)
  assert r['beam1']['max_diff_attention'] <= 1e-6
  # config.hard_negatives: 8 devices mine the same negatives as one (8 train pairs, 40 items).
  assert r['mining'] == {'items': 40, 'found': r['mining']['found'], 'same_table': True}
  assert r['mining']['found'] > 20
  # predict's tiles: batches of 5 rounded up to 8 and split over 8 devices, the same results.
  got = r['predict']
  assert got['split_over'] == [[1], [8]] and got['tiles'] == 6 and got['same_order']
  assert got['same_tokens'] and got['max_diff_visual'] <= 1e-5 * got['scale_visual'] + 1e-6
