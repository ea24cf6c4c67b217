"""The own-imagery tool on a georeferenced synthetic scene: quality and speed.

  python benchmarks/own_imagery.py quality --checkpoint runs/demo/best [--rows 20 --cols 20]
  python benchmarks/own_imagery.py speed --config configs/levir.py [--tiles 64]

quality: lays out rows x cols synthetic pairs (seed --seed, about a third changed, pairs the
demo never trained on: split 'scene') as two GeoTIFFs, then runs `predict caption`, `predict
index` and one `predict search` per change type, through the command's own code. Prints
precision@10 of each query, plain, with --focus_change, and with {place} where the captions name
the place (a hit counts when its tile's ground truth has that kind of change),
the share of changed tiles among the top third by caption's change score, and tiles/s.

speed: tiles/s of captioning and of embedding (index) with the config's model at random
weights (levir: 224 px tiles cut from a 4-tile-wide scene), after a warm-up batch that compiles.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from rsicrc_jax import cli

# One query per change type of the synthetic scenes, in the captions' own words.
QUERIES = {
    'houses_built': 'houses are built on the bareland',
    'houses_removed': 'the houses are removed',
    'road_built': 'a road is built',
    'trees_to_houses': 'the trees are replaced by houses',
    'trees_removed': 'the trees are removed',
}
# The same with {place} where the captions name the place: search tries the nine places.
ANYWHERE = {
    'houses_built': 'houses are built on the bareland {place}',
    'houses_removed': 'the houses {place} are removed',
    'road_built': 'a road is built {place}',
    'trees_to_houses': 'the trees {place} are replaced by houses',
    'trees_removed': 'the trees {place} are removed',
}


def quality(args):
  from rsicrc_jax import predict  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  with open(os.path.join(args.checkpoint, 'config.json')) as f:
    size = json.load(f)['image_size']
  work = args.workdir or tempfile.mkdtemp(prefix='own_imagery_')
  os.makedirs(work, exist_ok=True)
  before, after = os.path.join(work, 'before.tif'), os.path.join(work, 'after.tif')
  truth = synthetic.write_scene_rasters(before, after, seed=args.seed, rows=args.rows,
                                        cols=args.cols, size=size)
  kinds = {tuple(t['window']): {e['kind'] for e in t['events']} for t in truth}
  changed = sum(t['changed'] for t in truth)
  print(f'scene: {args.rows}x{args.cols} tiles of {size} px, {changed} changed '
        f'({changed / len(truth):.0%}); written to {work}')
  common = ['--checkpoint', args.checkpoint, '--before', before, '--after', after, '--quiet']
  out = os.path.join(work, 'caption')
  t = time.perf_counter()
  cap_summary = predict.main(['caption', *common, '--out', out, '--overwrite'])
  cap_s = time.perf_counter() - t
  recs = [json.loads(l) for l in open(os.path.join(out, 'captions.jsonl'))]
  ranked = sorted(recs, key=lambda r: -r['change_score'])
  top = ranked[:len(ranked) // 3]
  share = np.mean([bool(kinds[tuple(r['window'])]) for r in top])
  best_possible = min(changed, len(top)) / len(top)
  idx = os.path.join(work, 'index')
  shutil.rmtree(idx, ignore_errors=True)  # a fresh index: time every tile
  t = time.perf_counter()
  idx_summary = predict.main(['index', *common, '--index', idx, '--caption'])
  idx_s = time.perf_counter() - t
  print(f'caption: {cap_summary["tiles_per_s"]} tiles/s in the loop ({cap_s:.1f} s with '
        f'loading and writing); index --caption: {idx_summary["tiles_per_s"]} tiles/s '
        f'({idx_s:.1f} s)')
  print(f'changed tiles among the top third by change score: {share:.3f} '
        f'(the most possible: {best_possible:.3f}; all tiles: {changed / len(truth):.3f})')
  print('\n| change type | query | tiles of that type | precision@10 | with --focus_change '
        '| with {place} |')
  print('| --- | --- | --- | --- | --- | --- |')
  ways = {'plain': [], 'focus': [], 'place': []}
  for kind, query in QUERIES.items():
    row = []
    for way, extra in (('plain', []), ('focus', ['--focus_change']), ('place', [])):
      hits = os.path.join(work, f'search_{kind}_{way}')
      text = ANYWHERE[kind] if way == 'place' else query
      predict.main(['search', '--index', idx, '--query', text, '-k', '10', '--out', hits,
                    '--overwrite', '--quiet'] + extra)
      got = [json.loads(l) for l in open(os.path.join(hits, 'results.jsonl'))]
      p10 = np.mean([kind in kinds[tuple(r['window'])] for r in got])
      ways[way].append(p10)
      row.append(f'{p10:.1f}')
    n = sum(kind in k for k in kinds.values())
    print(f'| {kind} | "{query}" / "{ANYWHERE[kind]}" | {n} | {" | ".join(row)} |')
  print('| mean | | | ' + ' | '.join(f'{np.mean(v):.2f}' for v in ways.values()) + ' |')
  print(f'\nreport: {os.path.join(out, "report.html")}')


def speed(args):
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel,unused-import
  import importlib.util  # pylint: disable=import-outside-toplevel
  from rsicrc_jax import evaluators, predict  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.models import RSICRC  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('cfg', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config().model
  vocab = {w: i for i, w in enumerate(['PAD', 'START', 'UNK', 'END'])}
  for c in synthetic.make_scene(0, 'train', 0).captions + tuple(synthetic.NO_CHANGE_SENTENCES):
    for w in c.split():
      vocab.setdefault(w, len(vocab))
  cfg.vocab_size = cfg.vocab_size or len(vocab)
  vocab.update({f'w{i}': i for i in range(len(vocab), cfg.vocab_size)})
  model = RSICRC(cfg, rngs=nnx.Rngs(0))
  model.eval()
  p = predict.Predictor('(random weights)', model, cfg.to_dict(), vocab, 'synthetic', '',
                        evaluators.Inference(model))
  work = tempfile.mkdtemp(prefix='own_imagery_speed_')
  size = cfg.image_size
  cols = 4
  rows = -(-(args.tiles + args.batch) // cols)
  before, after = os.path.join(work, 'before.tif'), os.path.join(work, 'after.tif')
  synthetic.write_scene_rasters(before, after, seed=0, rows=rows, cols=cols, size=size)
  imagery = predict.Imagery(before=before, after=after)
  tiles = imagery.tiles(size)
  print(f'{jax.devices()[0].device_kind} x {len(jax.local_devices())}: {args.config}, '
        f'{size} px tiles, batch {args.batch}, random weights')
  for decode in (False, True):
    run = lambda ts: sum(len(b.tiles) for b in predict.run_tiles(
        p, imagery, ts, batch_size=args.batch, decode=decode, progress=False))
    run(tiles[:args.batch])  # compile
    t = time.perf_counter()
    n = run(tiles[args.batch:args.batch + args.tiles])
    dt = time.perf_counter() - t
    print(f'{"caption (embed + greedy decode)" if decode else "index (embed)"}: {n} tiles in '
          f'{dt:.1f} s = {n / dt:.1f} tiles/s')


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='what', required=True)
  q = sub.add_parser('quality')
  q.add_argument('--checkpoint', default='runs/demo/best')
  q.add_argument('--rows', type=int, default=20)
  q.add_argument('--cols', type=int, default=20)
  q.add_argument('--seed', type=int, default=0)
  q.add_argument('--workdir', help='Where the scene and the outputs go (default: a temp dir).')
  s = sub.add_parser('speed')
  s.add_argument('--config', default='configs/demo.py')
  s.add_argument('--tiles', type=int, default=256)
  s.add_argument('--batch', type=int, default=64)
  args = p.parse_args()
  from rsicrc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_third_party_logs()
  cli.drop_noise_warnings()  # Orbax's 'Metadata file does not exist', once per model load
  quality(args) if args.what == 'quality' else speed(args)


if __name__ == '__main__':
  cli.use_transparent_huge_pages()  # as launch.py: what users run
  main()
