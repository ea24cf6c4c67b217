"""The benchmarks cannot rot while no accelerator is lent: the accelerator check's CPU dry run
runs here, on a machine without TensorFlow, TFDS, grain or pycocoevalcap (as the accelerator
machines are), and must measure every row it would measure there."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A sitecustomize that makes the packages the accelerator image lacks unimportable, in the
# check's process and in the parity-test process it starts.
BLOCKER = '''
import sys
BLOCKED = {'tensorflow', 'tensorflow_datasets', 'grain', 'pycocoevalcap', 'array_record'}
class _Missing:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is not installed on the accelerator machine')
sys.meta_path.insert(0, _Missing())
'''


@pytest.mark.slow
def test_accelerator_check_dry_run_without_the_data_stack(tmp_path):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(BLOCKER)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=os.pathsep.join(
                 [str(site), REPO, os.environ.get('PYTHONPATH', '')]))
  out_dir = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, 'benchmarks/accelerator.py', '--dry_run', '--platform', 'cpu',
       '--memory_gb', '0.25', '--out', str(out_dir)],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  d = json.loads((out_dir / 'accelerator.json').read_text())
  assert d['failed'] == [] and d['env']['device_count'] == 2 and d['env']['platform'] == 'cpu'
  assert d['parity']['returncode'] == 0 and '1 passed' in d['parity']['summary']
  assert d['matmul'][0]['tflops'] > 0
  steps = d['train_step']
  assert [(r['dtype'], r['batch'], r['fsdp']) for r in steps[:2]] == [
      ('float32', 4, False), ('float32', 2, False)]
  largest = d['largest_batch'][0]
  # The fit predicts the memory of the batch it picks, within the headroom it allows.
  assert largest['batch'] > 4 and largest['batch'] % 16 == 0
  assert (steps[2]['batch'], steps[2]['dtype'], steps[2]['fsdp'], steps[2]['remat']) == (
      largest['batch'], 'bfloat16', True, 'all')
  assert steps[2]['memory_gb'] <= 0.25
  for r in steps:
    assert r['pairs_per_s'] > 0 and r['gflop_per_step'] > 0 and r['of_matmul'] > 0
  assert {r['dtype'] for r in d['captioning']} == {'float32', 'bfloat16'}
  assert all(r['pairs'] == 24 and r['captions_per_s'] > 0 for r in d['captioning'])
  assert all(r['pairs_per_s'] > 0 for r in d['embedding'])
  md = (out_dir / 'accelerator.md').read_text()
  assert '| float32 | 4 | off | off |' in md and 'Largest float32 batch' in md


def test_train_rows_size_the_largest_batch_from_an_earlier_fit():
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import measure  # pylint: disable=import-outside-toplevel  # benchmarks/measure.py
  fit = os.path.join(REPO, 'benchmarks', 'results', 'h100-2026-11-27-run1.json')
  # The H100's fit (bf16 4.24 GiB + 80.3 MiB per pair, float32 3.67 GiB + 150.7 MiB) for 90% of
  # an H200's 128.6 GiB: 1,416 and 760 pairs, the batches that ran there (checked by hand).
  rows = measure.parse_train_rows(
      ['bfloat16:largest', 'float32:largest:all', 'bfloat16:32'], fit, 128.6171875, 8)
  assert rows == [('bfloat16', 1416, ''), ('float32', 760, 'all'), ('bfloat16', 32, '')]
  # On the H100 it was fitted on, the same rule gives the batches it predicted.
  assert [b for _, b, _ in measure.parse_train_rows(
      ['bfloat16:largest', 'float32:largest'], fit, 72.845703125, 8)] == [776, 416]
  for spec, fit_json, limit, message in (
      ('float16:32', '', 80.0, 'not DTYPE:BATCH'),
      ('bfloat16:-4', '', 80.0, 'positive integer'),
      ('bfloat16:32:some', '', 80.0, 'REMAT must be'),
      ('bfloat16:largest', '', 80.0, 'needs --fit_json'),
      ('bfloat16:largest', fit, None, 'needs --fit_json'),
      ('bfloat16:largest', fit, 4.0, 'no batch of 8 fits'),
      ('bfloat16:largest', '/nonexistent.json', 80.0, 'cannot read it')):
    with pytest.raises(ValueError, match=message):
      measure.parse_train_rows([spec], fit_json, limit, 8)


def test_side_by_side_rounds_pair_each_reference_time_with_the_next_of_ours():
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import measure  # pylint: disable=import-outside-toplevel  # benchmarks/measure.py
  calls, ref, ours = [], iter([4.0, 10.0, 6.0]), iter([1.0, 5.0, 6.0])
  r = measure.alternating_rounds(lambda: calls.append('reference') or next(ref),
                                 lambda: calls.append('ours') or next(ours), 3)
  assert calls == ['reference', 'ours'] * 3
  # Ratios per round 4, 2, 1: their median 2, not the ratio of the medians (6 / 5).
  assert r['rounds']['speedup'] == [4.0, 2.0, 1.0]
  assert (r['speedup'], r['speedup_min'], r['speedup_max']) == (2.0, 1.0, 4.0)
  assert (r['reference_s'], r['ours_s']) == (6.0, 5.0)
  # A variant of ours runs after ours in each round, its ratios against the same reference.
  calls, ref, ours, var = [], iter([4.0, 10.0, 6.0]), iter([1.0, 5.0, 6.0]), iter([2.0, 2.0, 3.0])
  r = measure.alternating_rounds(lambda: calls.append('reference') or next(ref),
                                 lambda: calls.append('ours') or next(ours), 3,
                                 others={'max_len': lambda: calls.append('max_len') or next(var)})
  assert calls == ['reference', 'ours', 'max_len'] * 3 and r['speedup'] == 2.0
  assert r['others']['max_len']['rounds_speedup'] == [2.0, 5.0, 2.0]
  assert (r['others']['max_len']['speedup'], r['others']['max_len']['s']) == (2.0, 2.0)
