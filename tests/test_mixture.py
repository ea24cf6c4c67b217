"""Training on several datasets at once (config.data.name 'levir_cc:3,whu_cdc:1'): one merged
vocabulary, caption ids and flags that stay apart, deterministic and resumable mixing, and
evaluation per dataset."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rsicrc_jax import config_check, eval as eval_lib, train
from rsicrc_jax.data import builders
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline
from data_helpers import make_levir_tree

MIX = 'levir_cc:3,whu_cdc:1'


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A LEVIR-CC and a WHU-CDC download in miniature, built into one data_dir."""
  root = tmp_path_factory.mktemp('mixture')
  entries = {}
  for name, cls, file, sizes, masks in (
      ('levir_cc', builders.LevirCCBuilder, 'LevirCCcaptions.json',
       (('train', 6), ('val', 4), ('test', 2)), None),
      ('whu_cdc', builders.WhuCDCBuilder, 'whuCCcaptions.json',
       (('train', 4), ('val', 2), ('test', 2)), (255,))):
    entries[name] = make_levir_tree(root / name, sizes=sizes, captions_file=file,
                                    mask_values=masks)
    cls(data_dir=str(root / 'data')).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root / name)))
  return root / 'data', entries


def _open(data_dir, name=MIX):
  return pipeline.open_dataset({'name': name, 'data_dir': str(data_dir)})


def test_names_parse_with_weights_and_bad_ones_are_named():
  assert pipeline.parse_names('levir_cc') == [('levir_cc', 1.0)]
  assert pipeline.parse_names('levir_cc:3, whu_cdc') == [('levir_cc', 3.0), ('whu_cdc', 1.0)]
  for bad, message in (('levir_cc:0', r'the weight of levir_cc must be a positive number, got '
                                      r"'0'"),
                       ('levir_cc,levir', r"unknown dataset 'levir'"),
                       ('whu_cdc,whu_cdc:2', r'whu_cdc is listed twice'),
                       ('levir_cc:x', r"got 'x'")):
    with pytest.raises(cap.DataError, match=message):
      pipeline.parse_names(bad)


def test_one_vocabulary_by_the_spec_rule_and_one_id_per_caption_text(built):
  data_dir, entries = built
  mix = _open(data_dir)
  # The SPEC rule over both datasets' captions, in order: LEVIR-CC's, then WHU-CDC's.
  tokens = [s['tokens'] for n in ('levir_cc', 'whu_cdc') for e in entries[n]
            for s in e['sentences']]
  assert mix.vocab == cap.build_vocabulary(tokens, 5)
  assert all(m.vocab is mix.vocab for m in mix.members)
  # Same text in both datasets, same id; different texts, different ids.
  id_of = {}
  for m in mix.members:
    batches, _ = pipeline.make_batches(m, 'train', global_batch=2, max_len=41, image_size=32,
                                       train=False, with_references=True)
    for batch in batches:
      for refs, ids in zip(batch['references'], batch['all_caption_ids']):
        for r, i in zip(refs, ids):
          id_of.setdefault(cap.normalize_caption(str(r)), set()).add(int(i))
  assert all(len(ids) == 1 for ids in id_of.values())
  assert len({next(iter(v)) for v in id_of.values()}) == len(id_of)
  no_change = {next(iter(id_of[s])) for s in cap.NO_CHANGE_SENTENCES}
  assert len(no_change) == 5  # in both datasets, one id each


