r"""Caption, index and search changes in your own imagery.

  python -m rsicrc_jax.predict caption --checkpoint runs/demo/best \
      --before 2019.tif --after 2023.tif --out out/
  python -m rsicrc_jax.predict index --checkpoint runs/demo/best --pairs archive/ --index idx/
  python -m rsicrc_jax.predict search --index idx/ --query "houses are built on the bareland" \
      --out hits/

`--checkpoint` is a model directory: a training run's `best/` (or any of its checkpoints'
model dirs) or what `python -m rsicrc_jax.convert rsicrc` wrote. Its vocabulary is found beside
it (vocab.json in the directory or its run's workdir, or the run's dataset) or given with
--vocab.

Embedding and captioning are eval's (`rsicrc_jax.evaluators.Inference`): batched, jit-compiled,
KV-cached greedy decoding, data parallel over this process's devices. With --num_processes and
--process_id, each process (host) takes every num_processes-th tile; `index` runs then fill one
index directory, and `caption` runs one --out (the last process to finish merges the parts). Each subcommand has its own --help.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from rsicrc_jax import cli
from rsicrc_jax import index as emb_index
from rsicrc_jax import rasters
from rsicrc_jax import report
from rsicrc_jax.data import captions as cap

CAPTION_FIELDS = ('tile_id', 'window', 'bbox', 'crs', 'caption', 'change_score', 'before', 'after')


# ----------------------------------------------------------------------------------------------
# The model, its vocabulary, and what the archive needs to know about it.

def model_fingerprint(model) -> str:
  """A hash of every saved weight (parameters and BatchNorm statistics): embeddings from two
  models with the same fingerprint are comparable."""
  import jax  # pylint: disable=import-outside-toplevel
  from rsicrc_jax import model_io  # pylint: disable=import-outside-toplevel
  h = hashlib.blake2b(digest_size=20)
  leaves = jax.tree_util.tree_flatten_with_path(model_io.state_dict_of(model))[0]
  for path, value in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(value))
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def find_vocabulary(checkpoint: str, vocab_path: str | None = None) -> tuple[dict[str, int], str]:
  """(vocab, where it came from): --vocab; vocab.json in the model dir or the directory above
  (a run's workdir); else the dataset named by the run's config.json."""
  if vocab_path:
    return cap.read_vocabulary(vocab_path), vocab_path
  checkpoint = os.path.abspath(checkpoint)
  for d in (checkpoint, os.path.dirname(checkpoint)):
    path = os.path.join(d, 'vocab.json')
    if os.path.isfile(path):
      return cap.read_vocabulary(path), path
  run_config = os.path.join(os.path.dirname(checkpoint), 'config.json')
  if os.path.isfile(run_config):
    with open(run_config) as f:
      data = json.load(f).get('data', {})
    if data.get('vocab_path'):
      return cap.read_vocabulary(data['vocab_path']), data['vocab_path']
    from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    try:
      dataset = pipeline.open_dataset(data)
    except cap.DataError as err:
      raise cap.DataError(f'{checkpoint}: its vocabulary is that of the run\'s dataset, which '
                          f'cannot be opened ({err}); pass --vocab FILE') from err
    return dataset.vocab, dataset.describe()
  raise FileNotFoundError(f'{checkpoint}: no vocabulary found (no vocab.json there or in the '
                          'directory above, no run config.json); pass --vocab FILE, the '
                          'vocab.json of the dataset the model was trained on')


@dataclasses.dataclass
class Predictor:
  """A loaded model with its vocabulary, replicated over this process's devices."""
  checkpoint: str
  model: object
  model_config: dict  # the model dir's config.json
  vocab: dict[str, int]
  vocab_source: str
  fingerprint: str
  inference: object  # evaluators.Inference

  @classmethod
  def load(cls, checkpoint: str, vocab_path: str | None = None, *,
           vocab: dict[str, int] | None = None) -> 'Predictor':
    from rsicrc_jax import evaluators  # pylint: disable=import-outside-toplevel
    from rsicrc_jax import model_io  # pylint: disable=import-outside-toplevel
    checkpoint = os.path.abspath(checkpoint)
    if vocab is not None:
      source = 'the index'
    else:
      vocab, source = find_vocabulary(checkpoint, vocab_path)
    model = model_io.load_model(checkpoint)
    size = model.decoder.tokens_embed.num_embeddings
    if size != len(vocab):
      raise ValueError(f'{checkpoint}: the model has {size} words but the vocabulary '
                       f'({source}) has {len(vocab)}; pass the --vocab it was trained with')
    with open(os.path.join(checkpoint, 'config.json')) as f:
      model_config = json.load(f)
    return cls(checkpoint, model, model_config, vocab, source, model_fingerprint(model),
               evaluators.Inference(model))

  @property
  def image_size(self) -> int:
    return int(self.model_config['image_size'])

  @property
  def max_len(self) -> int:
    return int(self.model.decoder.max_len)

  def describe(self) -> dict:
    return {'checkpoint': self.checkpoint, 'fingerprint': self.fingerprint,
            'image_size': self.image_size}

  def text_embeddings(self, token_rows: np.ndarray) -> np.ndarray:
    n = len(token_rows)
    rows = np.concatenate([token_rows, np.repeat(token_rows[-1:], self.inference.round_batch(n)
                                                 - n, axis=0)])
    return np.asarray(self.inference.embed_text(rows))[:n]

  @property
  def embedding_dim(self) -> int:
    """The size of pair and text embeddings: the decoder's width (d_model)."""
    return int(self.model.decoder.tokens_embed.features)

  def no_change_embedding(self) -> np.ndarray | None:
    """The mean of the normalised text embeddings of LEVIR-CC's five no-change sentences (those
    with a word in the vocabulary): the point a change score measures the distance from. None
    when the vocabulary has none of their words (a model trained on other captions)."""
    rows = []
    for sentence in cap.NO_CHANGE_SENTENCES:
      try:
        rows.append(query_tokens(sentence, self.vocab, self.max_len)[0])
      except ValueError:
        continue
    if not rows:
      return None
    mean = emb_index.normalize(self.text_embeddings(np.stack(rows))).mean(0, keepdims=True)
    return emb_index.normalize(mean)[0]


def query_tokens(text: str, vocab: dict[str, int], max_len: int) -> tuple[np.ndarray, list[str]]:
  """A query as the captions were tokenised (lower case, punctuation dropped) -> (tokens
  (max_len,), unknown words). Refuses an empty query, one with no known word, or one too long."""
  words = cap.normalize_caption(text).split()
  if not words:
    raise ValueError(f'the query {text!r} is empty; write what changed, e.g. "houses are built '
                     'on the bareland"')
  unknown = [w for w in words if w not in vocab]
  if len(unknown) == len(words):
    raise ValueError(f'no word of the query {text!r} is in the model\'s vocabulary '
                     f'({len(vocab)} words); unknown: {", ".join(unknown)}')
  ids = cap.encode_caption(words, vocab, max_len)
  if ids is None:
    raise ValueError(f'the query has {len(words)} words; this model reads at most {max_len - 2}')
  return ids, unknown


def focus_on_change(query: np.ndarray, no_change: np.ndarray) -> np.ndarray:
  """(Q, C) query embeddings without their component along the (unit) no-change embedding.
  The cosine of a pair with the result ranks pairs by how much more they match the query than
  "nothing changed" would explain: cos(pair, q) - (q . n) cos(pair, n) for unit q, up to the
  query's norm, which does not change the order. Short queries of a CPU-trained model can sit
  close to the no-change sentences (cosine 0.92 for "a road is built" with the demo model) and
  then rank unchanged pairs first."""
  q = emb_index.normalize(query)
  return q - (q @ no_change)[:, None] * no_change[None, :]


PLACE = '{place}'
# The nine cells of a 3 x 3 grid, in words that LEVIR-CC's and the synthetic captions use (LEVIR-CC
# phrases places in many ways: --places gives others).
DEFAULT_PLACES = ('in the top left corner', 'at the top', 'in the top right corner', 'on the left',
                  'in the center', 'on the right', 'in the bottom left corner', 'at the bottom',
                  'in the bottom right corner')


def expand_places(query: str, places: Sequence[str] = DEFAULT_PLACES) -> list[str]:
  """The query with {place} replaced by each place phrase; the query alone without {place}.
  Captions name where a change happened, and a model trained on them reads a query that names
  no place as one particular place (the demo models: the center), so that it ranks that
  place's changes of any kind first."""
  if PLACE not in query:
    return [query]
  return [' '.join(query.replace(PLACE, p).split()) for p in places]


def best_over_variants(scores: np.ndarray, ids: np.ndarray, k: int):
  """(P, k') scores and ids of P query variants -> the k pairs with the highest score over the
  variants: (scores (k,), ids (k,), variant (k,)), ties to the lower id as a single search. Exact
  whenever each variant's own top k' (k' >= k) is: a pair in the top k by its best score is in
  the top k of the variant that gives that score."""
  best: dict[int, tuple[float, int]] = {}
  for v, (row_s, row_i) in enumerate(zip(scores, ids)):
    for sc, i in zip(row_s, row_i):
      i = int(i)
      if i >= 0 and (i not in best or sc > best[i][0]):
        best[i] = (float(sc), v)
  order = sorted(best, key=lambda i: (-best[i][0], i))[:k]
  return (np.array([best[i][0] for i in order]), np.array(order, dtype=np.int64),
          np.array([best[i][1] for i in order], dtype=np.int64))


def change_scores(visual: np.ndarray, no_change: np.ndarray | None) -> list[float | None]:
  """1 - cosine(pair embedding, no-change embedding), in [0, 2]: larger is further from 'no
  change', so changed tiles sort first. None for each pair when the model has no no-change
  embedding (see Predictor.no_change_embedding)."""
  if no_change is None:
    return [None] * len(visual)
  return [float(x) for x in 1.0 - emb_index.normalize(visual) @ no_change]


_NO_SCORE = ('change scores: none (the model\'s vocabulary has no word of the no-change '
             'sentences they are measured from)')


# ----------------------------------------------------------------------------------------------
# Imagery: which tiles, and reading them.

@dataclasses.dataclass
class Imagery:
  """Tiles of a raster pair (--before/--after) or of a folder of pairs (--pairs)."""
  before: str | None = None
  after: str | None = None
  pairs: str | None = None
  tile: int = 0  # 0: the model's input size for rasters; the whole image for --pairs
  stride: int = 0  # 0: = tile
  bands: tuple[int, ...] | None = None
  align: bool = False
  percentiles: tuple[float, float] = (2.0, 98.0)

  def __post_init__(self):
    if bool(self.pairs) == bool(self.before or self.after):
      raise ValueError('give either --before and --after, or --pairs')
    if not self.pairs and not (self.before and self.after):
      raise ValueError('--before and --after go together')
    self._lock = threading.Lock()  # reader threads open pairs too
    self._open: collections.OrderedDict = collections.OrderedDict()  # the pairs open, LRU
    self._grids: dict[tuple[str, str], tuple] = {}  # (crs, transform, aligned) per pair

  def _pair(self, before: str, after: str) -> rasters.RasterPair:
    key = (before, after)
    with self._lock:
      pair = self._open.get(key)
      if pair is None:
        pair = rasters.RasterPair(before, after, bands=self.bands, align=self.align,
                                  percentiles=self.percentiles)
        self._open[key] = pair
        self._grids[key] = (pair.crs, pair.transform, pair.aligned)
        while len(self._open) > 16:  # a folder of pairs: few files open at a time; a pair
          self._open.popitem(last=False)  # still being read elsewhere closes when released
      else:
        self._open.move_to_end(key)
      return pair

  def tiles(self, image_size: int) -> list[rasters.Tile]:
    out = []
    if self.pairs:
      for before, after in rasters.pair_folder(self.pairs):
        pair = self._pair(before, after)
        stem = os.path.splitext(os.path.basename(before))[0]
        if self.tile:
          out += pair.tiles(self.tile, self.stride or self.tile, prefix=stem)
        else:
          out.append(rasters.Tile(stem, pair.before, pair.after, (0, 0, pair.height, pair.width)))
    else:
      pair = self._pair(os.path.abspath(self.before), os.path.abspath(self.after))
      tile = self.tile or image_size
      out = pair.tiles(tile, self.stride or tile)
    repeated = [i for i, n in collections.Counter(t.tile_id for t in out).items() if n > 1]
    if repeated:
      raise rasters.InputError(f'tile names repeat ({sorted(repeated)[:3]}); give each pair its '
                               'own file name')
    return out

  def read(self, tile: rasters.Tile, image_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(before, after uint8 (S, S, 3) at the model's input size, nodata share)."""
    from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    a, b, nodata = self._pair(tile.before, tile.after).read(tile.window)
    return (pipeline.resize_center_crop(a, image_size),
            pipeline.resize_center_crop(b, image_size), nodata)

  def geo(self, tile: rasters.Tile) -> dict:
    """bbox in the image's CRS, the WGS84 footprint, whether the after image was warped."""
    crs, transform, aligned = self._grids[(tile.before, tile.after)]
    bbox = rasters.window_bbox(tile.window, transform, crs)
    return {'bbox': bbox, 'crs': crs.to_string() if crs is not None else None,
            'footprint': rasters.footprint_wgs84(bbox, crs), 'aligned': aligned}

  @property
  def aligned(self) -> bool:
    return any(g[2] for g in self._grids.values())

  def settings(self) -> dict:
    """How tiles are read, stored in the index so that `search` reads them back the same way."""
    return {'bands': list(self.bands) if self.bands else None,
            'percentiles': list(self.percentiles), 'align': self.align}


def process_share(tiles: list, process_id: int, num_processes: int) -> list:
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id {process_id}: expected 0 .. --num_processes - 1 '
                     f'({num_processes - 1})')
  return tiles[process_id::num_processes]


@dataclasses.dataclass
class Batch:
  tiles: list[rasters.Tile]
  before: np.ndarray  # uint8 (n, S, S, 3)
  after: np.ndarray
  visual: np.ndarray  # (n, C)
  tokens: np.ndarray | None = None  # (n, max_len + 1)
  attention: np.ndarray | None = None  # (n, max_len, S)


def run_tiles(predictor: Predictor, imagery: Imagery, tiles: Sequence[rasters.Tile], *,
              batch_size: int, decode: bool, beam_size: int = 1, max_nodata: float = 0.5,
              num_threads: int = 4, progress: bool = True, skipped: list | None = None
              ) -> Iterator[Batch]:
  """Reads the tiles (a thread pool ahead of the model) and yields embedded (and captioned)
  batches in tile order. Tiles with more than `max_nodata` nodata pixels in either image are
  left out and appended to `skipped`."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  inf, size = predictor.inference, predictor.image_size
  batch_size = inf.round_batch(batch_size)
  bar = tqdm(total=len(tiles), unit='tile', desc='caption' if decode else 'embed',
             disable=not progress, smoothing=0.1)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
  try:
    chunks = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    ahead = [pool.map(lambda t: imagery.read(t, size), c) for c in chunks[:2]]
    for k, chunk in enumerate(chunks):
      read = list(ahead.pop(0))
      if k + 2 < len(chunks):
        ahead.append(pool.map(lambda t: imagery.read(t, size), chunks[k + 2]))
      keep = [i for i, (_, _, nodata) in enumerate(read) if nodata <= max_nodata]
      if skipped is not None:
        skipped += [t for t, (_, _, nodata) in zip(chunk, read) if nodata > max_nodata]
      if keep:
        a = np.stack([read[i][0] for i in keep])
        b = np.stack([read[i][1] for i in keep])
        pad = batch_size - len(keep)  # fixed shapes: one compiled program
        pa, pb = (np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in (a, b))
        if decode:  # one image encoding gives the captions and the embeddings
          tokens, attn, visual = inf.caption(pa, pb, beam_size=beam_size, with_embedding=True)
          out = Batch([chunk[i] for i in keep], a, b, np.asarray(visual)[:len(keep)],
                      tokens[:len(keep)], None if attn is None else attn[:len(keep)])
        else:
          out = Batch([chunk[i] for i in keep], a, b,
                      np.asarray(inf.embed_images(pa, pb))[:len(keep)])
        yield out
      bar.update(len(chunk))
  finally:
    bar.close()
    pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# caption

def caption(args) -> dict:
  """Captions every tile pair; writes captions.jsonl, captions.geojson, report.html.

  With --num_processes N, each process captions its share and saves it as a part beside OUT
  (OUT.parts/p<k>-of-<N>/, written whole); the process that completes the set merges the parts
  into OUT, which is then the same as one process would write."""
  from rsicrc_jax import evaluators  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(args.out)
  if os.path.exists(out) and not args.overwrite:  # before the work, not after it
    raise FileExistsError(f'{out} already exists; remove it or pass --overwrite')
  predictor = Predictor.load(args.checkpoint, args.vocab)
  imagery = _imagery(args)
  all_tiles = imagery.tiles(predictor.image_size)
  tiles = process_share(all_tiles, args.process_id, args.num_processes)
  words = cap.id_to_word(predictor.vocab)
  no_change = predictor.no_change_embedding()
  records, maps, skipped = [], {}, []
  start = time.perf_counter()
  for batch in run_tiles(predictor, imagery, tiles, batch_size=args.batch_size, decode=True,
                         beam_size=args.beam_size, max_nodata=args.max_nodata,
                         num_threads=args.num_threads, progress=not args.quiet, skipped=skipped):
    scores = change_scores(batch.visual, no_change)
    for i, t in enumerate(batch.tiles):
      text = cap.decode_caption(batch.tokens[i], words)
      geo = imagery.geo(t)
      records.append({'tile_id': t.tile_id, 'window': list(t.window), 'bbox': geo['bbox'],
                      'crs': geo['crs'], 'caption': text, 'change_score': scores[i],
                      'before': t.before, 'after': t.after, 'footprint': geo['footprint']})
      if batch.attention is not None:
        maps[t.tile_id] = evaluators.attention_map(batch.attention[i], text)
  seconds = time.perf_counter() - start
  summary = {'tiles': len(tiles), 'captioned': len(records), 'skipped_nodata': len(skipped),
             'seconds': round(seconds, 2), 'tiles_per_s': round(len(tiles) / max(seconds, 1e-9), 2),
             'aligned': imagery.aligned, 'model': predictor.describe(),
             'vocabulary': predictor.vocab_source}
  if args.num_processes > 1:
    job = _caption_job(args, predictor, imagery)
    parts_dir = out + '.parts'
    _save_part(parts_dir, args, job, records, maps, summary)
    merged = _merge_parts(parts_dir, args, job, [t.tile_id for t in all_tiles])
    if merged is None:
      summary['merged'] = False
      if not args.quiet:
        print(f'{len(records)} tiles captioned ({summary["tiles_per_s"]} tiles/s), '
              f'{len(skipped)} skipped as nodata; part {args.process_id + 1} of '
              f'{args.num_processes} saved in {parts_dir}; the last process to finish writes '
              f'{out}')
      return summary
    records, maps, summary = merged
    summary['merged'] = True
  _write_captions(out, args, records, maps, summary, imagery, predictor.image_size,
                  no_change is not None)
  if args.num_processes > 1:
    shutil.rmtree(out + '.parts', ignore_errors=True)
  if not args.quiet:
    print(f'{summary["captioned"]} tiles captioned ({summary["tiles_per_s"]} tiles/s), '
          f'{summary["skipped_nodata"]} skipped as nodata; written to {out}')
  return summary


def _write_captions(out, args, records, maps, summary, imagery, image_size, scored) -> None:
  """OUT, written whole (a temporary directory renamed into place)."""
  from rsicrc_jax import model_io  # pylint: disable=import-outside-toplevel
  job = summary.get('job')
  if job and _read_summary(os.path.join(out, 'summary.json')).get('job') == job:
    return  # another process of this job completed the set at the same moment and wrote it
  with model_io.atomic_output(out, is_dir=True, overwrite=True) as tmp:
    report.write_jsonl(os.path.join(tmp, 'captions.jsonl'),
                       ({k: r[k] for k in CAPTION_FIELDS} for r in records))
    if any(r['footprint'] for r in records):
      report.write_geojson(os.path.join(tmp, 'captions.geojson'), records,
                           ('tile_id', 'caption', 'change_score', 'window', 'bbox'))
    if not scored:
      ranked, title, meta = records, 'Tiles', _meta(summary, args) + [_NO_SCORE]
    else:
      ranked = sorted(records, key=lambda r: -r['change_score'])
      title, meta = 'Changes, most changed first', _meta(summary, args)
    _html_report(os.path.join(tmp, 'report.html'), title, ranked, imagery, image_size,
                 maps, args.report_tiles, meta, _score_line)
    with open(os.path.join(tmp, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)


def _caption_job(args, predictor: Predictor, imagery: Imagery) -> str:
  """What makes the parts of one multi-process caption run belong together: the model, the
  imagery and how it is cut and read, the decoding, the number of processes."""
  job = {'model': predictor.fingerprint, 'before': _abs(args.before), 'after': _abs(args.after),
         'pairs': _abs(args.pairs), 'tile': args.tile, 'stride': args.stride,
         'read': imagery.settings(), 'max_nodata': args.max_nodata, 'beam_size': args.beam_size,
         'report_tiles': args.report_tiles, 'num_processes': args.num_processes}
  return hashlib.blake2b(json.dumps(job, sort_keys=True).encode(), digest_size=12).hexdigest()


def _abs(path: str | None) -> str | None:
  return os.path.abspath(path) if path else None


def _read_summary(path: str) -> dict:
  """A caption summary.json, or {} when it is missing or unreadable."""
  try:
    with open(path) as f:
      summary = json.load(f)
    return summary if isinstance(summary, dict) else {}
  except (OSError, ValueError):
    return {}


def _save_part(parts_dir, args, job, records, maps, summary) -> None:
  from rsicrc_jax import model_io  # pylint: disable=import-outside-toplevel
  name = os.path.join(parts_dir, f'p{args.process_id}-of-{args.num_processes}')
  with model_io.atomic_output(name, is_dir=True, overwrite=True) as tmp:
    report.write_jsonl(os.path.join(tmp, 'records.jsonl'), records)
    np.savez(os.path.join(tmp, 'attention.npz'), **{f'm{i}': maps[r['tile_id']]
                                                    for i, r in enumerate(records)
                                                    if r['tile_id'] in maps})
    with open(os.path.join(tmp, 'summary.json'), 'w') as f:
      json.dump({**summary, 'job': job, 'process_id': args.process_id}, f, indent=1)


def _merge_parts(parts_dir, args, job, tile_order):
  """(records in tile order, attention maps, summary) when every part of `job` is saved, else
  None. A part of another job (other imagery, model or settings) is an error, not mixed in."""
  n = args.num_processes
  parts = {}  # name -> (path, its summary), each summary read once
  for name in sorted(os.listdir(parts_dir)):
    if name.startswith('.') or '.partial-' in name:
      continue  # a part being written
    path = os.path.join(parts_dir, name)
    part_summary = _read_summary(os.path.join(path, 'summary.json'))
    if part_summary.get('job') != job:
      raise ValueError(f'{path} is a part of another caption run (other imagery, model, '
                       f'settings or --num_processes); remove {parts_dir} and run every '
                       'process again')
    parts[name] = (path, part_summary)
  if sorted(parts) != sorted(f'p{k}-of-{n}' for k in range(n)):
    return None
  records, maps = [], {}
  summaries = [part_summary for _, part_summary in parts.values()]
  for path, _ in parts.values():
    with open(os.path.join(path, 'records.jsonl')) as f:
      recs = [json.loads(line) for line in f]
    with np.load(os.path.join(path, 'attention.npz')) as z:
      maps.update({recs[int(k[1:])]['tile_id']: z[k] for k in z.files})
    records += recs
  position = {tid: i for i, tid in enumerate(tile_order)}
  records.sort(key=lambda r: position[r['tile_id']])
  tiles = sum(s['tiles'] for s in summaries)
  seconds = max(s['seconds'] for s in summaries)
  summary = {**summaries[0], 'tiles': tiles, 'captioned': len(records),
             'skipped_nodata': sum(s['skipped_nodata'] for s in summaries),
             'seconds': seconds, 'tiles_per_s': round(tiles / max(seconds, 1e-9), 2),
             'processes': n, 'job': job}
  summary.pop('process_id')
  return records, maps, summary


def _score_line(r: dict) -> str:
  parts = [f'score {r["score"]:.4f}'] if 'score' in r else []
  if r.get('change_score') is not None:
    parts.append(f'change score {r["change_score"]:.3f}')
  return ', '.join(parts)


def _meta(summary: dict, args) -> list[str]:
  src = args.pairs or f'{args.before} -> {args.after}'
  lines = [f'source: {src}', f'model: {summary["model"]["checkpoint"]}',
           f'{summary["captioned"]} tiles captioned, {summary["skipped_nodata"]} skipped '
           f'(more than {args.max_nodata:.0%} nodata)']
  if summary['aligned']:
    lines.append('the after image was warped onto the before image\'s grid (--align)')
  return lines


def _html_report(path, title, ranked, imagery, image_size, maps, limit, meta, score_line):
  out_dir = os.path.dirname(path)
  img_dir = os.path.join(out_dir, 'tiles')
  os.makedirs(img_dir, exist_ok=True)
  entries = []
  for n, r in enumerate(ranked[:limit] if limit else ranked):
    tile = rasters.Tile(r['tile_id'], r['before'], r['after'], tuple(r['window']))
    stem = f'{n:05d}'
    try:
      a, b, _ = imagery.read(tile, image_size)
    except (rasters.InputError, OSError):
      a = b = None
    images = []
    if a is not None:
      images.append(('before', report.relpath(report.save_thumbnail(
          a, os.path.join(img_dir, f'{stem}_before.jpg')), out_dir)))
      images.append(('after', report.relpath(report.save_thumbnail(
          b, os.path.join(img_dir, f'{stem}_after.jpg')), out_dir)))
      if r['tile_id'] in maps:
        images.append(('where the caption looked', report.relpath(report.save_thumbnail(
            report.attention_overlay(b, maps[r['tile_id']]),
            os.path.join(img_dir, f'{stem}_attention.jpg')), out_dir)))
    else:
      images = [('before', None), ('after', None)]
    lines = [score_line(r), f'window (row, col, height, width): {r["window"]}']
    if r.get('bbox'):
      lines.append(f'bbox ({r["crs"]}): ' + ', '.join(f'{v:.2f}' for v in r['bbox']))
    lines.append(f'{os.path.basename(r["before"])} -> {os.path.basename(r["after"])}')
    entries.append({'heading': f'{n + 1}. {r["tile_id"]}', 'caption': r.get('caption'),
                    'lines': lines, 'images': images})
  report.write_html(path, title, meta, entries)


def _imagery(args) -> Imagery:
  return Imagery(before=args.before, after=args.after, pairs=args.pairs, tile=args.tile,
                 stride=args.stride, bands=rasters.parse_bands(args.bands), align=args.align,
                 percentiles=_percentiles(args.percentiles))


def _places(text: str) -> list[str]:
  places = [' '.join(p.split()) for p in text.split(';')]
  if not all(places):
    raise ValueError(f'--places {text!r}: expected place phrases separated by ";", none empty')
  return places


def _percentiles(text: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in text.split(','))
  except ValueError:
    raise ValueError(f'--percentiles {text!r}: expected LOW,HIGH, e.g. 2,98') from None
  if not 0 <= lo < hi <= 100:
    raise ValueError(f'--percentiles {text!r}: expected 0 <= LOW < HIGH <= 100')
  return lo, hi


# ----------------------------------------------------------------------------------------------
# index

def build_index(args) -> dict:
  """Embeds every tile pair not yet in the index and adds it, a segment at a time."""
  predictor = Predictor.load(args.checkpoint, args.vocab)
  imagery = _imagery(args)
  tiles = process_share(imagery.tiles(predictor.image_size), args.process_id, args.num_processes)
  no_change = predictor.no_change_embedding()
  idx = emb_index.TileIndex.open_or_create(args.index, embedding_dim=predictor.embedding_dim,
                                           model=predictor.describe(), vocab=predictor.vocab)
  idx.remove_leftovers()  # half-written segments of a killed run
  present = idx.tile_ids()
  todo = [t for t in tiles if t.tile_id not in present]
  words = cap.id_to_word(predictor.vocab)
  pending_r, pending_e, skipped, added = [], [], [], 0
  writer = f'p{args.process_id}'

  def flush():
    nonlocal pending_r, pending_e, added
    if pending_r:
      idx.add(pending_r, np.concatenate(pending_e), writer=writer)
      added += len(pending_r)
      pending_r, pending_e = [], []

  start = time.perf_counter()
  for batch in run_tiles(predictor, imagery, todo, batch_size=args.batch_size,
                         decode=args.caption, max_nodata=args.max_nodata,
                         num_threads=args.num_threads, progress=not args.quiet, skipped=skipped):
    scores = change_scores(batch.visual, no_change)
    for i, t in enumerate(batch.tiles):
      rec = {**t.to_json(), **imagery.geo(t), 'change_score': scores[i],
             'read': imagery.settings()}
      if batch.tokens is not None:
        rec['caption'] = cap.decode_caption(batch.tokens[i], words)
      pending_r.append(rec)
    pending_e.append(batch.visual)
    if len(pending_r) >= args.segment_tiles:
      flush()
  flush()
  seconds = time.perf_counter() - start
  summary = {'tiles': len(tiles), 'already_indexed': len(tiles) - len(todo), 'added': added,
             'skipped_nodata': len(skipped), 'index_size': len(emb_index.TileIndex(args.index)),
             'seconds': round(seconds, 2),
             'tiles_per_s': round(len(todo) / max(seconds, 1e-9), 2)}
  if not args.quiet:
    print(f'{added} tiles added ({summary["already_indexed"]} already there, '
          f'{len(skipped)} skipped as nodata); {args.index} holds {summary["index_size"]}')
  return summary


# ----------------------------------------------------------------------------------------------
# search

def search(args) -> dict:
  """Ranks the indexed pairs for a text query (or like one indexed tile); writes the results."""
  from rsicrc_jax import model_io  # pylint: disable=import-outside-toplevel
  if bool(args.query is not None) == bool(args.like):
    raise ValueError('give --query TEXT or --like TILE_ID')
  if args.like and (args.focus_change or args.places):
    raise ValueError('--focus_change and --places apply to --query only')
  idx = emb_index.TileIndex(args.index)
  if not len(idx):
    raise emb_index.IndexDirError(f'{idx.path} holds no tiles yet')
  unknown: list[str] = []
  variants = [args.query]
  if args.like:
    pos = idx.position(args.like)
    query = idx.embeddings()[pos:pos + 1]
    scores, ids = idx.search(query, args.k + 1, approximate=args.approximate,
                             nprobe=args.nprobe)
    keep = ids[0] != pos
    scores, ids = scores[0][keep][:args.k], ids[0][keep][:args.k]
  else:
    vocab = idx.vocab
    info = idx.manifest['model']
    checkpoint = args.checkpoint or info['checkpoint']
    if args.places and PLACE not in args.query:
      raise ValueError(f'--places: the query has no {PLACE} to put them in')
    variants = expand_places(args.query, _places(args.places) if args.places else DEFAULT_PLACES)
    rows = []
    for text in variants:
      tokens, unk = query_tokens(text, vocab, _max_len(checkpoint))
      rows.append(tokens)
      unknown += [w for w in unk if w not in unknown]
    if unknown:
      print(f'note: not in the vocabulary, read as UNK: {", ".join(unknown)}', file=sys.stderr)
    predictor = Predictor.load(checkpoint, vocab=vocab)
    if predictor.fingerprint != info['fingerprint']:
      raise emb_index.IndexDirError(
          f'{checkpoint} is not the model that built {idx.path} (weights '
          f'{predictor.fingerprint[:12]}, the index\'s {info["fingerprint"][:12]}); pass '
          '--checkpoint with that model')
    query = predictor.text_embeddings(np.stack(rows))
    if args.focus_change:
      no_change = predictor.no_change_embedding()
      if no_change is None:
        raise ValueError(f'--focus_change: {_NO_SCORE}')
      query = focus_on_change(query, no_change)
    scores, ids = idx.search(query, args.k, approximate=args.approximate, nprobe=args.nprobe)
    scores, ids, matched = best_over_variants(scores, ids, args.k)
  results = []
  for rank, (s, i) in enumerate(zip(scores, ids), 1):
    if i < 0:  # FAISS: fewer than k found
      continue
    rec = idx.record(int(i))
    results.append({'rank': rank, 'score': float(s), **rec})
    if len(variants) > 1:
      results[-1]['matched_query'] = variants[matched[rank - 1]]
  summary = {'query': args.query, 'like': args.like, 'k': args.k,
             'approximate': bool(args.approximate), 'focus_change': bool(args.focus_change),
             'unknown_words': unknown, 'query_variants': variants if len(variants) > 1 else None,
             'index': idx.path, 'index_size': len(idx), 'results': len(results)}
  fields = ('rank', 'score', 'matched_query', 'tile_id', 'window', 'bbox', 'crs', 'caption',
            'change_score', 'before', 'after')
  with model_io.atomic_output(args.out, is_dir=True, overwrite=args.overwrite) as out:
    report.write_jsonl(os.path.join(out, 'results.jsonl'),
                       ({k: r[k] for k in fields if k in r} for r in results))
    if any(r.get('footprint') for r in results):
      report.write_geojson(os.path.join(out, 'results.geojson'), results,
                           ('rank', 'score', 'tile_id', 'caption', 'window', 'bbox'))
    imagery = _SourceReader(results)
    title = f'Search: "{args.query}"' if args.query else f'Pairs like {args.like}'
    meta = [f'index: {idx.path} ({len(idx)} tiles)',
            'exact search' if not args.approximate else 'approximate search (FAISS IVF)']
    if args.focus_change:
      meta.append('--focus_change: the query without its no-change component')
    if len(variants) > 1:
      meta.append(f'{PLACE} tried as {len(variants)} places; each pair ranked by its best match')
    if unknown:
      meta.append('not in the vocabulary (read as UNK): ' + ', '.join(unknown))
    _html_report(os.path.join(out, 'results.html'), title, results, imagery,
                 int(idx.manifest['model']['image_size']), {}, 0, meta, _score_line)
    with open(os.path.join(out, 'search.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  if not args.quiet:
    for r in results[:10]:
      print(f'{r["rank"]:3d}  {r["score"]:.4f}  {r["tile_id"]}  {r.get("caption", "")}')
    print(f'{len(results)} results written to {os.path.abspath(args.out)}')
  return summary


class _SourceReader:
  """Reads result tiles back from their source images for the thumbnails, as `index` read them
  (its bands, stretch and alignment are stored with each tile)."""

  def __init__(self, results: list[dict]):
    self.settings = {r['tile_id']: r.get('read', {}) for r in results}

  def read(self, tile, image_size):
    from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    how = self.settings.get(tile.tile_id, {})
    pair = rasters.RasterPair(tile.before, tile.after, bands=how.get('bands'),
                              align=how.get('align', False),
                              percentiles=tuple(how.get('percentiles', (2.0, 98.0))))
    try:
      a, b, nodata = pair.read(tile.window)
    finally:
      pair.close()
    return (pipeline.resize_center_crop(a, image_size),
            pipeline.resize_center_crop(b, image_size), nodata)


def _max_len(checkpoint: str) -> int:
  path = os.path.join(checkpoint, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{checkpoint}: the index\'s model is not there (no config.json); '
                            'pass --checkpoint with the model that built the index')
  with open(path) as f:
    return int(json.load(f)['max_len'])


# ----------------------------------------------------------------------------------------------
# The command line.

_EPILOG = """Imagery: 8-bit RGB is read as is. Other data types (16-bit, float) are stretched to 8 bits
per band between the --percentiles of the whole image (default 2,98; computed on a decimated
read, as remote-sensing viewers do). Multiband images: --bands R,G,B picks three 1-based bands
(e.g. --bands 3,2,1 for a file that stores blue, green, red as bands 1, 2, 3); 3- and 4-band
images default to 1,2,3. Before and after must share CRS, pixel grid and extent, or pass --align to warp the
after image onto the before image's grid (rasterio WarpedVRT, bilinear). Tiles with more than
--max_nodata of their pixels nodata (the raster's mask, nodata value or alpha) are skipped and
counted."""


def _add_model(p, required=True):
  p.add_argument('--checkpoint', required=required, help='Model directory: a run\'s best/ or '
                 'what `python -m rsicrc_jax.convert rsicrc` wrote.')
  p.add_argument('--vocab', help='The vocabulary (vocab.json) the model was trained with '
                 '(default: found beside the checkpoint or from its run\'s dataset).')


def _add_imagery(p):
  g = p.add_argument_group('imagery (either --before/--after or --pairs)')
  g.add_argument('--before', help='The earlier image: PNG, JPEG, TIFF or GeoTIFF, any size.')
  g.add_argument('--after', help='The later image of the same place.')
  g.add_argument('--pairs', help='A folder in the LEVIR-CC layout: A/ (before) and B/ (after) '
                 'with the same file names; each pair is one tile unless --tile is given.')
  g.add_argument('--tile', type=int, default=0, help='Tile side in pixels of the source '
                 '(default: the model\'s input size, at the image\'s own resolution). Tiles are '
                 'resized to the model\'s input size.')
  g.add_argument('--stride', type=int, default=0, help='Pixels between tiles (default: --tile; '
                 'smaller overlaps them). A last tile flush with the edge covers the rest.')
  g.add_argument('--bands', help='Three 1-based bands as red,green,blue, e.g. 3,2,1.')
  g.add_argument('--percentiles', default='2,98', help='LOW,HIGH: the stretch of non-8-bit '
                 'imagery to 0..255 (default 2,98).')
  g.add_argument('--align', action='store_true', help='Warp the after image onto the before '
                 'image\'s grid when they differ.')
  g.add_argument('--max_nodata', type=float, default=0.5, help='Skip tiles with more than this '
                 'share of nodata pixels in either image (default 0.5).')
  r = p.add_argument_group('running')
  r.add_argument('--batch_size', type=int, default=64, help='Tiles per batch (rounded up to a '
                 'multiple of the device count).')
  r.add_argument('--num_threads', type=int, default=4, help='Threads reading tiles.')
  r.add_argument('--num_processes', type=int, default=1, help='Processes (hosts) sharing the '
                 'work: each takes every num_processes-th tile. index: all write to one '
                 '--index. caption: all give the same --out; each saves its part in OUT.parts/ '
                 'and the last to finish writes OUT.')
  r.add_argument('--process_id', type=int, default=0, help='This process, 0 .. num_processes-1.')
  r.add_argument('--quiet', action='store_true', help='No progress bar or summary.')


def _add_output(p):
  p.add_argument('--out', required=True, help='Output directory (must not exist unless '
                 '--overwrite).')
  p.add_argument('--overwrite', action='store_true', help='Replace an existing --out.')


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m rsicrc_jax.predict', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True, metavar='{caption,index,search}')
  fmt = argparse.RawDescriptionHelpFormatter

  c = sub.add_parser('caption', formatter_class=fmt, epilog=_EPILOG,
                     help='Caption every tile pair; write captions.jsonl, .geojson, report.html.',
                     description='Cut before/after imagery into tiles and caption each pair. '
                     'Writes OUT/captions.jsonl (tile_id, window [row, col, height, width] in '
                     'before-image pixels, bbox in the image CRS, caption, change_score: 1 - '
                     'cosine to the no-change sentences\' embedding, so changed tiles sort '
                     'first), OUT/captions.geojson (footprints in WGS84; georeferenced input '
                     'only), OUT/report.html (most changed first: before, after, attention) and '
                     'OUT/summary.json. OUT is written whole or not at all.')
  _add_model(c)
  _add_imagery(c)
  _add_output(c)
  c.add_argument('--beam_size', type=int, default=1, help='1 = greedy (with the attention '
                 'overlay); more = beam search (no overlay).')
  c.add_argument('--report_tiles', type=int, default=100, help='Tiles shown in report.html, '
                 'most changed first (0 = all).')

  i = sub.add_parser('index', formatter_class=fmt, epilog=_EPILOG,
                     help='Embed tile pairs into a persistent, searchable index directory.',
                     description='Embed every tile pair (the model\'s pair embedding) and add it '
                     'with its metadata (source files, window, bbox, WGS84 footprint, change '
                     'score, and the caption with --caption) to the index directory IDX. Running '
                     'again with more imagery adds to it; tiles already there are skipped, so an '
                     'interrupted run finishes when run again. The index is readable at every '
                     'moment.')
  _add_model(i)
  _add_imagery(i)
  i.add_argument('--index', required=True, help='The index directory (created if absent).')
  i.add_argument('--caption', action='store_true', help='Also caption each tile and store it.')
  i.add_argument('--segment_tiles', type=int, default=4096, help='Tiles per saved segment: '
                 'at most this many are redone after an interruption.')

  s = sub.add_parser('search', formatter_class=fmt,
                     help='Rank indexed pairs for a text query, or like one indexed tile.',
                     description='Rank the indexed tile pairs for --query (the model\'s text '
                     'embedding, cosine, as eval ranks pairs) or for --like TILE_ID (pairs '
                     'whose change looks like that one). Writes OUT/results.jsonl (rank, score, '
                     'tile_id, window, bbox, caption if stored), OUT/results.geojson, '
                     'OUT/results.html (thumbnails in rank order) and OUT/search.json.')
  s.add_argument('--index', required=True, help='An index directory built by `index`.')
  s.add_argument('--query', help='What changed, in words, e.g. "houses are built on the bareland".')
  s.add_argument('--like', help='A tile_id in the index: find pairs with a similar change.')
  s.add_argument('--places', help='With {place} in --query: the place phrases to put there, '
                 'separated by ";" (default: the nine cells of a 3 x 3 grid, "in the top left '
                 'corner;at the top;...;in the bottom right corner"). Each pair is ranked by its '
                 'best match over them, and results.jsonl says which matched. Captions name '
                 'where a change is, and a query without a place is read as one particular '
                 'place: write "the houses {place} are removed" to find removed houses anywhere.')
  s.add_argument('-k', type=int, default=20, help='How many results (default 20).')
  s.add_argument('--approximate', action='store_true', help='FAISS inverted-file search '
                 '(needs the faiss extra): for archives of millions of pairs; built once and '
                 'kept in IDX/ann/.')
  s.add_argument('--nprobe', type=int, default=0, help='--approximate: clusters visited per '
                 'query (default: an eighth of them, at least 32); more is slower and finds '
                 'more of the exact top k.')
  s.add_argument('--focus_change', action='store_true', help='Rank by what the query says '
                 'beyond "nothing changed": the query embedding minus its component along the '
                 'no-change sentences\' embedding (the one the change score uses). Helps when '
                 'a short query sits close to "no change" and unchanged pairs come first.')
  s.add_argument('--checkpoint', help='The model that built the index (default: the path the '
                 'index recorded); its weights must match.')
  _add_output(s)
  s.add_argument('--quiet', action='store_true', help='Print nothing.')
  return p


def _check(args) -> None:
  for name in ('batch_size', 'num_threads', 'num_processes', 'segment_tiles', 'k', 'beam_size'):
    if getattr(args, name, 1) < 1:
      raise ValueError(f'--{name} {getattr(args, name)}: expected >= 1')
  for name in ('tile', 'stride', 'report_tiles', 'nprobe'):
    if getattr(args, name, 0) < 0:
      raise ValueError(f'--{name} {getattr(args, name)}: expected >= 0')
  if not 0 <= getattr(args, 'max_nodata', 0) <= 1:
    raise ValueError(f'--max_nodata {args.max_nodata}: expected a share between 0 and 1')


COMMANDS = {'caption': caption, 'index': build_index, 'search': search}


def main(argv: Sequence[str] | None = None) -> dict:
  args = parser().parse_args(argv)
  _check(args)
  return COMMANDS[args.command](args)


if __name__ == '__main__':
  cli.use_transparent_huge_pages()
  cli.run_plain(main)
