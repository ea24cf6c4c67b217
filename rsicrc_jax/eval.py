"""Score a model: captioning and retrieval metrics (SPEC section 8), captions, pictures.

  python -m rsicrc_jax.eval --config configs/demo.py --checkpoint runs/demo/best \
      [--split test] [--out DIR] [--beam_size 1]
  python -m rsicrc_jax.eval --workdir runs/demo          # a training run: its config and best/

Writes to --out (default: <checkpoint>/../eval_<split>): metrics.json, metrics.md (also
printed), captions.jsonl (per pair: generated caption and references) and figures/*.png.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from rsicrc_jax import decoding
from rsicrc_jax import losses
from rsicrc_jax import metrics
from rsicrc_jax import model_io
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline


def _embed_fn(model):
  """jit: (uint8 images a, b, tokens) -> visual_emb, text_emb (eval mode)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, image_a, image_b, tokens):
    m = nnx.merge(graphdef, state)
    a, b = pipeline.normalize_images(image_a), pipeline.normalize_images(image_b)
    visual_emb, visual_tokens = m.encode_images(a, b)
    text_emb = m.encode_text(tokens, tokens == cap.PAD)
    return visual_emb, text_emb, visual_tokens

  @jax.jit
  def embed_text(state, tokens):
    return nnx.merge(graphdef, state).encode_text(tokens, tokens == cap.PAD)

  return (lambda *args: embed(state, *args)), (lambda t: embed_text(state, t))


