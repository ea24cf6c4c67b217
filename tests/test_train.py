"""Training: sharded step equivalence, optimizer recipe, resume after SIGKILL, multi-process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ml_collections
from configs import demo
from rsicrc_jax import checkpointing, optim, train, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             TF_CPP_MIN_LOG_LEVEL='3')
  env.update(extra)
  return env


@pytest.fixture(scope='module')
def sharded():
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'workers', 'sharded_step.py')],
                       capture_output=True, text=True, cwd=REPO, timeout=900,
                       env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


@pytest.mark.parametrize('single,variant', [('single', 'dp8'), ('single', 'fsdp8'),
                                            ('single_accum2', 'dp8_accum2')])
def test_eight_devices_match_one_device(sharded, single, variant):
  """Same global batch on 1 and on 8 (simulated) devices: the contrastive loss spans the global
  batch (or each microbatch with accumulation), so losses, gradients and BN statistics agree to
  float rounding."""
  one, many = sharded[single], sharded[variant]
  assert one['devices'] == 1 and many['devices'] == 8
  if variant == 'fsdp8':
    assert "P('data', None)" in many['specs']  # parameters really are split over devices
  else:
    assert many['specs'] == ['P()']
  for a, b in zip(one['losses'], many['losses']):  # two steps: params, BN stats, dropout RNG
    assert a['positive_pairs'] == b['positive_pairs']
    for k in ('loss', 'caption_loss', 'contrastive_loss', 'grad_norm'):
      assert abs(a[k] - b[k]) <= 2e-6 * abs(a[k]) + 1e-6, (k, a[k], b[k])
  # The accumulation and FSDP variants skip the full-batch gradient; their gradients show in
  # the two steps' grad_norm and, through the first update, in the second step's losses.
  assert (many['grads'] is None) == (variant != 'dp8')
  if many['grads'] is not None:
    assert one['grads'].keys() == many['grads'].keys()
    scale = max(np.abs(g).max() for g in map(np.asarray, one['grads'].values()))
    for name in one['grads']:
      g1, g8 = np.asarray(one['grads'][name]), np.asarray(many['grads'][name])
      # Relative to the tensor, plus a floor for gradients that are exactly 0 in exact
      # arithmetic (biases feeding a BatchNorm or an attention key): pure rounding on both sides.
      assert np.abs(g1 - g8).max() <= 1e-5 * np.abs(g1).max() + 1e-7 * scale, name
  for name in one['stats']:
    np.testing.assert_allclose(one['stats'][name], many['stats'][name], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_microbatches_by_hand(sharded):
  """grad_accum_steps=2 under jit = two gradient passes written out (BN statistics and dropout
  RNG carried across microbatches), averaged."""
  step, by_hand = sharded['by_hand_accum2']['step'], sharded['by_hand_accum2']['by_hand']
  assert abs(step['loss'] - by_hand['loss']) <= 1e-5 * abs(by_hand['loss'])
  scale = max(np.abs(g).max() for g in by_hand['grads'].values())
  assert scale > 0
  for name, want in by_hand['grads'].items():
    # Same tolerance as across devices: 1e-5 of the tensor's largest entry (scan vs two calls
    # fuse differently), plus a floor for entries that are 0 in exact arithmetic.
    got, want = np.asarray(step['grads'][name]), np.asarray(want)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-7 * scale, name
  for name, want in by_hand['stats'].items():
    np.testing.assert_allclose(step['stats'][name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  # Each microbatch is its own contrastive batch (8 items, not 16): a different loss.
  single, accum = sharded['single']['losses'][0], sharded['single_accum2']['losses'][0]
  assert abs(single['contrastive_loss'] - accum['contrastive_loss']) > 1e-3


def test_schedule_is_warmup_then_constant():
  c = ml_collections.ConfigDict({'learning_rate': 1e-3, 'warmup_fraction': 0.1})
  sched = optim.learning_rate_schedule(c, total_steps=100)
  # HF get_constant_schedule_with_warmup: lr * step / warmup, the first update at step 0.
  np.testing.assert_allclose([float(sched(s)) for s in (0, 1, 5, 10, 11, 99)],
                             [0.0, 1e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6, atol=1e-12)


def test_cosine_schedule_warms_up_then_decays_to_zero():
  c = ml_collections.ConfigDict({'learning_rate': 1e-3, 'warmup_fraction': 0.1,
                                 'lr_schedule': 'cosine'})
  sched = optim.learning_rate_schedule(c, total_steps=110)
  # Warmup over 11 steps, then 1e-3 * (1 + cos(pi * t / 99)) / 2 for t = step - 11.
  for step, want in ((0, 0.0), (5, 1e-3 * 5 / 11), (11, 1e-3), (11 + 33, 1e-3 * 0.75),
                     (11 + 66, 1e-3 * 0.25), (110, 0.0)):
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-9)
  c.lr_schedule = 'linear'
  with pytest.raises(ValueError, match="config.lr_schedule: expected 'constant' or 'cosine'"):
    optim.learning_rate_schedule(c, total_steps=110)


def test_frozen_parameters_are_not_in_the_optimizer():
  c = demo.get_config()
  c.model.vocab_size = 30
  model = train_state.create_model(c)
  _, (params, frozen, stats, rng) = train_state.split_model(model, fine_tune=True)
  assert set(frozen['encoder']['backbone']) == {'conv1', 'conv2', 'conv3', 'bn1', 'bn2', 'bn3',
                                                'layer1'}
  assert 'layer2' in params['encoder']['backbone'] and 'decoder' in params
  assert set(stats['encoder']['backbone']['bn1']) == {'mean', 'var'}
  _, (params_all, frozen_none, _, _) = train_state.split_model(model, fine_tune=False)
  assert 'backbone' not in params_all['encoder'] and 'layer4' in frozen_none['encoder']['backbone']


def test_incompatible_workdir_fails_clearly(tmp_path):
  c = demo.get_config()
  (tmp_path / 'config.json').write_text(c.to_json())
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  checkpointing.check_resumable(str(tmp_path), c)  # same config: fine
  c.data.num_threads = 1  # not part of the run's identity
  checkpointing.check_resumable(str(tmp_path), c)
  c.model.d_model = 128
  c.batch_size = 8
  with pytest.raises(checkpointing.TrainingError, match=r'incompatible config \(config.batch_size: '
                     r'workdir has 32, config has 8; config.model.d_model: workdir has 192'):
    checkpointing.check_resumable(str(tmp_path), c)


def test_a_workdir_without_checkpoints_never_blocks_a_run(tmp_path):
  """A launch that failed before its first checkpoint left config.json: the corrected command
  (another config) starts afresh there."""
  c = demo.get_config()
  (tmp_path / 'config.json').write_text(c.to_json())
  (tmp_path / 'checkpoints').mkdir()
  c.batch_size = 8
  checkpointing.check_resumable(str(tmp_path), c)
  (tmp_path / 'checkpoints' / '5').mkdir()
  with pytest.raises(checkpointing.TrainingError, match='config.batch_size'):
    checkpointing.check_resumable(str(tmp_path), c)


def test_resume_check_compares_every_field_it_does_not_ignore(tmp_path):
  c = demo.get_config()
  (tmp_path / 'config.json').write_text(c.to_json())
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  c.evals.val_caption.every_epochs = 5  # how the run is observed: listed in RESUME_IGNORES
  c.checkpoint.keep = 7
  checkpointing.check_resumable(str(tmp_path), c)
  with c.unlocked():
    c.loss.brand_new_knob = 0.5  # a field nobody listed anywhere is checked by default
  with pytest.raises(checkpointing.TrainingError, match=r'config.loss.brand_new_knob: workdir has None, '
                     r'config has 0.5'):
    checkpointing.check_resumable(str(tmp_path), c)


def test_a_run_from_before_cut_captions_resumes_at_max_len(tmp_path):
  """A workdir written before config.data.caption_pad_multiple existed trained on max_len
  captions: it resumes with 0, and with levir.py's 8 the check names the field (dropout masks
  would be drawn for other shapes)."""
  from configs import levir
  c = levir.get_config()
  old = c.to_dict()
  del old['data']['caption_pad_multiple']
  (tmp_path / 'config.json').write_text(json.dumps(old, default=str))
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  with pytest.raises(checkpointing.TrainingError,
                     match=r'config.data.caption_pad_multiple: workdir has 0, config has 8'):
    checkpointing.check_resumable(str(tmp_path), c)
  c.data.caption_pad_multiple = 0
  checkpointing.check_resumable(str(tmp_path), c)


TINY = os.path.join(REPO, 'tests', 'configs', 'tiny.py')


def _tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location('tiny_config', TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tiny_batch(c, caption_slots: int = 0) -> dict:
  """A host batch for the tiny config: captions of 2 to 8 words padded to max_len (41), or cut
  to `caption_slots` as the pipeline cuts them (config.data.caption_pad_multiple)."""
  from rsicrc_jax.data import pipeline
  rng = np.random.default_rng(0)
  n, s, length = c.batch_size, c.model.image_size, c.model.max_len
  tokens = np.zeros((n, length), np.int32)
  for i in range(n):
    words = 2 + i % 7
    tokens[i, 0], tokens[i, 1:words + 1], tokens[i, words + 1] = 1, rng.integers(4, 40, words), 3
  if caption_slots:
    tokens = pipeline.cut_captions({'tokens': tokens}, caption_slots)['tokens']
  return {'image_a': rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
          'image_b': rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), 'tokens': tokens,
          'flag': np.where(np.arange(n) % 3 == 0, -1, np.arange(n)).astype(np.int32),
          'caption_id': np.arange(n, dtype=np.int32)}


def _tiny_setup(**model_overrides):
  c = _tiny_config()
  c.model.vocab_size = 40
  c.model.update(model_overrides)
  c.warmup_fraction = 0.0  # the reference's warmup makes the first update lr 0
  opt = optim.make_optimizer(c, total_steps=10)
  graphdef, state = train_state.init_state(c, opt)
  return c, opt, graphdef, state


def _one_tiny_step(**model_overrides):
  """(state before, state after, aux) of one jitted train step of the tiny config."""
  import jax
  from rsicrc_jax import sharding
  c, opt, graphdef, state = _tiny_setup(**model_overrides)
  step = jax.jit(train.make_train_step(graphdef, c, opt))
  new, aux = step(state, sharding.global_batch(_tiny_batch(c), sharding.make_mesh(c)))
  return state, new, aux


@pytest.fixture(scope='module')
def one_tiny_step():
  return _one_tiny_step()


def test_one_jitted_step_moves_trainable_parameters_only(one_tiny_step):
  """The tiny config's train step, in process: finite losses; every trainable tensor changes;
  the frozen stem and layer1 do not; BatchNorm statistics (frozen layers' too) update."""
  import jax
  import jax.numpy as jnp
  state, new, aux = one_tiny_step
  n = _tiny_config().batch_size
  assert all(np.isfinite(float(v)) for v in aux.values()), aux
  assert int(aux['positive_pairs']) >= n and int(new.step) == 1
  leaves = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  name = lambda p: jax.tree_util.keystr(p, simple=True, separator='/')
  moved = {name(p): not np.array_equal(a, b) for (p, a), (_, b) in
           zip(leaves(state.params), leaves(new.params))}
  assert moved and all(moved.values()), [k for k, v in moved.items() if not v]
  assert 'encoder/backbone/layer1' not in ' '.join(moved)
  frozen = [(name(p), a, b) for (p, a), (_, b) in zip(leaves(state.frozen), leaves(new.frozen))]
  assert any(k.startswith('encoder/backbone/layer1') for k, _, _ in frozen)
  for k, a, b in frozen:
    np.testing.assert_array_equal(a, b, err_msg=k)
  stats = {name(p): not np.array_equal(a, b) for (p, a), (_, b) in
           zip(leaves(state.batch_stats), leaves(new.batch_stats))}
  assert stats['encoder/backbone/bn1/mean']  # a frozen BatchNorm still updates in train mode
  assert jnp.asarray(aux['grad_norm']) > 0


def test_remat_recomputes_the_same_step(one_tiny_step):
  """config.model.remat='all' (backbone bottlenecks and encoder blocks recomputed in the
  backward pass): the same losses, updated parameters, BN statistics and dropout RNG state."""
  import jax
  _, plain, aux = one_tiny_step
  _, remat, aux_remat = _one_tiny_step(remat='all')
  for k in aux:
    np.testing.assert_allclose(float(aux_remat[k]), float(aux[k]), rtol=1e-5, err_msg=k)
  for part in ('params', 'batch_stats', 'rng'):
    a, b = jax.tree.leaves(getattr(plain, part)), jax.tree.leaves(getattr(remat, part))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6, err_msg=part)


