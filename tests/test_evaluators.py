"""Evaluators due at the same step share one pass of the model over the split."""

import types

import jax.numpy as jnp

from configs import demo
from rsicrc_jax import evaluators


def test_evaluators_due_at_one_step_share_one_pass_over_the_split(monkeypatch):
  calls = []

  def fake_run_model(model, dataset, split, config, *, decode, beam_size, **kw):
    calls.append((split, decode, beam_size))
    return {'made': len(calls)}

  monkeypatch.setattr(evaluators, 'run_model', fake_run_model)
  c = demo.get_config()
  c.evals.test_retrieval = {'type': 'retrieval', 'split': 'test'}
  dataset = types.SimpleNamespace(name='synthetic_cc', splits=('train', 'val', 'test'),
                                  members=[None])
  model = types.SimpleNamespace(eval=lambda: None)
  evals = evaluators.from_config(c, dataset, model_fn=lambda state: model, process_index=0,
                                 process_count=1, loss_step=None, mesh=None)
  by_name = {e.name: e for e in evals}
  assert [e.name for e in evals][0] == 'val_caption'  # captioning first
  caption, retrieval = by_name['val_caption'], by_name['val_retrieval']
  state = types.SimpleNamespace(step=jnp.asarray(10))
  run = caption._run_model(state)
  assert retrieval._run_model(state) is run  # the captioning run's embeddings, no second pass
  assert calls == [('val', True, 1)]
  by_name['test_retrieval']._run_model(state)  # another split: its own pass
  assert calls[-1] == ('test', False, 1)
  assert retrieval._run_model(state) is run and len(calls) == 2  # val's run is kept beside it
  later = types.SimpleNamespace(step=jnp.asarray(20))
  assert retrieval._run_model(later) is not run  # a later step: the model changed
  assert calls[-1] == ('val', False, 1)
  # An embedding-only run has no captions: captioning after it decodes, and a captioning
  # entry with another beam does not take a greedy run.
  caption._run_model(later)
  assert calls[-1] == ('val', True, 1)
  caption.entry.beam_size = 3
  caption._run_model(later)
  assert calls[-1] == ('val', True, 3) and len(calls) == 5