def test_mixing_follows_the_weights_deterministically_and_resumes_exactly(built):
  data_dir, _ = built
  mix = _open(data_dir)
  kw = dict(global_batch=4, max_len=41, image_size=32, train=True, seed=3, num_epochs=3)
  batches, plan = pipeline.make_batches(mix, 'train', **kw)
  assert plan.num_items == 50 and plan.steps_per_epoch == 12  # 30 + 20 items per epoch
  flags = np.concatenate([b['flag'] for b in batches])
  levir = ((flags >= 0) & (flags < pipeline.MEMBER_STRIDE)).sum()
  whu = (flags >= pipeline.MEMBER_STRIDE).sum()
  # Half of each dataset's pairs changed: 3:1 by weight shows in the changed items.
  assert 0.68 <= levir / (levir + whu) <= 0.82, (levir, whu)
  again, _ = pipeline.make_batches(mix, 'train', **kw)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image_a'], b['image_a'])
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  it = pipeline.iterate(batches, num_threads=2)
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = next(it)
  resumed = pipeline.iterate(again, num_threads=2)
  resumed.set_state(state)
  got = next(resumed)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  # Two processes read halves of the same global batches.
  halves = [pipeline.make_batches(mix, 'train', process_index=p, process_count=2, **kw)[0]
            for p in (0, 1)]
  for step in (0, 13, 30):
    np.testing.assert_array_equal(
        np.concatenate([h[step]['tokens'] for h in halves]), batches[step]['tokens'])


def test_mining_on_a_mixture_is_refused_by_name():
  from configs import demo
  c = demo.get_config()
  c.data.name, c.hard_negatives = MIX, 1
  with pytest.raises(config_check.ConfigError, match=r"config.hard_negatives=1 with the "
                     r"mixture config.data.name='levir_cc:3,whu_cdc:1': mining runs on one"):
    config_check.validate(c)


def test_training_on_a_mixture_evaluates_each_dataset(built, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'tiny_config', os.path.join(os.path.dirname(__file__), 'configs', 'tiny.py'))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  data_dir, _ = built
  c = tiny.get_config()
  c.data.name, c.data.data_dir = MIX, str(data_dir)
  c.data.builder_config = {}
  c.epochs, c.batch_size, c.checkpoint.every_steps = 1, 8, 0
  c.best_metric = 'val/loss'  # the members' val losses, weighted by their items
  c.evals = {k: v for k, v in c.evals.items() if v.type != 'caption'}
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(c, workdir)
  (epoch,) = result.history
  for name in ('levir_cc', 'whu_cdc'):
    assert np.isfinite(epoch[f'val/{name}/loss'])
    assert 0 <= epoch[f'val/{name}/retrieval/changed/R@10'] <= 1
  n_levir, n_whu = 4, 2  # val pairs; the first caption of each is the item
  want = (n_levir * epoch['val/levir_cc/loss'] + n_whu * epoch['val/whu_cdc/loss']) / 6
  assert epoch['val/loss'] == pytest.approx(want, rel=1e-6)
  assert result.best_value == epoch['val/loss']
  vocab = json.load(open(os.path.join(workdir, 'vocab.json')))
  assert vocab == _open(data_dir).vocab
  # eval on the mixture: each dataset on its own, then a summary.
  c.eval.split, c.eval.num_figures, c.eval.meteor = 'test', 1, False
  report = eval_lib.evaluate(c, os.path.join(workdir, 'best'), out_dir=str(tmp_path / 'ev'),
                             progress=False)
  assert set(report['datasets']) == {'levir_cc', 'whu_cdc'}
  for name, n in (('levir_cc', 2), ('whu_cdc', 2)):
    sub = json.load(open(tmp_path / 'ev' / name / 'metrics.json'))
    assert sub['dataset'] == name and sub['results'] == report['datasets'][name]['results']
    assert len(open(tmp_path / 'ev' / name / 'captions.jsonl').readlines()) == n
  assert json.load(open(tmp_path / 'ev' / 'metrics.json'))['mixture'] == MIX


def test_datasets_built_before_word_counts_were_recorded_give_the_same_statistics(built):
  data_dir, _ = built
  ds = _open(data_dir, 'whu_cdc')
  counts, texts = pipeline.text_statistics(ds)
  meta = ds.builder.info.metadata
  for key in ('word_counts', 'caption_texts'):
    meta.pop(key)
  scanned_counts, scanned_texts = pipeline.text_statistics(ds)  # read from the records
  assert scanned_counts == counts and scanned_texts == texts
  assert counts['the'] > 5 and 'there is no difference' in texts