def test_launched_step_copies_no_donated_parameter_and_trains_the_same(one_tiny_step):
  """train.jit_train_step, the step launch.py runs, compiles on the CPU with
  xla_options.TRAIN_CPU: with region analysis, XLA's copy insertion writes each new parameter
  into its donated buffer without first copying the old one, as XLA's default does for every
  parameter. The step's losses and new state are those of a plain jit of the same step."""
  import jax
  from rsicrc_jax import sharding, xla_options
  _, plain, aux = one_tiny_step
  c, opt, graphdef, state = _tiny_setup()
  mesh = sharding.make_mesh(c)
  state_sh = sharding.state_sharding(state, mesh, False)
  step = train.jit_train_step(graphdef, c, opt, state_sh, sharding.batch_sharding(mesh))
  batch = sharding.global_batch(_tiny_batch(c), mesh)

  def parameter_copies(jitted):
    text = jitted.lower(state, batch).compile().as_text()
    return len(re.findall(r'= \S+ copy\(%state_params', text[text.index('\nENTRY'):]))

  assert step.cpu_options == xla_options.TRAIN_CPU == {
      'xla_cpu_copy_insertion_use_region_analysis': True}
  assert parameter_copies(step._plain) > 0  # pylint: disable=protected-access
  assert parameter_copies(step) == 0
  new, aux_new = step(state, batch)  # donates `state`
  assert step._tuned_ok  # pylint: disable=protected-access
  for k in aux:
    np.testing.assert_allclose(float(aux_new[k]), float(aux[k]), rtol=1e-6, err_msg=k)
  for part in ('params', 'opt_state', 'batch_stats', 'rng'):
    a, b = jax.tree.leaves(getattr(plain, part)), jax.tree.leaves(getattr(new, part))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7, err_msg=part)


