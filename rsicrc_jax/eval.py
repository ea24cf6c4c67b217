"""Score a model: captioning and retrieval metrics (SPEC section 8), captions, pictures.

  python -m rsicrc_jax.eval --config configs/demo.py --checkpoint runs/demo/best \
      [--out DIR] [--config.eval.split=test] [--config.eval.beam_size=3]
  python -m rsicrc_jax.eval --workdir runs/demo          # a training run: its config and best/

The embedding, decoding and scoring are `rsicrc_jax.evaluators`', which the training-time
evaluators run too; the settings are `config.eval` (configs/levir.py lists them).

Writes to --out (default: <checkpoint>/../eval_<split>): metrics.json, metrics.md (also
printed), captions.jsonl (per pair: generated caption and references) and figures/*.png.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from ml_collections import config_flags

from rsicrc_jax import cli
from rsicrc_jax import evaluators
from rsicrc_jax import metrics
from rsicrc_jax import model_io
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import pipeline


def figure_pairs(changed: np.ndarray, num: int) -> list[int]:
  """Which pairs to draw: the first ones of the split, about a quarter of them no-change pairs
  (at least one when there are two figures or more), the rest changed pairs."""
  no_change = np.flatnonzero(~changed)
  n_same = min(len(no_change), max(num // 4, 1 if num >= 2 else 0))
  picked = list(no_change[:n_same]) + list(np.flatnonzero(changed)[:num - n_same])
  if len(picked) < num:  # too few of one kind: fill with the other
    picked += [i for i in range(len(changed)) if i not in picked][:num - len(picked)]
  return sorted(int(i) for i in picked)


def figure_file(i: int, filename: str) -> str:
  """The figure of pair i: '007_train_000016.png'. A pair named by a path (change_captions'
  CSV: 'before/0001.png') gives one flat file name, 'before_0001'."""
  stem = re.sub(r'[^\w.-]+', '_', os.path.splitext(filename)[0]).strip('_')
  return f'{i:03d}_{stem}.png'


_MASK_COLOURS = ('cyan', 'lime', 'yellow', 'orange')


def draw_change_mask(ax, mask: np.ndarray) -> None:
  """Outlines each class of a (S, S[, 1]) class-id change mask (the dataset's ground truth) on
  `ax`, one colour per class."""
  mask = mask[..., 0] if mask.ndim == 3 else mask
  for k, cls in enumerate(c for c in np.unique(mask) if c):
    ax.contour(mask == cls, levels=[0.5], colors=_MASK_COLOURS[k % len(_MASK_COLOURS)],
               linewidths=1.2)


def save_figures(run, dataset, split, config, out_dir, num: int) -> list[str]:
  """One PNG per drawn pair: before | after | the decoder's cross-attention over the after
  image, with the generated caption and the references beneath; when the dataset has change
  masks (LEVIR-MCI, WHU-CDC), the true change is outlined on the after image and the attention
  map (SECOND-CC: its semantic map's changed pixels). Greedy decoding only (beam search keeps
  no attention)."""
  if not len(run['attention']) or num <= 0:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  source = dataset.source(split)
  paths = []
  for i in figure_pairs(run['flag'] != -1, num):
    rec = source[int(run['pair'][i])]
    a = pipeline.resize_center_crop(rec['image_a'], config.model.image_size)
    b = pipeline.resize_center_crop(rec['image_b'], config.model.image_size)
    attn = evaluators.attention_map(run['attention'][i], run['hypothesis'][i])
    grid = attn.shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 6.2), gridspec_kw={'bottom': 0.3})
    axes[0].imshow(a)
    axes[0].set_title('before')
    axes[1].imshow(b)
    axes[1].set_title('after')
    axes[2].imshow(b)
    im = axes[2].imshow(attn, cmap='magma', alpha=0.55, interpolation='nearest',
                        extent=(0, b.shape[1], b.shape[0], 0), vmin=0)
    axes[2].set_title('where the caption looked')
    # The ground truth where the dataset has one: LEVIR-MCI's and WHU-CDC's change masks, or
    # SECOND-CC's after land cover of the changed pixels (0 where nothing changed).
    key = next((k for k in ('change_mask', 'semantic_b') if k in rec), None)
    if key:
      mask = pipeline.resize_center_crop(np.asarray(rec[key]), config.model.image_size,
                                         nearest=True)
      for ax in axes[1:]:
        draw_change_mask(ax, mask)
      axes[1].set_title('after (outlined: the dataset\'s change mask)')
    bar = fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.03)
    bar.set_label(f'share of cross-attention per cell\n(mean over the caption\'s words, '
                  f'{grid}x{grid} cells)', fontsize=9)
    for ax in axes:
      ax.set_xticks([])
      ax.set_yticks([])
    name = run['filename'][i]
    kind = 'changed' if run['flag'][i] != -1 else 'no change'
    fig.suptitle(f'{name} ({kind})', fontsize=13)
    refs = '\n'.join(f'  {r.strip()}' for r in run['references'][i])
    fig.text(0.03, 0.25, f'generated: {run["hypothesis"][i]}', fontsize=12, weight='bold',
             va='top', wrap=True)
    fig.text(0.03, 0.19, f'references:\n{refs}', fontsize=10, va='top', family='monospace')
    path = os.path.join(out_dir, figure_file(i, name))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def evaluate(config, checkpoint: str, *, out_dir: str | None = None,
             progress: bool = True) -> dict:
  """Loads the model at `checkpoint`, scores `config.eval.split` with the settings in
  `config.eval`, writes the outputs; returns the report. Raises DataError or ValueError."""
  e = eval_settings(config)
  dataset = pipeline.open_dataset(config.data)
  if config.model.vocab_size and config.model.vocab_size != len(dataset.vocab):
    raise ValueError(f'config.model.vocab_size={config.model.vocab_size} but the vocabulary has '
                     f'{len(dataset.vocab)} words; pass the training run\'s config')
  with config.unlocked():
    config.model.vocab_size = len(dataset.vocab)
  try:
    model = model_io.load_model(checkpoint, config.model)
  except model_io.DamagedCheckpointError:
    raise
  except (FileNotFoundError, ValueError) as err:
    raise ValueError(f'cannot load {checkpoint} with this config: {err}') from err
  out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                    f'eval_{e.split}')
  if len(dataset.members) == 1:
    return _evaluate_dataset(model, dataset, config, e, checkpoint, out_dir, progress)
  # A mixture: each dataset scored on its own, in out_dir/<dataset>/, and a summary.
  report = {'checkpoint': os.path.abspath(checkpoint), 'split': e.split, 'mixture': dataset.name,
            'datasets': {m.name: _evaluate_dataset(model, m, config, e, checkpoint,
                                                   os.path.join(out_dir, m.name), progress)
                         for m in dataset.members}}
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(report, f, indent=2)
  return report


def _evaluate_dataset(model, dataset, config, e, checkpoint: str, out_dir: str,
                      progress: bool) -> dict:
  """Scores one dataset's split with the eval settings `e` and writes metrics.json, metrics.md,
  captions.jsonl and figures into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  # METEOR's Java process loads (about 5 s) while the model runs; both subsets score with it.
  with metrics.meteor_scorer(e.meteor) as scorer:
    run = evaluators.run_model(model, dataset, e.split, config, batch_size=e.batch_size,
                               beam_size=e.beam_size, length_penalty=e.length_penalty,
                               max_pairs=e.max_pairs, progress=progress)
    protocol = e.caption_protocol
    results, notes = evaluators.score(run, config.loss, meteor=e.meteor, protocol=protocol,
                                      scorer=scorer)
  report = {'checkpoint': os.path.abspath(checkpoint), 'dataset': dataset.name, 'split': e.split,
            'decoding': {'beam_size': e.beam_size, 'length_penalty': e.length_penalty},
            'caption_protocol': protocol,
            'results': results, 'notes': notes}
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(report, f, indent=2)
  table = evaluators.markdown_table(results) + ''.join(f'\n> {n}\n' for n in notes)
  with open(os.path.join(out_dir, 'metrics.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(out_dir, 'captions.jsonl'), 'w') as f:
    for i, name in enumerate(run['filename']):
      f.write(json.dumps({'filename': name,
                          'changed': bool(run['flag'][i] != -1),
                          'caption': run['hypothesis'][i],
                          'references': [r.strip() for r in run['references'][i]]}) + '\n')
  save_figures(run, dataset, e.split, config, os.path.join(out_dir, 'figures'), e.num_figures)
  if progress:
    print(f'{dataset.name} {e.split}:\n{table}')
    print(f'written to {out_dir}')
  return report


def eval_settings(config) -> ml_collections.ConfigDict:
  """config.eval, with the defaults for fields a config saved by an older run lacks."""
  from configs import levir  # pylint: disable=import-outside-toplevel
  settings = levir.get_eval_config()
  settings.update(config.get('eval', {}))
  if settings.split not in ('train', 'val', 'test'):
    raise ValueError(f"config.eval.split: expected 'train', 'val' or 'test', got "
                     f'{settings.split!r}')
  if settings.beam_size < 1 or settings.batch_size < 1:
    raise ValueError(f'config.eval.beam_size and config.eval.batch_size: expected >= 1, got '
                     f'{settings.beam_size} and {settings.batch_size}')
  if settings.caption_protocol not in metrics.CAPTION_PROTOCOLS:
    raise ValueError(f'config.eval.caption_protocol: expected one of '
                     f'{list(metrics.CAPTION_PROTOCOLS)}, got {settings.caption_protocol!r}')
  return settings


def _workdir_config_argv(argv: list[str]) -> list[str]:
  """With --workdir and no --config, the run's saved config becomes the --config file, so that
  --config.eval.* overrides apply to it."""
  if any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  for i, a in enumerate(argv):
    if a.startswith('--workdir=') or (a == '--workdir' and i + 1 < len(argv)):
      workdir = a.split('=', 1)[1] if '=' in a else argv[i + 1]
      from configs import workdir as workdir_config  # pylint: disable=import-outside-toplevel
      return [argv[0], f'--config={workdir_config.__file__}:{workdir}', *argv[1:]]
  return argv


def main():
  """The command line. Flags are defined here, not at import, so that importing this module
  (launch.py does) defines none."""
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'The config the model was trained with (default with --workdir: the run\'s '
      'config.json). Eval settings live in it: --config.eval.beam_size=3, '
      '--config.eval.split=val, --config.eval.max_pairs=100, --config.eval.num_figures=0.')
  checkpoint_flag = flags.DEFINE_string('checkpoint', None, 'A model dir (convert output or a '
                                        'run\'s best/).')
  workdir_flag = flags.DEFINE_string('workdir', None, 'A training workdir: uses its config.json '
                                     '(unless --config is given) and best/.')
  out_flag = flags.DEFINE_string('out', None, 'Output dir (default: eval_<split> next to the '
                                 'checkpoint).')

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config, checkpoint = config_flag.value, checkpoint_flag.value
    if workdir_flag.value:
      checkpoint = checkpoint or os.path.join(workdir_flag.value, 'best')
    if config is None or checkpoint is None:
      raise app.UsageError('give --config and --checkpoint, or --workdir')
    evaluate(config, checkpoint, out_dir=out_flag.value)  # failures: one line, exit 1 (cli.run)

  cli.run(run, argv=_workdir_config_argv(sys.argv))


if __name__ == '__main__':
  cli.use_transparent_huge_pages()
  main()
