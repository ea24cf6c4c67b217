"""Evaluators: objects built from `config.evals` entries, run with the current train state,
yielding named metrics ('<split>/loss', '<split>/retrieval/changed/R@10',
'<split>/caption/CIDEr-D', ...).

The embedding, decoding and scoring code here is also what `python -m rsicrc_jax.eval` runs on a
saved model, so the numbers seen during training and after it come from one implementation.

A config entry (`config.evals.<name>`):
  type: 'loss' | 'retrieval' | 'caption'
  split: the dataset split ('val')
  every_epochs: run after every N epochs (0: never by epoch)
  every_steps: run every N steps inside epochs too (0: never by step)
  prefix: the metric names' first part (default: the split)
  max_pairs: score only the first N pairs (0: all)        [retrieval, caption]
  beam_size, length_penalty: decoding (1 = greedy)         [caption]
  meteor: also METEOR, which starts a Java process         [caption]
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rsicrc_jax import decoding
from rsicrc_jax import losses
from rsicrc_jax import metrics
from rsicrc_jax import sharding
from rsicrc_jax import xla_options
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline

SUBSETS = ('all', 'changed')  # every pair; changed pairs only ('sub' in the reference)
CAPTION_METRICS = ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR', 'ROUGE-L', 'CIDEr-D')
TYPES = ('loss', 'retrieval', 'caption')


# ----------------------------------------------------------------------------------------------
# Embedding and decoding a split (eval mode), data parallel over this process's devices.

@xla_options.inference_jit(static_argnames='graphdef')
def _embed_images(graphdef, state, image_a, image_b):
  m = nnx.merge(graphdef, state)
  a = pipeline.normalize_images(image_a, normalization=m.normalization)
  b = pipeline.normalize_images(image_b, normalization=m.normalization)
  return m.encode_images(a, b)[0]


@functools.partial(jax.jit, static_argnames='graphdef')
def _embed_text(graphdef, state, tokens):
  return nnx.merge(graphdef, state).encode_text(tokens, tokens == cap.PAD)


def embed_pairs(graphdef, state, image_a, image_b, tokens):
  """(uint8 images a, b (B, H, W, 3), tokens (B, L)) -> visual_emb, text_emb (B, C), eval mode."""
  return (_embed_images(graphdef, state, image_a, image_b),
          _embed_text(graphdef, state, tokens))


class Inference:
  """The eval-mode model replicated over a mesh (default: this process's devices) and what runs
  on it: pair and text embeddings, and captions (KV-cached greedy, or beam search). Batches are
  split over the mesh's 'data' axis; their size must be a multiple of `self.devices`
  (`round_batch`). Eval, the training-time evaluators, mining and the own-imagery tool
  (`rsicrc_jax.predict`) all embed and caption through this one class."""

  def __init__(self, model, mesh=None):
    self.mesh = mesh or sharding.local_mesh()
    self.graphdef, params = nnx.split(model)
    self.params = jax.device_put(params, sharding.replicated(self.mesh))
    self.model = nnx.merge(self.graphdef, self.params)  # jit caches on graphdef: one compile
    self.normalization = model.normalization

  @property
  def devices(self) -> int:
    return self.mesh.size

  def round_batch(self, batch_size: int) -> int:
    """The batch size rounded up to a multiple of the device count."""
    return -(-batch_size // self.devices) * self.devices

  def put(self, x) -> jax.Array:
    return jax.device_put(x, sharding.batch_sharding(self.mesh))

  def embed_images(self, image_a, image_b) -> jax.Array:
    """uint8 (B, H, W, 3) before, after -> visual embeddings (B, C)."""
    return _embed_images(self.graphdef, self.params, self.put(image_a), self.put(image_b))

  def embed_text(self, tokens) -> jax.Array:
    """(B, L) int tokens, `[START] w.. [END] PAD..` -> text embeddings (B, C)."""
    return _embed_text(self.graphdef, self.params, self.put(tokens))

  def caption(self, image_a, image_b, *, beam_size: int = 1, length_penalty: float = 0.0,
              with_embedding: bool = False):
    """uint8 (B, H, W, 3) pairs -> (tokens (B, max_len + 1), the greedy decoder's cross-attention
    (B, max_len, S), or None under beam search, which keeps none), and with `with_embedding` the
    visual embeddings (B, C) from the same image encoding: captioning and embedding a pair cost
    one pass through the backbone and encoder, not two."""
    a = pipeline.normalize_images(self.put(image_a), normalization=self.normalization)
    b = pipeline.normalize_images(self.put(image_b), normalization=self.normalization)
    if beam_size > 1:
      tokens, _, _, visual = decoding.beam_search(self.model, a, b, beam_size=beam_size,
                                                  length_penalty=length_penalty,
                                                  with_embedding=True)
      attn = None
    else:
      tokens, _, attn, visual = decoding.greedy_decode_cached(self.model, a, b,
                                                              with_embedding=True)
      attn = np.asarray(attn)
    out = (np.asarray(tokens), attn)
    return out + (visual,) if with_embedding else out


def attention_map(attention: np.ndarray, caption: str) -> np.ndarray:
  """(max_len, S) cross-attention of one greedy caption -> (g, g) map over the image grid: the
  mean over the caption's words and its END token. Each row sums to 1 over the S = g*g cells,
  whose order follows the encoder's transposed grid, hence the transpose back."""
  grid = int(round(np.sqrt(attention.shape[-1])))
  n_words = max(len(caption.split()) + 1, 1)
  return attention[:n_words].mean(0).reshape(grid, grid).T


def run_model(model, dataset: pipeline.Dataset, split: str, config, *, batch_size: int,
              decode: bool = True, beam_size: int = 1, length_penalty: float = 0.0,
              max_pairs: int = 0, progress: bool = True, mesh=None) -> dict[str, Any]:
  """Embeds (and with `decode`, captions) every pair of a split. The model is replicated over
  `mesh` (default: this process's devices, `sharding.local_mesh`) and each batch split over it;
  every process runs the whole split. A batch size that the device count does not divide is
  rounded up. Returns numpy arrays and lists, one entry per pair."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  runner = Inference(model, mesh)
  batch_size = runner.round_batch(batch_size)
  batches, plan = pipeline.make_batches(
      dataset, split, global_batch=batch_size, max_len=config.model.max_len,
      image_size=config.model.image_size, train=False, with_references=True)
  words = cap.id_to_word(dataset.vocab)
  out = {k: [] for k in ('visual', 'text', 'flag', 'caption_id', 'caption_emb', 'pair',
                         'filename', 'hypothesis', 'references', 'all_text', 'all_caption_ids',
                         'attention')}
  steps = plan.steps_per_epoch
  if max_pairs:
    steps = min(steps, -(-max_pairs // batch_size))
  it = pipeline.iterate(batches, num_threads=config.data.num_threads)
  what = 'embed + decode' if decode else 'embed'
  for _ in tqdm(range(steps), desc=f'{dataset.name} {split}: {what}', disable=not progress,
                leave=False):
    b = next(it)
    keep = np.flatnonzero(b['valid'])
    if decode:  # one image encoding gives the captions and the embeddings
      tokens, attn, visual = runner.caption(b['image_a'], b['image_b'], beam_size=beam_size,
                                            length_penalty=length_penalty, with_embedding=True)
      if attn is not None:
        out['attention'].append(attn[keep])  # for eval's figures
      out['hypothesis'] += [cap.decode_caption(tokens[i], words) for i in keep]
    else:
      visual = runner.embed_images(b['image_a'], b['image_b'])
    text = runner.embed_text(b['tokens'])
    all_tokens = b['all_tokens'].reshape(-1, b['all_tokens'].shape[-1])
    all_text = np.asarray(runner.embed_text(all_tokens))
    out['all_text'].append(all_text.reshape(len(b['valid']), cap.CAPTIONS_PER_PAIR, -1)[keep])
    out['visual'].append(np.asarray(visual)[keep])
    out['text'].append(np.asarray(text)[keep])
    for k, field in (('flag', 'flag'), ('caption_id', 'caption_id'), ('pair', 'pair_index'),
                     ('all_caption_ids', 'all_caption_ids')):
      out[k].append(b[field][keep])
    if 'caption_emb' in b:
      out['caption_emb'].append(b['caption_emb'][keep])
    out['filename'] += [str(b['filename'][i]) for i in keep]
    out['references'] += [[str(r) for r in b['references'][i]] for i in keep]
  run = {k: (np.concatenate(v) if v and k not in ('filename', 'hypothesis', 'references')
             else v) for k, v in out.items()}
  if max_pairs:
    run = {k: v[:max_pairs] for k, v in run.items()}
  return run


# ----------------------------------------------------------------------------------------------
# Scores (pure functions of a run_model result).

def _subsets(run) -> Iterable[tuple[str, np.ndarray]]:
  changed = run['flag'] != -1
  for name, sel in (('all', np.ones_like(changed)), ('changed', changed)):
    yield name, np.flatnonzero(sel)


def caption_scores(run, *, meteor: bool = True, protocol: str = 'reference',
                   scorer: Any = None) -> tuple[dict, list[str]]:
  """{subset: {'pairs', 'captioning': {BLEU-1.., CIDEr-D}}} and notes (e.g. METEOR skipped),
  scored under `protocol` (metrics.CAPTION_PROTOCOLS). The subsets share one METEOR process:
  `scorer` (metrics.meteor_scorer) when given, else one started here."""
  with contextlib.ExitStack() as stack:
    if meteor and scorer is None:
      scorer = stack.enter_context(metrics.meteor_scorer())
    results, notes = {}, []
    for name, idx in _subsets(run):
      if not len(idx):
        notes.append(f'{name}: no pairs')
        continue
      scores, more = metrics.caption_metrics([run['hypothesis'][i] for i in idx],
                                             [run['references'][i] for i in idx],
                                             meteor=meteor, protocol=protocol, scorer=scorer)
      notes += [n for n in more if n not in notes]
      results[name] = {'pairs': int(len(idx)), 'captioning': scores}
  return results, notes


def retrieval_scores(run, loss_cfg) -> dict:
  """{subset: {'pairs', 'text_to_pair': P/R/MRR@k, 'pair_to_text': R@k, 'text_to_pair_hit':
  R@k, 'mR'}}.

  text_to_pair is the reference's (SPEC section 8): one query per pair (its first caption),
  relevant = same changeflag or the same caption (as the loss's false negatives). The hit rates
  are the literature's (SPEC section 13): pair -> text over every caption of the subset's pairs,
  and every one of those captions as a query against the pairs, relevant likewise; mR is the
  mean of both directions' R@1, R@5, R@10."""
  caption_emb = run['caption_emb'] if len(run['caption_emb']) else None
  same = np.asarray(losses.false_negative_mask(
      None if caption_emb is None else jnp.asarray(caption_emb),
      jnp.asarray(run['caption_id']), threshold=loss_cfg.s_threshold,
      tolerance=loss_cfg.s_tolerance))
  results = {}
  for name, idx in _subsets(run):
    if not len(idx):
      continue
    rel = metrics.relevance(run['flag'][idx], same[np.ix_(idx, idx)])
    t2p = metrics.retrieval_metrics(run['text'][idx], run['visual'][idx], rel)
    all_text = run['all_text'][idx].reshape(len(idx) * cap.CAPTIONS_PER_PAIR, -1)
    cap_flags = np.repeat(run['flag'][idx], cap.CAPTIONS_PER_PAIR)
    cap_ids = run['all_caption_ids'][idx].reshape(-1)
    rel_i2t = (run['flag'][idx][:, None] == cap_flags[None, :]) | (
        run['all_caption_ids'][idx][:, :, None] == cap_ids[None, None, :]).any(axis=1)
    i2t = metrics.hit_rate(run['visual'][idx], all_text, rel_i2t)
    t2p_hit = metrics.hit_rate(all_text, run['visual'][idx], rel_i2t.T)
    results[name] = {'pairs': int(len(idx)), 'text_to_pair': t2p, 'pair_to_text': i2t,
                     'text_to_pair_hit': t2p_hit, 'mR': metrics.mean_recall(t2p_hit, i2t)}
  return results


def score(run, loss_cfg, *, meteor: bool = True, protocol: str = 'reference',
          scorer: Any = None) -> tuple[dict, list[str]]:
  """Captioning and retrieval, per subset, as eval's metrics.json holds them (`scorer`: see
  caption_scores)."""
  caps, notes = caption_scores(run, meteor=meteor, protocol=protocol, scorer=scorer)
  results = {}
  for name, r in retrieval_scores(run, loss_cfg).items():
    results[name] = {**r, **caps.get(name, {})}
  return results, notes


def _name(prefix: str, kind: str, subset: str, metric: str) -> str:
  return '/'.join([prefix, kind] + ([] if subset == 'all' else [subset]) + [metric])


def markdown_table(results: dict) -> str:
  lines = []
  for name, r in results.items():
    lines.append(f'### {name} pairs ({r["pairs"]})\n')
    if 'captioning' in r:
      caps = r['captioning']
      lines.append('| ' + ' | '.join(caps) + ' |')
      lines.append('|' + ' --- |' * len(caps))
      lines.append('| ' + ' | '.join(f'{v:.4f}' for v in caps.values()) + ' |\n')
    t2p = r['text_to_pair']
    lines.append('| text -> pair | ' + ' | '.join(f'@{k}' for k in metrics.AT_K) + ' |')
    lines.append('| --- |' + ' --- |' * len(metrics.AT_K))
    for m in ('P', 'R', 'MRR'):
      lines.append(f'| {m} | ' + ' | '.join(f'{t2p[f"{m}@{k}"]:.4f}' for k in metrics.AT_K)
                   + ' |')
    lines.append('')
    lines.append('| hit rate (literature) | ' + ' | '.join(f'R@{k}' for k in metrics.AT_K)
                 + ' | mR |')
    lines.append('| --- |' + ' --- |' * (len(metrics.AT_K) + 1))
    for label, key, last in (('caption -> pair', 'text_to_pair_hit', f'{r["mR"]:.4f}'),
                             ('pair -> caption', 'pair_to_text', '')):
      lines.append(f'| {label} | ' + ' | '.join(f'{r[key][f"R@{k}"]:.4f}' for k in metrics.AT_K)
                   + f' | {last} |')
    lines.append('')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Evaluators.

_COMMON = {'type': str, 'split': str, 'every_epochs': int, 'every_steps': int, 'prefix': str}
_FIELDS = {
    'loss': _COMMON,
    'retrieval': {**_COMMON, 'max_pairs': int},
    'caption': {**_COMMON, 'max_pairs': int, 'beam_size': int, 'length_penalty': float,
                'meteor': bool, 'caption_protocol': str},
}


class Evaluator:
  """Built from one config entry; `run(state)` -> {metric name: value}."""

  def __init__(self, name: str, entry: ml_collections.ConfigDict, config, dataset):
    self.name = name
    self.split = entry.get('split', 'val')
    self.every_epochs = int(entry.get('every_epochs', 1))
    self.every_steps = int(entry.get('every_steps', 0))
    self.prefix = entry.get('prefix', '') or self.split
    self.entry, self.config, self.dataset = entry, config, dataset
    if self.split not in dataset.splits:
      raise ValueError(f'config.evals.{name}.split: dataset {dataset.name} has no split '
                       f'{self.split!r}; it has {list(dataset.splits)}')

  def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
    """After `step` (1-based), in `epoch` (1-based), at the epoch's end or not."""
    if epoch_end and self.every_epochs and epoch % self.every_epochs == 0:
      return True
    return bool(self.every_steps and step % self.every_steps == 0)

  def metric_names(self) -> list[str]:
    raise NotImplementedError

  def run(self, state) -> dict[str, float]:
    raise NotImplementedError


class LossEvaluator(Evaluator):
  """Mean losses over the split, batch by batch as the reference does (padding excluded),
  sharded over the mesh like the train step."""

  def __init__(self, name, entry, config, dataset, *, loss_step: Callable, mesh,
               process_index: int, process_count: int, **_):
    super().__init__(name, entry, config, dataset)
    self.loss_step, self.mesh = loss_step, mesh
    self.process_index, self.process_count = process_index, process_count

  def metric_names(self):
    return [f'{self.prefix}/{k}' for k in ('loss', 'caption_loss', 'contrastive_loss')]

  def run(self, state):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    c = self.config
    batches, plan = pipeline.make_batches(
        self.dataset, self.split, global_batch=c.eval_batch_size or c.batch_size,
        max_len=c.model.max_len, image_size=c.model.image_size, train=False,
        process_index=self.process_index, process_count=self.process_count)
    totals, n = {}, 0
    for local in tqdm(pipeline.iterate(batches, num_threads=c.data.num_threads),
                      total=plan.steps_per_epoch, desc=f'{self.name}', leave=False,
                      disable=self.process_index != 0):
      aux = jax.device_get(self.loss_step(state, sharding.global_batch(local, self.mesh)))
      for k, v in aux.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      n += 1
    return {f'{self.prefix}/{k}': v / n for k, v in totals.items() if k != 'positive_pairs'}


class _ModelEvaluator(Evaluator):
  """Runs the eval-mode model of the state over the split (on every process, each whole).

  Evaluators due at the same step share a pass over the split through `runs` (one dict for all
  of `from_config`'s evaluators): a captioning run also holds the pair and text embeddings, so
  retrieval on the same pairs scores those, as `python -m rsicrc_jax.eval` does, instead of
  running the image encoder again."""

  decode = False

  def __init__(self, name, entry, config, dataset, *, model_fn: Callable, process_index: int,
               runs: dict | None = None, **_):
    super().__init__(name, entry, config, dataset)
    self.model_fn, self.process_index = model_fn, process_index
    self.runs = {} if runs is None else runs

  def _run_model(self, state):
    c, e = self.config, self.entry
    beam_size, length_penalty, max_pairs = (e.get('beam_size', 1), e.get('length_penalty', 0.0),
                                            e.get('max_pairs', 0))
    decoding = (beam_size, length_penalty) if self.decode else None
    key = (self.dataset.name, self.split, max_pairs)
    step = int(jax.device_get(state.step))
    if key in self.runs:
      at, made_by, run = self.runs[key]
      if at == step and (decoding is None or made_by == decoding):
        return run
    model = self.model_fn(state)
    model.eval()
    run = run_model(model, self.dataset, self.split, c,
                    batch_size=c.eval_batch_size or c.batch_size, decode=self.decode,
                    beam_size=beam_size, length_penalty=length_penalty, max_pairs=max_pairs,
                    progress=self.process_index == 0)
    for stale in [k for k, (at, _, _) in self.runs.items() if at != step]:
      del self.runs[stale]  # only this step's runs are worth keeping
    self.runs[key] = (step, decoding, run)
    return run


class RetrievalEvaluator(_ModelEvaluator):
  """Text -> pair P/R/MRR@k and pair -> text R@k, on all pairs and on changed pairs."""

  def metric_names(self):
    names = []
    for subset in SUBSETS:
      names += [_name(self.prefix, 'retrieval', subset, f'{m}@{k}')
                for m in ('P', 'R', 'MRR') for k in metrics.AT_K]
      names += [_name(self.prefix, 'retrieval', subset, f'{d}/R@{k}')
                for d in ('pair_to_text', 'text_to_pair_hit') for k in metrics.AT_K]
      names.append(_name(self.prefix, 'retrieval', subset, 'mR'))
    return names

  def run(self, state):
    out = {}
    for subset, r in retrieval_scores(self._run_model(state), self.config.loss).items():
      out.update({_name(self.prefix, 'retrieval', subset, k): v
                  for k, v in r['text_to_pair'].items()})
      for d in ('pair_to_text', 'text_to_pair_hit'):
        out.update({_name(self.prefix, 'retrieval', subset, f'{d}/{k}'): v
                    for k, v in r[d].items()})
      out[_name(self.prefix, 'retrieval', subset, 'mR')] = r['mR']
    return out


class CaptionEvaluator(_ModelEvaluator):
  """BLEU-1..4, (METEOR), ROUGE-L, CIDEr-D of the decoded captions against the references."""

  decode = True

  def metric_names(self):
    return [_name(self.prefix, 'caption', subset, m) for subset in SUBSETS
            for m in CAPTION_METRICS]

  def run(self, state):
    results, _ = caption_scores(self._run_model(state), meteor=self.entry.get('meteor', False),
                                protocol=self.entry.get('caption_protocol', 'reference'))
    return {_name(self.prefix, 'caption', subset, k): v
            for subset, r in results.items() for k, v in r['captioning'].items()}


_CLASSES = {'loss': LossEvaluator, 'retrieval': RetrievalEvaluator, 'caption': CaptionEvaluator}


def check_entry(name: str, entry) -> None:
  kind = entry.get('type')
  if kind not in _CLASSES:
    raise ValueError(f'config.evals.{name}.type: expected one of {list(TYPES)}, got {kind!r}')
  fields = _FIELDS[kind]
  unknown = sorted(set(entry) - set(fields))
  if unknown:
    raise ValueError(f'config.evals.{name}: unknown fields {unknown} for type {kind!r}; '
                     f'expected some of {sorted(fields)}')
  for key in ('every_epochs', 'every_steps', 'max_pairs'):
    if entry.get(key, 0) < 0:
      raise ValueError(f'config.evals.{name}.{key}: expected >= 0, got {entry[key]}')
  if entry.get('beam_size', 1) < 1:
    raise ValueError(f'config.evals.{name}.beam_size: expected >= 1, got {entry["beam_size"]}')
  if entry.get('caption_protocol', 'reference') not in metrics.CAPTION_PROTOCOLS:
    raise ValueError(f'config.evals.{name}.caption_protocol: expected one of '
                     f'{list(metrics.CAPTION_PROTOCOLS)}, got {entry["caption_protocol"]!r}')


class PerDataset(Evaluator):
  """One config entry over a mixture: the entry's evaluator run on each member dataset, its
  metrics named '<prefix>/<dataset>/...' ('val/whu_cdc/retrieval/changed/R@10'). Loss entries
  also give '<prefix>/loss' etc.: the members' losses weighted by their item counts."""

  def __init__(self, name, entry, config, mixture, **kwargs):
    self.parts = []
    for m in mixture.members:
      part = ml_collections.ConfigDict(entry.to_dict())
      part.prefix = f'{entry.get("prefix", "") or entry.get("split", "val")}/{m.name}'
      self.parts.append(_CLASSES[entry['type']](f'{name}/{m.name}', part, config, m, **kwargs))
    super().__init__(name, entry, config, mixture)
    self.average = entry['type'] == 'loss'
    lengths = [m.caption_lengths[self.split] for m in mixture.members]
    self.items = [len(pipeline.item_index(l, config.model.max_len, False)) for l in lengths]

  def _mean_names(self):
    return [f'{self.prefix}/{k}' for k in ('loss', 'caption_loss', 'contrastive_loss')]

  def metric_names(self):
    names = [n for p in self.parts for n in p.metric_names()]
    return names + (self._mean_names() if self.average else [])

  def run(self, state):
    out, per = {}, []
    for part in self.parts:
      per.append(part.run(state))
      out.update(per[-1])
    if self.average:
      total = sum(self.items)
      for name in self._mean_names():
        key = name.rsplit('/', 1)[1]
        out[name] = sum(n * r[f'{p.prefix}/{key}'] for n, r, p in zip(self.items, per, self.parts)
                        ) / total
    return out


def from_config(config, dataset, **kwargs) -> list[Evaluator]:
  """One Evaluator per `config.evals` entry (over a mixture: one per entry and member dataset,
  `PerDataset`). kwargs: loss_step (jitted (state, batch) -> losses), model_fn (state -> model),
  mesh, process_index, process_count."""
  evals, runs = [], {}
  # Captioning entries first, so that retrieval due at the same step scores their runs.
  entries = sorted(config.get('evals', {}).items(),
                   key=lambda kv: (kv[1].get('type') != 'caption', kv[0]))
  for name, entry in entries:
    check_entry(name, entry)
    cls = PerDataset if len(dataset.members) > 1 else _CLASSES[entry['type']]
    evals.append(cls(name, entry, config, dataset, runs=runs, **kwargs))
  return evals


def best_is_max(config) -> bool:
  """Direction of config.best_metric: config.best_metric_mode 'min' | 'max' | 'auto' (a name
  ending in 'loss' is minimised, any other maximised)."""
  mode = config.get('best_metric_mode', 'auto')
  if mode not in ('auto', 'min', 'max'):
    raise ValueError(f"config.best_metric_mode: expected 'auto', 'min' or 'max', got {mode!r}")
  if mode == 'auto':
    return not config.best_metric.endswith('loss')
  return mode == 'max'


def check_best_metric(config, evals: list[Evaluator]) -> None:
  names = sorted({n for e in evals for n in e.metric_names()})
  if config.best_metric not in names:
    close = [n for n in names if n.split('/')[-1] == config.best_metric.split('/')[-1]]
    raise ValueError(f'config.best_metric: no evaluator in config.evals yields '
                     f'{config.best_metric!r}; ' + (f'did you mean one of {close}? ' if close
                                                    else '') + f'{len(names)} names are '
                     f'available, e.g. {names[:4]}')