def test_captions_cut_to_the_batch_longest_train_the_same_step():
  """config.data.caption_pad_multiple: captions cut from 41 slots to 16 (the batch's longest, 10
  slots, rounded up to 8) give the same losses, gradients and BN statistics to float rounding:
  the cut slots are PAD, masked in attention and ignored by the losses. Without dropout, whose
  masks are drawn for the step's shape (the two shapes draw different ones)."""
  import jax
  c, _, graphdef, state = _tiny_setup(dropout=0.0)
  grad_fn = jax.jit(train.make_grad_fn(graphdef, c))
  run = lambda slots: grad_fn(state.params, state.frozen, state.batch_stats, state.rng,
                              _tiny_batch(c, slots))
  (loss, (aux, stats, _)), grads = run(0)
  (loss_cut, (aux_cut, stats_cut, _)), grads_cut = run(16)
  for k in aux:
    np.testing.assert_allclose(float(aux_cut[k]), float(aux[k]), rtol=1e-5, err_msg=k)
  g, g_cut = jax.tree.leaves(grads), jax.tree.leaves(grads_cut)
  scale = max(float(np.abs(x).max()) for x in g)
  assert len(g) == len(g_cut) > 0 and scale > 0
  for x, y in zip(g, g_cut):
    # As across devices: 1e-5 of the tensor, plus a floor for gradients that are 0 in exact
    # arithmetic (biases before a BatchNorm or an attention key): rounding on both sides.
    assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-5 * np.abs(x).max() + 1e-7 * scale
  for x, y in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_cut)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_best_metric_must_be_produced_by_an_evaluator():
  from rsicrc_jax import evaluators
  c = demo.get_config()
  names = ['val/loss', 'val/retrieval/changed/R@10', 'val/caption/CIDEr-D']

  class Fake:
    def metric_names(self):
      return names
  evaluators.check_best_metric(c, [Fake()])  # the demo's val/retrieval/changed/R@10
  assert evaluators.best_is_max(c)
  c.best_metric = 'val/loss'
  assert not evaluators.best_is_max(c)
  c.best_metric = 'val/changed/R@10'
  with pytest.raises(ValueError, match=r"config.best_metric: no evaluator in config.evals "
                     r"yields 'val/changed/R@10'; did you mean one of "
                     r"\['val/retrieval/changed/R@10'\]"):
    evaluators.check_best_metric(c, [Fake()])
  c.best_metric_mode = 'largest'
  with pytest.raises(ValueError, match='config.best_metric_mode'):
    evaluators.best_is_max(c)
  with pytest.raises(ValueError, match=r"config.evals.x.type: expected one of \['loss', "):
    evaluators.check_entry('x', {'type': 'bleu'})
  with pytest.raises(ValueError, match=r"config.evals.x: unknown fields \['beam_size'\]"):
    evaluators.check_entry('x', {'type': 'retrieval', 'beam_size': 3})


