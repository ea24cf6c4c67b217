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