def run_model(model, dataset: pipeline.Dataset, split: str, config, *, batch_size: int,
              beam_size: int = 1, length_penalty: float = 0.0, max_pairs: int = 0,
              progress: bool = True) -> dict[str, Any]:
  """Embeds and captions every pair of a split (one process). Returns numpy arrays / lists."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  batches, plan = pipeline.make_batches(
      dataset, split, global_batch=batch_size, max_len=config.model.max_len,
      image_size=config.model.image_size, train=False, with_references=True)
  embed, embed_text = _embed_fn(model)
  words = cap.id_to_word(dataset.vocab)
  out = {k: [] for k in ('visual', 'text', 'flag', 'caption_id', 'caption_emb', 'pair',
                         'filename', 'hypothesis', 'references', 'all_text', 'all_caption_ids', 'attention',
                         'fused')}
  steps = plan.steps_per_epoch
  if max_pairs:
    steps = min(steps, -(-max_pairs // batch_size))
  it = pipeline.iterate(batches, num_threads=config.data.num_threads)
  for _ in tqdm(range(steps), desc=f'{split}: embed + decode', disable=not progress):
    b = next(it)
    valid = b['valid']
    a, bb = jnp.asarray(b['image_a']), jnp.asarray(b['image_b'])
    visual, text, visual_tokens = embed(a, bb, jnp.asarray(b['tokens']))
    na, nb = pipeline.normalize_images(a), pipeline.normalize_images(bb)
    if beam_size > 1:
      tokens, _, _ = decoding.beam_search(model, na, nb, beam_size=beam_size,
                                          length_penalty=length_penalty)
      attn = None
    else:
      tokens, _, attn = decoding.greedy_decode_cached(model, na, nb)
    all_text = embed_text(jnp.asarray(b['all_tokens'].reshape(-1, b['all_tokens'].shape[-1])))
    all_text = np.asarray(all_text).reshape(len(valid), cap.CAPTIONS_PER_PAIR, -1)
    keep = np.flatnonzero(valid)
    out['visual'].append(np.asarray(visual)[keep])
    out['text'].append(np.asarray(text)[keep])
    out['flag'].append(b['flag'][keep])
    out['caption_id'].append(b['caption_id'][keep])
    if 'caption_emb' in b:
      out['caption_emb'].append(b['caption_emb'][keep])
    out['pair'].append(b['pair_index'][keep])
    out['all_text'].append(all_text[keep])
    out['all_caption_ids'].append(b['all_caption_ids'][keep])
    for i in keep:
      out['filename'].append(str(b['filename'][i]))
      out['hypothesis'].append(cap.decode_caption(np.asarray(tokens[i]), words))
      out['references'].append([str(r) for r in b['references'][i]])
    if attn is not None:
      out['attention'].append(np.asarray(attn)[keep])
      out['fused'].append(np.asarray(visual_tokens)[keep].mean(-1))
  arrays = {k: (np.concatenate(v) if v and k not in ('filename', 'hypothesis', 'references')
                else v)
            for k, v in out.items()}
  if max_pairs:
    arrays = {k: v[:max_pairs] for k, v in arrays.items()}
  return arrays


def score(run: dict[str, Any], loss_cfg, *, meteor: bool = True) -> tuple[dict, list[str]]:
  """All metrics, on all pairs and on changed pairs only ('sub', as the reference)."""
  notes = []
  results = {}
  caption_emb = run['caption_emb'] if len(run['caption_emb']) else None
  same = np.asarray(losses.false_negative_mask(
      None if caption_emb is None else jnp.asarray(caption_emb),
      jnp.asarray(run['caption_id']), threshold=loss_cfg.s_threshold,
      tolerance=loss_cfg.s_tolerance))
  changed = run['flag'] != -1
  for name, sel in (('all', np.ones_like(changed)), ('changed', changed)):
    idx = np.flatnonzero(sel)
    if not len(idx):
      notes.append(f'{name}: no pairs')
      continue
    caps, cap_notes = metrics.caption_metrics([run['hypothesis'][i] for i in idx],
                                              [run['references'][i] for i in idx],
                                              meteor=meteor)
    notes += [n for n in cap_notes if n not in notes]
    rel = metrics.relevance(run['flag'][idx], same[np.ix_(idx, idx)])
    t2p = metrics.retrieval_metrics(run['text'][idx], run['visual'][idx], rel)
    # Pair -> caption: every caption of the selected pairs; relevant = same flag or same text.
    all_text = run['all_text'][idx].reshape(len(idx) * cap.CAPTIONS_PER_PAIR, -1)
    cap_flags = np.repeat(run['flag'][idx], cap.CAPTIONS_PER_PAIR)
    cap_ids = run['all_caption_ids'][idx].reshape(-1)
    rel_i2t = (run['flag'][idx][:, None] == cap_flags[None, :]) | (
        run['all_caption_ids'][idx][:, :, None] == cap_ids[None, None, :]).any(axis=1)
    i2t = metrics.image_to_text_recall(run['visual'][idx], all_text, rel_i2t)
    results[name] = {'pairs': int(len(idx)), 'captioning': caps, 'text_to_pair': t2p,
                     'pair_to_text': i2t}
  return results, notes


def markdown_table(results: dict) -> str:
  lines = []
  for name, r in results.items():
    lines.append(f'### {name} pairs ({r["pairs"]})\n')
    caps = r['captioning']
    lines.append('| ' + ' | '.join(caps) + ' |')
    lines.append('|' + ' --- |' * len(caps))
    lines.append('| ' + ' | '.join(f'{v:.4f}' for v in caps.values()) + ' |\n')
    t2p = r['text_to_pair']
    lines.append('| text -> pair | ' + ' | '.join(f'@{k}' for k in metrics.AT_K) + ' |')
    lines.append('| --- |' + ' --- |' * len(metrics.AT_K))
    for m in ('P', 'R', 'MRR'):
      lines.append(f'| {m} | ' + ' | '.join(f'{t2p[f"{m}@{k}"]:.4f}' for k in metrics.AT_K) + ' |')
    i2t = r['pair_to_text']
    lines.append('| pair -> text R | ' + ' | '.join(f'{i2t[f"R@{k}"]:.4f}'
                                                   for k in metrics.AT_K) + ' |\n')
  return '\n'.join(lines)


def save_figures(run, dataset, split, config, out_dir, num: int) -> list[str]:
  """before | after | mean fused feature map | cross-attention over the after image (mean over
  the generated words), titled with the generated caption."""
  if not len(run['attention']) or num <= 0:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  source = dataset.source(split)
  grid = int(round(np.sqrt(run['fused'].shape[1])))
  paths = []
  for i in range(min(num, len(run['pair']))):
    rec = source[int(run['pair'][i])]
    a = pipeline.resize_center_crop(rec['image_a'], config.model.image_size)
    b = pipeline.resize_center_crop(rec['image_b'], config.model.image_size)
    n_words = max(len(run['hypothesis'][i].split()) + 1, 1)  # + END
    # Token order follows the encoder's transposed grid: transpose back for display.
    fused = run['fused'][i].reshape(grid, grid).T
    attn = run['attention'][i][:n_words].mean(0).reshape(grid, grid).T
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, img, title in ((axes[0], a, 'before'), (axes[1], b, 'after')):
      ax.imshow(img)
      ax.set_title(title)
    axes[2].imshow(fused, cmap='viridis')
    axes[2].set_title('mean fused features')
    axes[3].imshow(b)
    axes[3].imshow(attn, cmap='jet', alpha=0.45, interpolation='bilinear',
                   extent=(0, b.shape[1], b.shape[0], 0))
    axes[3].set_title('cross-attention')
    for ax in axes:
      ax.axis('off')
    name = run['filename'][i]
    fig.suptitle(f'{name}: {run["hypothesis"][i]}\nref: {run["references"][i][0].strip()}',
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f'{i:03d}_{os.path.splitext(name)[0]}.png')
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
  return paths


def evaluate(config, checkpoint: str, *, split: str = 'test', out_dir: str | None = None,
             batch_size: int = 32, beam_size: int = 1, length_penalty: float = 0.0,
             num_figures: int = 8, max_pairs: int = 0, meteor: bool = True,
             progress: bool = True) -> dict:
  """Loads the model at `checkpoint`, scores `split`, writes the outputs; returns the metrics."""
  dataset = pipeline.open_dataset(config.data)
  if config.model.vocab_size and config.model.vocab_size != len(dataset.vocab):
    raise SystemExit(f'config.model.vocab_size={config.model.vocab_size} but the vocabulary has '
                     f'{len(dataset.vocab)} words; pass the training run\'s config')
  with config.unlocked():
    config.model.vocab_size = len(dataset.vocab)
  try:
    model = model_io.load_model(checkpoint, config.model)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'cannot load {checkpoint} with this config: {e}') from e
  out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f'eval_{split}')
  os.makedirs(out_dir, exist_ok=True)
  run = run_model(model, dataset, split, config, batch_size=batch_size, beam_size=beam_size,
                  length_penalty=length_penalty, max_pairs=max_pairs, progress=progress)
  results, notes = score(run, config.loss, meteor=meteor)
  report = {'checkpoint': os.path.abspath(checkpoint), 'split': split,
            'decoding': {'beam_size': beam_size, 'length_penalty': length_penalty},
            'results': results, 'notes': notes}
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(report, f, indent=2)
  table = markdown_table(results) + ''.join(f'\n> {n}\n' for n in notes)
  with open(os.path.join(out_dir, 'metrics.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(out_dir, 'captions.jsonl'), 'w') as f:
    for i, name in enumerate(run['filename']):
      f.write(json.dumps({'filename': name,
                          'changed': bool(run['flag'][i] != -1),
                          'caption': run['hypothesis'][i],
                          'references': [r.strip() for r in run['references'][i]]}) + '\n')
  save_figures(run, dataset, split, config, os.path.join(out_dir, 'figures'), num_figures)
  if progress:
    print(table)
    print(f'written to {out_dir}')
  return report


def define_flags():
  """The command line, defined only when this module is the program (launch.py imports it)."""
  global _CONFIG, _CHECKPOINT, _WORKDIR, _SPLIT, _OUT, _BATCH, _BEAM, _LP, _FIGS, _MAX_PAIRS
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'The config the model was trained '
                                            'with (default with --workdir: its config.json).')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A model dir (convert output or a run\'s '
                                    'best/).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir: uses its config.json and '
                                 'best/.')
  _SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'Split to score.')
  _OUT = flags.DEFINE_string('out', None, 'Output dir (default: next to the checkpoint).')
  _BATCH = flags.DEFINE_integer('batch_size', 32, 'Pairs per batch.')
  _BEAM = flags.DEFINE_integer('beam_size', 1, '1 = greedy (the reference); e.g. 3 for beam.')
  _LP = flags.DEFINE_float('length_penalty', 0.0, 'Beam score / length ** this.')
  _FIGS = flags.DEFINE_integer('num_figures', 8, 'Pairs to draw.')
  _MAX_PAIRS = flags.DEFINE_integer('max_pairs', 0, 'Score only the first N pairs (0 = all).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, checkpoint = _CONFIG.value, _CHECKPOINT.value
  if _WORKDIR.value:
    if config is None:
      path = os.path.join(_WORKDIR.value, 'config.json')
      if not os.path.exists(path):
        raise app.UsageError(f'{path} not found: is {_WORKDIR.value} a training workdir?')
      with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    checkpoint = checkpoint or os.path.join(_WORKDIR.value, 'best')
  if config is None or checkpoint is None:
    raise app.UsageError('give --config and --checkpoint, or --workdir')
  try:
    evaluate(config, checkpoint, split=_SPLIT.value, out_dir=_OUT.value,
             batch_size=_BATCH.value, beam_size=_BEAM.value, length_penalty=_LP.value,
             num_figures=_FIGS.value, max_pairs=_MAX_PAIRS.value)
  except cap.DataError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