# ----------------------------------------------------------------------------------------------
# Whole runs through launch.py on the tiny synthetic dataset.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The tiny synthetic dataset, built once (launch.py would build it too, per process 0)."""
  from rsicrc_jax.data import pipeline
  d = tmp_path_factory.mktemp('tfds')
  cfg = dict(demo.get_config().data.to_dict(), data_dir=str(d),
             builder_config={'name': 'tiny', 'image_size': 64, 'num_train': 40, 'num_val': 12,
                             'num_test': 12, 'change_fraction': 0.5})
  pipeline.open_dataset(cfg, build_if_missing=True)
  return d


def launch(workdir, data_dir, *extra, wait=True, log=None, env=None):
  """Runs launch.py; output goes to a file (a pipe nobody drains could block the process)."""
  cmd = [sys.executable, os.path.join(REPO, 'launch.py'), f'--config={TINY}',
         f'--config.data.data_dir={data_dir}', f'--workdir={workdir}', *extra]
  log = log or f'{workdir}.log'
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(**(env or {})), stdout=f,
                            stderr=subprocess.STDOUT)
  proc.log = log
  if not wait:
    return proc
  proc.wait(timeout=900)
  out = open(log).read()
  assert proc.returncode == 0, out[-4000:]
  return out


def train_losses(workdir):
  """step -> the train losses logged at that step."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if rec['split'] == 'train':
        assert rec['step'] not in out, f'step {rec["step"]} logged twice'
        out[rec['step']] = (rec['loss'], rec['caption_loss'], rec['contrastive_loss'])
  return out


def assert_same_metric_rows(workdir, reference, rtol=1e-6):
  """metrics.jsonl of `workdir` holds the rows of `reference`'s, in order, with the same values
  (throughput aside): a resumed run reads as if it had never stopped."""
  def rows(w):
    with open(os.path.join(w, 'metrics.jsonl')) as f:
      return [{k: v for k, v in json.loads(l).items() if k != 'pairs_per_s'} for l in f]
  got, want = rows(workdir), rows(reference)
  assert [(r['step'], r['split']) for r in got] == [(r['step'], r['split']) for r in want]
  for g, w in zip(got, want):
    assert g.keys() == w.keys(), (g['step'], g['split'])
    keys = sorted(k for k in g if k != 'split')
    np.testing.assert_allclose([g[k] for k in keys], [w[k] for k in keys], rtol=rtol,
                               err_msg=f'step {g["step"]} {g["split"]}')


def final_history(workdir):
  """The per-epoch history in the last checkpoint's progress."""
  step = max(checkpointing.checkpoint_steps(str(workdir)))
  with open(os.path.join(workdir, 'checkpoints', str(step), 'progress', 'metadata')) as f:
    return json.load(f)['history']


def truncate_largest_file(folder):
  files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
  path = max(files, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)
  return path


def val_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if r['split'] == 'val'}


@pytest.fixture(scope='module')
def baseline(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('baseline')
  out = launch(workdir, data_dir)
  assert 'done: step 50' in out
  return workdir


def val_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['split'] == 'val'}


def test_uninterrupted_run_writes_what_a_person_needs(baseline):
  log = open(f'{baseline}.log').read()
  info = [l for l in log.splitlines() if re.match(r'[IW]\d{4} ', l)]
  assert not info, info[:5]  # no INFO lines, no meaningless warnings by default
  losses = train_losses(baseline)
  assert sorted(losses) == list(range(1, 51))
  assert sorted(val_losses(baseline)) == [25, 50]
  assert os.listdir(os.path.join(baseline, 'tensorboard'))
  from rsicrc_jax import model_io
  model = model_io.load_model(os.path.join(baseline, 'best'))  # the best model is a model dir
  assert model.decoder is not None
  # Every evaluator of the config wrote its metrics into the epoch's val row.
  rows = val_rows(baseline)
  for row in rows.values():
    assert {'loss', 'contrastive_loss', 'retrieval/R@10', 'retrieval/changed/R@10',
            'retrieval/changed/pair_to_text/R@1', 'caption/BLEU-4', 'caption/changed/CIDEr-D'
            } <= set(row)
  # best/ holds the step with the highest val changed-pair R@10 (config.best_metric); the first
  # one on ties, since only a strict improvement replaces it.
  scores = [(rows[s]['retrieval/changed/R@10'], -s) for s in sorted(rows)]
  best_step = -max(scores)[1]
  saved = [d for d in os.listdir(os.path.join(baseline, 'best')) if d.isdigit()]
  assert saved == [str(best_step)], (saved, scores)
  # The run's vocabulary beside its config: what `predict` needs to use best/ without the data.
  from rsicrc_jax import predict  # pylint: disable=import-outside-toplevel
  vocab, source = predict.find_vocabulary(os.path.join(baseline, 'best'))
  assert source == os.path.join(baseline, 'vocab.json') and vocab['houses'] > 3


def test_eval_command_and_training_evaluators_agree(baseline, data_dir, tmp_path):
  """`eval` on best/ over the val split reproduces the in-training evaluators' numbers at the
  step best/ was saved: one implementation of embedding, decoding and scoring."""
  rows = val_rows(baseline)
  step = int(next(d for d in os.listdir(os.path.join(baseline, 'best')) if d.isdigit()))
  out_dir = tmp_path / 'eval_val'
  out = subprocess.run([sys.executable, '-m', 'rsicrc_jax.eval', f'--config={TINY}',
                        f'--config.data.data_dir={data_dir}', f'--checkpoint={baseline}/best',
                        '--config.eval.split=val', '--config.eval.num_figures=0',
                        '--config.eval.meteor=False', '--config.eval.batch_size=8',
                        f'--out={out_dir}'], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(out_dir / 'metrics.json'))['results']
  for subset, key in (('all', ''), ('changed', 'changed/')):
    for m in ('R@1', 'R@10', 'MRR@5'):
      np.testing.assert_allclose(report[subset]['text_to_pair'][m],
                                 rows[step][f'retrieval/{key}{m}'], atol=1e-6)
    for m in ('BLEU-4', 'CIDEr-D'):
      np.testing.assert_allclose(report[subset]['captioning'][m],
                                 rows[step][f'caption/{key}{m}'], atol=1e-6)


def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(baseline, data_dir, tmp_path):
  workdir = tmp_path / 'killed'
  proc = launch(workdir, data_dir, wait=False)
  ckpts = workdir / 'checkpoints'
  deadline = time.time() + 600
  while time.time() < deadline:
    steps = [int(d) for d in (os.listdir(ckpts) if ckpts.exists() else []) if d.isdigit()]
    if any(10 <= s < 25 for s in steps):
      break
    assert proc.poll() is None, open(proc.log).read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # mid-epoch 1, after the step-10 (or 15/20) checkpoint
  proc.wait()
  killed_at = max(train_losses(workdir))
  assert killed_at < 50
  out = launch(workdir, data_dir)
  assert 'done: step 50' in out
  want, got = train_losses(baseline), train_losses(workdir)
  assert sorted(got) == list(range(1, 51))
  for step in range(1, 51):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f'step {step}')
  assert_same_metric_rows(workdir, baseline)  # the replayed steps' rows are not duplicated


def test_sigterm_saves_the_current_step_and_the_rerun_matches(baseline, data_dir, tmp_path):
  """SIGTERM (a preemption) mid-epoch: the run saves a checkpoint at the step in flight, says
  how to resume and exits 143; the rerun's metrics and history equal the uninterrupted run's."""
  workdir = tmp_path / 'preempted'
  # Saves every 0.3 s of wall clock as well: how often a run saves changes nothing it computes.
  proc = launch(workdir, data_dir, '--config.checkpoint.every_minutes=0.005', wait=False)
  deadline, seen = time.time() + 600, set()
  while time.time() < deadline:
    rows = (workdir / 'metrics.jsonl').read_text() if (workdir / 'metrics.jsonl').exists() else ''
    seen.update(checkpointing.checkpoint_steps(str(workdir)))
    if '"step": 8,' in rows:  # mid-epoch 1, between the every-5-steps checkpoints
      break
    assert proc.poll() is None, open(proc.log).read()[-3000:]
    time.sleep(0.05)
  assert seen - {5, 10}, seen  # time-based saves between the every-5-steps ones
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = open(proc.log).read()
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  match = re.search(r'stopped by SIGTERM at step (\d+); checkpoint saved in (\S+)\. Run the same '
                    r'command again to resume from it\.', out)
  assert match, out[-3000:]
  stopped_at = int(match.group(1))
  assert 8 <= stopped_at < 25 and 'Traceback' not in out
  assert max(checkpointing.checkpoint_steps(str(workdir))) == stopped_at
  assert max(train_losses(workdir)) == stopped_at
  out = launch(workdir, data_dir, '--config.checkpoint.every_minutes=0.005')
  assert 'done: step 50' in out
  assert_same_metric_rows(workdir, baseline)
  np.testing.assert_allclose(
      [h['train/loss'] for h in final_history(workdir)],
      [h['train/loss'] for h in final_history(baseline)], rtol=1e-6)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(baseline, data_dir, tmp_path):
  workdir = tmp_path / 'damaged'
  shutil.copytree(baseline, workdir)
  newest = max(checkpointing.checkpoint_steps(str(workdir)))
  older = min(checkpointing.checkpoint_steps(str(workdir)))
  assert older < newest
  truncate_largest_file(workdir / 'checkpoints' / str(newest) / 'state')
  out = launch(workdir, data_dir)  # the finished run: it replays the steps after `older`
  assert f'checkpoints/{newest} is damaged and will not be used' in out
  assert f'resuming from step {older}, the newest intact checkpoint' in out
  assert f'done: step {newest}' in out and 'Traceback' not in out
  moved = os.listdir(workdir / 'damaged_checkpoints')
  assert len(moved) == 1 and moved[0].startswith(f'{newest}-')
  assert newest in checkpointing.checkpoint_steps(str(workdir))  # saved afresh
  assert_same_metric_rows(workdir, baseline)


def test_eval_refuses_a_damaged_model_dir_in_one_line(baseline, data_dir, tmp_path):
  best = tmp_path / 'best'
  shutil.copytree(baseline / 'best', best)
  truncate_largest_file(best)
  out = subprocess.run([sys.executable, '-m', 'rsicrc_jax.eval', f'--config={TINY}',
                        f'--config.data.data_dir={data_dir}', f'--checkpoint={best}'],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert ('the saved weights cannot be read; the files are damaged or incomplete'
          in out.stderr), out.stderr[-3000:]
  assert 'Traceback' not in out.stderr and len(out.stderr.strip().splitlines()) <= 3, out.stderr


def test_two_processes_agree_with_one_and_stop_together_on_sigterm(baseline, data_dir, tmp_path):
  """Two local processes (one CPU device each, gloo collectives) train on the same global
  batches, each reading its half. A preemption notice reaches one of them: both save the same
  step and stop; the relaunch of both finishes the run with every step logged once, and the
  losses equal the single-process run's. (One two-process run serves both checks: each costs
  about two minutes on 2 cores.)"""
  import portpicker

  def start(tag):
    port = portpicker.pick_unused_port()
    return [launch(workdir, data_dir, f'--coordinator_address=localhost:{port}',
                   '--num_processes=2', f'--process_id={i}', wait=False,
                   log=str(tmp_path / f'{tag}{i}.log')) for i in range(2)]

  workdir = tmp_path / 'two'
  procs = start('first')
  deadline = time.time() + 600
  while time.time() < deadline:
    rows = (workdir / 'metrics.jsonl').read_text() if (workdir / 'metrics.jsonl').exists() else ''
    if '"step": 8,' in rows:
      break
    assert all(p.poll() is None for p in procs), open(procs[0].log).read()[-3000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  for p in procs:
    p.wait(timeout=300)
  outs = [open(p.log).read() for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  stopped_at = int(re.search(r'stopped by SIGTERM at step (\d+)', outs[0]).group(1))
  assert 8 <= stopped_at < 25
  assert max(checkpointing.checkpoint_steps(str(workdir))) == stopped_at
  procs = start('second')
  for p in procs:
    p.wait(timeout=900)
  outs = [open(p.log).read() for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert '2 devices over 2 processes' in outs[0] and 'done: step 50' in outs[0]
  want, got = train_losses(baseline), train_losses(workdir)
  assert sorted(got) == list(range(1, 51))  # each step once
  # The cross-process all-reduce sums in another order than one process does: the first steps
  # agree to float rounding; later, temperature-0.01 logits amplify those last bits, so the
  # trajectories stay close but no longer bit-identical.
  for step in range(1, 4):
    np.testing.assert_allclose(got[step], want[step], rtol=2e-5, atol=1e-6,
                               err_msg=f'step {step}')
  for epoch in range(2):
    steps = range(25 * epoch + 1, 25 * epoch + 26)
    np.testing.assert_allclose(np.mean([got[s][0] for s in steps]),
                               np.mean([want[s][0] for s in steps]), rtol=5e-3)
  vw, vg = val_losses(baseline), val_losses(workdir)
  assert vg.keys() == vw.keys()
  np.testing.assert_allclose([vg[s] for s in vw], [vw[s] for s in vw], rtol=2e-2)


def test_eval_command_on_the_trained_run(baseline, data_dir, tmp_path):
  """`python -m rsicrc_jax.eval --workdir RUN` end to end: metrics, table, captions, figures."""
  out_dir = tmp_path / 'eval'
  out = subprocess.run([sys.executable, '-m', 'rsicrc_jax.eval', f'--workdir={baseline}',
                        f'--out={out_dir}', '--config.eval.num_figures=2'], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(out_dir / 'metrics.json'))
  allp = report['results']['all']
  assert allp['pairs'] == 12
  assert {'BLEU-1', 'BLEU-4', 'ROUGE-L', 'CIDEr-D'} <= set(allp['captioning'])
  assert set(allp['text_to_pair']) == {f'{m}@{k}' for m in ('P', 'R', 'MRR')
                                      for k in (1, 3, 5, 10)}
  # The literature's hit rates both ways and their mean (SPEC section 13).
  six = [allp[d][f'R@{k}'] for d in ('text_to_pair_hit', 'pair_to_text') for k in (1, 5, 10)]
  assert allp['mR'] == pytest.approx(np.mean(six))
  assert report['caption_protocol'] == 'reference'
  assert '| caption -> pair |' in out.stdout
  assert 0 < report['results']['changed']['pairs'] < 12
  lines = [json.loads(l) for l in open(out_dir / 'captions.jsonl')]
  assert len(lines) == 12 and all(len(l['references']) == 5 for l in lines)
  assert '| BLEU-1 |' in out.stdout and (out_dir / 'metrics.md').exists()
  figures = sorted(os.listdir(out_dir / 'figures'))
  assert len(figures) == 2
  drawn = [lines[int(f.split('_')[0])]['changed'] for f in figures]  # <pair index>_<name>.png
  assert sorted(drawn) == [False, True]  # a no-change pair among the drawn examples


def test_eval_says_what_to_run(baseline, data_dir, tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, '-m', 'rsicrc_jax.eval', f'--config={TINY}',
                           f'--checkpoint={baseline}/best', *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
  out = run(f'--config.data.data_dir={tmp_path}')  # nothing built there
  assert out.returncode != 0
  assert 'is not built under' in out.stderr and 'tfds build datasets/synthetic_cc' in out.stderr
  out = run(f'--config.data.data_dir={data_dir}', '--config.model.d_model=32')
  assert out.returncode != 0
  assert 'cannot load' in out.stderr and 'config.model expects' in out.stderr


# ----------------------------------------------------------------------------------------------
# Hard-negative mining (config.hard_negatives): the batches, exact resume, 8 devices.

# With captions cut (to 16 or 32 slots, or 41), so the mined runs also check that the cut batches
# and their negatives, padded to one length, resume exactly.
MINING = ('--config.hard_negatives=1', '--config.batch_size=16', '--config.checkpoint.every_steps=3',
          '--config.checkpoint.keep=20', '--config.data.caption_pad_multiple=16')
MINED_STEPS = 24  # 2 epochs of 12 steps: 200 items / 16


def test_mined_batches_follow_the_table(data_dir):
  """Each item's n table entries follow the step's items in order, on every process's slice."""
  from rsicrc_jax.data import pipeline
  ds = pipeline.open_dataset(dict(
      demo.get_config().data.to_dict(), data_dir=str(data_dir),
      builder_config={'name': 'tiny', 'image_size': 64, 'num_train': 40, 'num_val': 12,
                      'num_test': 12, 'change_fraction': 0.5}))
  kw = dict(max_len=41, image_size=64, seed=3)
  base, plan = pipeline.make_batches(ds, 'train', global_batch=8, train=True, num_epochs=2, **kw)
  items = pipeline.train_items(ds, 41)
  table = np.random.default_rng(0).integers(-1, len(items), (len(items), 2)).astype(np.int32)
  epoch, start = 1, 3
  got = [pipeline.mined_batches(ds, plan, table, epoch=epoch, start_step=start, process_index=p,
                                process_count=2, **kw)[0] for p in (0, 1)]
  # The step's item rows (the epoch's shuffled order), checked against the base batch.
  order = pipeline._item_order(len(items), True, 3, 2)  # pylint: disable=protected-access
  base_rows = [order[epoch * len(items) + start * 8 + i] for i in range(8)]
  np.testing.assert_array_equal(items[base_rows, 0],
                                base[epoch * plan.steps_per_epoch + start]['pair_index'])
  expected = table[base_rows].reshape(-1)  # item 0's two negatives, item 1's, ...
  pairs = np.concatenate([g['pair_index'] for g in got])
  valid = np.concatenate([g['valid'] for g in got])
  np.testing.assert_array_equal(valid, expected >= 0)
  np.testing.assert_array_equal(pairs[valid], items[expected[valid], 0])
  assert got[0]['image_a'].shape == (8, 64, 64, 3)  # 4 items x 2 negatives per process
  # Cut captions: every process cuts to the longest of all processes' mined items, rounded up.
  cut = [pipeline.mined_batches(ds, plan, table, epoch=epoch, start_step=start, process_index=p,
                                process_count=2, caption_pad_multiple=4, **kw)[0] for p in (0, 1)]
  tokens = np.concatenate([g['tokens'] for g in got])
  length = min(-(-int((tokens != 0).sum(axis=1).max()) // 4) * 4, 41)
  assert cut[0]['tokens'].shape == cut[1]['tokens'].shape == (8, length) and length < 41
  np.testing.assert_array_equal(np.concatenate([c['tokens'] for c in cut]), tokens[:, :length])
  with pytest.raises(Exception, match='mining table has 3 rows'):
    pipeline.mined_batches(ds, plan, table[:3], epoch=0, start_step=0, **kw)


@pytest.fixture(scope='module')
def mined_baseline(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mined')
  assert f'done: step {MINED_STEPS}' in launch(workdir, data_dir, *MINING)
  return workdir


def _mined_tables(workdir):
  ckpt = checkpointing.Checkpoints(str(workdir), keep=10)
  try:
    return {s: ckpt.mining_table(s) for s in checkpointing.checkpoint_steps(str(workdir))}
  finally:
    ckpt.close()


def test_mining_runs_on_every_epoch_and_doubles_the_batch(mined_baseline):
  with open(os.path.join(mined_baseline, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  mined = [r for r in rows if r['split'] == 'mining']
  assert [r['step'] for r in mined] == [1, 13]  # the first step each table serves
  assert all(0 < r['negatives_found'] <= 1 for r in mined)
  tables = _mined_tables(mined_baseline)
  assert tables[MINED_STEPS].shape == (200, 1)  # one negative per train item
  # A new table each epoch: the model changed; within an epoch the same one is saved.
  assert not np.array_equal(tables[12], tables[MINED_STEPS])
  np.testing.assert_array_equal(tables[15], tables[MINED_STEPS])
  # pairs/s counts the mined items too: 16 * (1 + 1) per step.
  log = open(f'{mined_baseline}.log').read()
  assert 'train: embed' in log


def test_resume_after_sigkill_with_mining_trains_on_the_same_negatives(
    mined_baseline, data_dir, tmp_path):
  workdir = tmp_path / 'mined_killed'
  proc = launch(workdir, data_dir, *MINING, wait=False)
  ckpts, deadline = workdir / 'checkpoints', time.time() + 600
  while time.time() < deadline:  # mid-epoch 2: the table restored is the second epoch's
    steps = [int(d) for d in (os.listdir(ckpts) if ckpts.exists() else []) if d.isdigit()]
    if any(12 < s < MINED_STEPS for s in steps):
      break
    assert proc.poll() is None, open(proc.log).read()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = max(checkpointing.checkpoint_steps(str(workdir)))
  assert 12 < resumed_from < MINED_STEPS, resumed_from
  assert f'done: step {MINED_STEPS}' in launch(workdir, data_dir, *MINING)
  want, got = train_losses(mined_baseline), train_losses(workdir)
  assert sorted(got) == list(range(1, MINED_STEPS + 1))
  for step in range(1, MINED_STEPS + 1):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f'step {step}')
  assert_same_metric_rows(workdir, mined_baseline)
  np.testing.assert_array_equal(_mined_tables(workdir)[MINED_STEPS],
                                _mined_tables(mined_baseline)[MINED_STEPS])
