"""The own-imagery tool (`python -m rsicrc_jax.predict`) on a georeferenced synthetic scene: pairs of
the synthetic generator laid out in a grid and written as two GeoTIFFs in UTM zone 31N, so every
tile's window, footprint and pixels are known exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
from flax import nnx
from rasterio.transform import from_origin

from rsicrc_jax import evaluators
from rsicrc_jax import index as emb_index
from rsicrc_jax import model_io
from rsicrc_jax import predict
from rsicrc_jax import rasters
from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import synthetic
from rsicrc_jax.models import RSICRC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests', 'configs'))
import tiny  # noqa: E402  pylint: disable=wrong-import-position

SIZE, ROWS, COLS = 64, 3, 4  # the tiny model's input size; a 3 x 4 grid of pairs
ORIGIN, PIXEL = (500000.0, 5000000.0), 0.5  # UTM 31N: x = 500000 is its central meridian, 3 E


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """A tiny random-weight model dir with the synthetic grammar's vocabulary beside it."""
  d = str(tmp_path_factory.mktemp('model') / 'model')
  captions = [c for i in range(300) for c in synthetic.make_scene(0, 'train', i).captions]
  vocab = cap.build_vocabulary([c.split() for c in captions], min_count=1)
  config = tiny.get_config()
  config.model.vocab_size = len(vocab)
  model = RSICRC(config.model, rngs=nnx.Rngs(0))
  model.eval()
  model_io.save_model(d, model, config.model)
  with open(os.path.join(d, 'vocab.json'), 'w') as f:
    json.dump(vocab, f)
  return d


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
  d = tmp_path_factory.mktemp('scene')
  before, after = str(d / 'before.tif'), str(d / 'after.tif')
  truth = synthetic.write_scene_rasters(before, after, seed=3, rows=ROWS, cols=COLS, size=SIZE,
                                        origin=ORIGIN, pixel_size=PIXEL)
  return before, after, truth


def _run(*argv):
  return predict.main([*argv, '--quiet'])


def test_tile_windows_cover_the_image_with_a_last_tile_flush_with_the_edge():
  assert rasters.tile_windows(10, 7, 4, 4) == [
      (r, c, 4, 4) for r in (0, 4, 6) for c in (0, 3)]
  assert rasters.tile_windows(8, 8, 4, 2) == [(r, c, 4, 4) for r in (0, 2, 4) for c in (0, 2, 4)]
  assert rasters.tile_windows(4, 4, 4, 4) == [(0, 0, 4, 4)]


def test_caption_writes_tiles_footprints_and_report_exactly_on_the_grid(model_dir, scene, tmp_path):
  before, after, truth = scene
  out = tmp_path / 'out'
  summary = _run('caption', '--checkpoint', model_dir, '--before', before, '--after', after,
                 '--out', str(out), '--batch_size', '5')
  assert summary['captioned'] == ROWS * COLS and summary['skipped_nodata'] == 0
  recs = [json.loads(l) for l in open(out / 'captions.jsonl')]
  assert [r['window'] for r in recs] == [t['window'] for t in truth]
  for r in recs:
    row, col, h, w = r['window']
    x0, y1 = ORIGIN[0] + col * PIXEL, ORIGIN[1] - row * PIXEL  # y decreases down the rows
    assert r['bbox'] == [x0, y1 - h * PIXEL, x0 + w * PIXEL, y1]
    assert r['crs'] == 'EPSG:32631' and r['tile_id'] == f'before_r{row}_c{col}'
    assert isinstance(r['caption'], str) and 0 <= r['change_score'] <= 2
  geo = json.load(open(out / 'captions.geojson'))
  assert geo['type'] == 'FeatureCollection' and len(geo['features']) == ROWS * COLS
  for f, r in zip(geo['features'], recs):
    ring = np.asarray(f['geometry']['coordinates'][0])
    assert f['properties']['tile_id'] == r['tile_id'] and (ring[0] == ring[-1]).all()
    # Counter-clockwise (RFC 7946): positive shoelace area in (lon, lat).
    assert np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]) > 0
    if r['window'][1] == 0:  # on UTM 31N's central meridian: longitude exactly 3 degrees
      np.testing.assert_allclose(ring[[0, 3], 0], 3.0, atol=1e-9)
    # ~45.1 N; a metre of northing is 1/111 km of latitude there.
    assert 45.0 < ring[:, 1].min() < ring[:, 1].max() < 45.2
  html = open(out / 'report.html').read()
  order = sorted(recs, key=lambda r: -r['change_score'])
  positions = [html.index(f'. {r["tile_id"]}<') for r in order]
  assert positions == sorted(positions), 'the report lists the most changed tiles first'
  assert len(os.listdir(out / 'tiles')) == 3 * ROWS * COLS  # before, after, attention each


def test_two_caption_processes_write_the_one_process_output(model_dir, scene, tmp_path):
  """--num_processes 2: each process saves its part beside OUT; the one that completes the set
  (here process 0, run second) writes OUT, in tile order, as one process writes it."""
  before, after, _ = scene
  common = ('caption', '--checkpoint', model_dir, '--before', before, '--after', after,
            '--batch_size', '5')
  single, out = tmp_path / 'single', tmp_path / 'out'
  _run(*common, '--out', str(single))
  parts = str(out) + '.parts'
  first = _run(*common, '--out', str(out), '--num_processes', '2', '--process_id', '1')
  assert first['merged'] is False and first['captioned'] == ROWS * COLS // 2
  assert not out.exists() and os.listdir(parts) == ['p1-of-2']
  second = _run(*common, '--out', str(out), '--num_processes', '2', '--process_id', '0')
  assert second['merged'] and second['captioned'] == ROWS * COLS and second['processes'] == 2
  assert not os.path.exists(parts)
  one = [json.loads(l) for l in open(single / 'captions.jsonl')]
  two = [json.loads(l) for l in open(out / 'captions.jsonl')]
  assert [(r['tile_id'], r['window'], r['bbox'], r['caption']) for r in two] == [
      (r['tile_id'], r['window'], r['bbox'], r['caption']) for r in one]
  np.testing.assert_allclose([r['change_score'] for r in two],
                             [r['change_score'] for r in one], rtol=1e-5, atol=1e-6)
  geo_one, geo_two = (json.load(open(d / 'captions.geojson')) for d in (single, out))
  key = lambda f: (f['geometry'], f['properties']['tile_id'], f['properties']['caption'])
  assert [key(f) for f in geo_two['features']] == [key(f) for f in geo_one['features']]
  # The report shows every tile with its attention overlay, from both processes' parts.
  assert sorted(os.listdir(out / 'tiles')) == sorted(os.listdir(single / 'tiles'))
  # A part saved by a run with other settings is not mixed in: the error names it.
  stale = tmp_path / 'stale'
  _run(*common, '--out', str(stale), '--num_processes', '2', '--process_id', '0')
  with pytest.raises(ValueError, match=r'stale\.parts/p0-of-2 is a part of another caption run'):
    _run(*common, '--out', str(stale), '--num_processes', '2', '--process_id', '1',
         '--max_nodata', '0.4')
  assert not stale.exists()


def test_index_holds_the_model_embedding_of_each_grid_pair(model_dir, scene, tmp_path):
  """Each stored embedding is the model's embedding of the pair drawn in that grid cell: the
  windows read the right pixels."""
  before, after, truth = scene
  idx_dir = str(tmp_path / 'idx')
  _run('index', '--checkpoint', model_dir, '--before', before, '--after', after, '--index',
       idx_dir, '--batch_size', '5', '--segment_tiles', '4')
  idx = emb_index.TileIndex(idx_dir)
  assert len(idx) == ROWS * COLS and len(idx.segments()) == 3
  model = model_io.load_model(model_dir)
  pairs = [synthetic.render_pair(synthetic.make_scene(3, 'scene', i, 1 / 3), SIZE)
           for i in range(ROWS * COLS)]
  direct = np.asarray(evaluators.Inference(model).embed_images(
      np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])))
  for i, t in enumerate(truth):
    pos = idx.position(f'before_r{t["window"][0]}_c{t["window"][1]}')
    np.testing.assert_allclose(idx.embeddings()[pos], direct[i], rtol=1e-5, atol=1e-5)
    assert idx.record(pos)['window'] == t['window']
  # Running it again adds nothing; two processes sharing the work fill one index likewise.
  assert _run('index', '--checkpoint', model_dir, '--before', before, '--after', after,
              '--index', idx_dir)['added'] == 0
  shared = str(tmp_path / 'shared')
  added = [_run('index', '--checkpoint', model_dir, '--before', before, '--after', after,
                '--index', shared, '--num_processes', '2', '--process_id', str(p))['added']
           for p in (0, 1)]
  assert added == [6, 6]
  other = emb_index.TileIndex(shared)
  assert other.tile_ids() == idx.tile_ids()
  for tid in idx.tile_ids():
    np.testing.assert_allclose(other.embeddings()[other.position(tid)],  # other batches:
                               idx.embeddings()[idx.position(tid)], rtol=1e-5, atol=1e-5)


def test_search_equals_brute_force_cosine(model_dir, scene, tmp_path):
  before, after, _ = scene
  idx_dir = str(tmp_path / 'idx')
  _run('index', '--checkpoint', model_dir, '--before', before, '--after', after, '--index',
       idx_dir, '--caption')
  idx = emb_index.TileIndex(idx_dir)
  query = 'houses are built on the bareland'
  out = tmp_path / 'hits'
  _run('search', '--index', idx_dir, '--query', query, '-k', '5', '--out', str(out))
  hits = [json.loads(l) for l in open(out / 'results.jsonl')]
  p = predict.Predictor.load(model_dir)
  q = p.text_embeddings(predict.query_tokens(query, p.vocab, p.max_len)[0][None])[0]
  emb = idx.embeddings().astype(np.float64)
  cos = emb @ q / np.linalg.norm(emb, axis=1) / np.linalg.norm(q)
  brute = np.argsort(-cos, kind='stable')[:5]
  assert [h['tile_id'] for h in hits] == [idx.record(int(i))['tile_id'] for i in brute]
  np.testing.assert_allclose([h['score'] for h in hits], cos[brute], rtol=1e-5)
  assert [h['rank'] for h in hits] == [1, 2, 3, 4, 5] and all('caption' in h for h in hits)
  assert len(json.load(open(out / 'results.geojson'))['features']) == 5
  assert open(out / 'results.html').read().count('_before.jpg') == 5
  # --focus_change: the same brute force with the query's no-change component removed.
  nc = p.no_change_embedding()
  qn = q / np.linalg.norm(q)
  qf = qn - (qn @ nc) * nc
  focus = tmp_path / 'focus'
  _run('search', '--index', idx_dir, '--query', query, '-k', '5', '--out', str(focus),
       '--focus_change')
  brute = np.argsort(-(emb @ qf / np.linalg.norm(emb, axis=1)), kind='stable')[:5]
  assert [json.loads(l)['tile_id'] for l in open(focus / 'results.jsonl')] == [
      idx.record(int(i))['tile_id'] for i in brute]
  assert json.load(open(focus / 'search.json'))['focus_change']
  # {place}: each pair ranked by its best cosine over the query with each place put in.
  places = tmp_path / 'places'
  _run('search', '--index', idx_dir, '--query', 'houses are built {place}', '-k', '5', '--out',
       str(places), '--places', 'in the top left corner; at the bottom')
  variants = ['houses are built in the top left corner', 'houses are built at the bottom']
  qv = p.text_embeddings(np.stack([predict.query_tokens(t, p.vocab, p.max_len)[0]
                                   for t in variants]))
  cos_v = (emb @ qv.T) / np.linalg.norm(emb, axis=1)[:, None] / np.linalg.norm(qv, axis=1)
  brute = np.argsort(-cos_v.max(1), kind='stable')[:5]
  got = [json.loads(l) for l in open(places / 'results.jsonl')]
  assert [h['tile_id'] for h in got] == [idx.record(int(i))['tile_id'] for i in brute]
  np.testing.assert_allclose([h['score'] for h in got], cos_v.max(1)[brute], rtol=1e-5)
  assert [h['matched_query'] for h in got] == [variants[int(j)] for j in cos_v[brute].argmax(1)]
  assert json.load(open(places / 'search.json'))['query_variants'] == variants
  with pytest.raises(ValueError, match=r'--places: the query has no \{place\}'):
    _run('search', '--index', idx_dir, '--query', query, '--out', str(tmp_path / 'x'),
         '--places', 'at the top')
  # --like: the pairs nearest one tile's embedding, itself left out.
  like = tmp_path / 'like'
  first = hits[0]['tile_id']
  _run('search', '--index', idx_dir, '--like', first, '-k', '3', '--out', str(like))
  got = [json.loads(l)['tile_id'] for l in open(like / 'results.jsonl')]
  v = emb[idx.position(first)]
  near = np.argsort(-(emb @ v / np.linalg.norm(emb, axis=1)), kind='stable')
  assert got == [idx.record(int(i))['tile_id'] for i in near if i != idx.position(first)][:3]
  # FAISS's inverted file, visiting every cluster, finds the same pairs.
  approx = tmp_path / 'approx'
  _run('search', '--index', idx_dir, '--query', query, '-k', '5', '--out', str(approx),
       '--approximate')
  assert [json.loads(l)['tile_id'] for l in open(approx / 'results.jsonl')] == [
      h['tile_id'] for h in hits]


def test_exact_top_k_keeps_ties_in_index_order_like_a_full_sort():
  rs = np.random.default_rng(0)
  keys = np.round(rs.normal(size=(5000, 4)), 1)  # many exactly equal scores
  keys[::7] = keys[3]
  q = rs.normal(size=(3, 4))
  full = emb_index.rank(q, keys)
  for k in (1, 10, 200):
    np.testing.assert_array_equal(emb_index.rank(q, keys, k), full[:, :k])


def _index_cmd(model_dir, before, after, idx_dir):
  return [sys.executable, '-m', 'rsicrc_jax.predict', 'index', '--checkpoint', model_dir,
          '--before', before, '--after', after, '--index', idx_dir, '--batch_size', '1',
          '--segment_tiles', '1', '--num_threads', '1', '--quiet']


@pytest.mark.slow
def test_index_killed_and_run_again_has_every_tile_once(model_dir, scene, tmp_path):
  before, after, _ = scene
  idx_dir = str(tmp_path / 'idx')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(_index_cmd(model_dir, before, after, idx_dir), cwd=REPO, env=env,
                          stderr=subprocess.PIPE, text=True)
  seg_dir = os.path.join(idx_dir, 'segments')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    # Three whole segments (as TileIndex.segments() counts: a .tmp file is one being written).
    if os.path.isdir(seg_dir) and len([n for n in os.listdir(seg_dir)
                                       if n.endswith('.npz') and not n.startswith('.')]) >= 3:
      break
    time.sleep(0.002)  # a tile takes milliseconds: kill soon after the third
  assert proc.poll() is None, f'finished before it could be killed: {proc.stderr.read()[-2000:]}'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = emb_index.TileIndex(idx_dir)
  assert 3 <= len(partial) < ROWS * COLS  # readable mid-run: whole segments only
  out = subprocess.run(_index_cmd(model_dir, before, after, idx_dir), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  idx = emb_index.TileIndex(idx_dir)
  ids = np.concatenate([np.load(os.path.join(seg_dir, s))['tile_ids'] for s in idx.segments()])
  assert len(ids) == len(set(ids)) == ROWS * COLS  # none missing, none twice
  # The segment being written when it was killed (if any) is gone: the rerun removed it.
  assert not [n for n in os.listdir(seg_dir) if n.startswith('.tmp')]
  # A temporary file of a live writer (this process) is never touched.
  live = os.path.join(seg_dir, f'{emb_index._tmp_prefix()}x-y.npz')  # pylint: disable=protected-access
  open(live, 'w').close()
  assert idx.remove_leftovers() == [] and os.path.exists(live)


def test_align_warps_the_after_image_onto_the_before_grid(model_dir, scene, tmp_path):
  """An after image covering more ground (one extra tile column to the west) on a different
  grid: refused with both grids named, then, with --align, read on the before image's grid:
  the same pixels, so the same embeddings as the co-registered pair."""
  before, after, _ = scene
  wider = str(tmp_path / 'after_wider.tif')
  with rasterio.open(after) as src:
    data = src.read()
    profile = dict(src.profile, width=src.width + SIZE,
                   transform=from_origin(ORIGIN[0] - SIZE * PIXEL, ORIGIN[1], PIXEL, PIXEL))
  with rasterio.open(wider, 'w', **profile) as dst:
    dst.write(np.concatenate([np.zeros_like(data[:, :, :SIZE]), data], axis=2))
  with pytest.raises(rasters.InputError, match=r'do not share CRS.*before\.tif: CRS EPSG:32631.*'
                     r'transform \(0\.5, 0, 500000.*after_wider\.tif: CRS EPSG:32631.*'
                     r'transform \(0\.5, 0, 499968'):
    _run('caption', '--checkpoint', model_dir, '--before', before, '--after', wider,
         '--out', str(tmp_path / 'refused'))
  assert not os.path.exists(tmp_path / 'refused')
  a, b = str(tmp_path / 'aligned'), str(tmp_path / 'plain')
  _run('index', '--checkpoint', model_dir, '--before', before, '--after', wider, '--index', a,
       '--align')
  _run('index', '--checkpoint', model_dir, '--before', before, '--after', after, '--index', b)
  ia, ib = emb_index.TileIndex(a), emb_index.TileIndex(b)
  np.testing.assert_allclose(ia.embeddings(), ib.embeddings(), rtol=1e-6, atol=1e-6)
  assert all(ia.record(i)['aligned'] for i in range(len(ia)))
  summary = _run('caption', '--checkpoint', model_dir, '--before', before, '--after', wider,
                 '--out', str(tmp_path / 'cap'), '--align')
  assert summary['aligned'] and 'warped' in open(tmp_path / 'cap' / 'report.html').read()


def test_sixteen_bit_multiband_is_stretched_and_nodata_tiles_are_skipped(model_dir, tmp_path):
  """A 4-band uint16 pair with blue, green, red in bands 1-3 and a nodata value: --bands 3,2,1
  gives red, green, blue stretched between the 2nd and 98th percentiles; a tile that is all
  nodata in the after image is skipped and counted."""
  rs = np.random.default_rng(0)
  h, w = 2 * SIZE, 2 * SIZE
  paths = []
  for name in ('b', 'a'):
    data = rs.integers(100, 4000, size=(4, h, w)).astype(np.uint16)
    if name == 'a':
      data[:, SIZE:, SIZE:] = 0  # the bottom-right tile: nodata
    path = str(tmp_path / f'{name}.tif')
    with rasterio.open(path, 'w', driver='GTiff', width=w, height=h, count=4, dtype='uint16',
                       nodata=0, crs='EPSG:32631',
                       transform=from_origin(*ORIGIN, PIXEL, PIXEL)) as dst:
      dst.write(data)
    paths.append((path, data))
  pair = rasters.RasterPair(paths[0][0], paths[1][0], bands=(3, 2, 1))
  got, _, nodata = pair.read((0, 0, SIZE, SIZE))
  src = paths[0][1]
  for channel, band in enumerate((3, 2, 1)):
    lo, hi = np.percentile(src[band - 1].astype(np.float64), (2, 98))
    want = np.clip((src[band - 1, :SIZE, :SIZE] - lo) / (hi - lo) * 255, 0, 255).round()
    np.testing.assert_array_equal(got[..., channel], want.astype(np.uint8))
  assert nodata == 0.0 and pair.read((SIZE, SIZE, SIZE, SIZE))[2] == 1.0
  summary = _run('caption', '--checkpoint', model_dir, '--before', paths[0][0], '--after',
                 paths[1][0], '--bands', '3,2,1', '--out', str(tmp_path / 'out'))
  assert (summary['captioned'], summary['skipped_nodata']) == (3, 1)
  # The index keeps how tiles were read, so that search's thumbnails show the same picture.
  idx_dir = str(tmp_path / 'idx')
  _run('index', '--checkpoint', model_dir, '--before', paths[0][0], '--after', paths[1][0],
       '--bands', '3,2,1', '--index', idx_dir)
  idx = emb_index.TileIndex(idx_dir)
  rec = idx.record(0)
  assert rec['read'] == {'bands': [3, 2, 1], 'percentiles': [2.0, 98.0], 'align': False}
  tile = rasters.Tile(rec['tile_id'], rec['before'], rec['after'], tuple(rec['window']))
  back = predict._SourceReader([rec]).read(tile, SIZE)  # pylint: disable=protected-access
  np.testing.assert_array_equal(back[0], got)


def test_bad_input_is_named_and_nothing_is_half_written(model_dir, scene, tmp_path):
  before, after, _ = scene
  out = str(tmp_path / 'out')
  common = ['--checkpoint', model_dir, '--out', out]

  def refused(match, *argv, error=rasters.InputError):
    with pytest.raises(error, match=match):
      _run(*argv)
    assert not os.path.exists(out)

  refused(r'missing\.tif: no such file', 'caption', *common, '--before', before, '--after',
          str(tmp_path / 'missing.tif'))
  junk = tmp_path / 'junk.tif'
  junk.write_text('not an image')
  refused(r'junk\.tif: cannot be read as an image', 'caption', *common, '--before', before,
          '--after', str(junk))
  far = str(tmp_path / 'far.tif')
  with rasterio.open(after) as src:
    profile = dict(src.profile, transform=from_origin(600000.0, 4000000.0, PIXEL, PIXEL))
    with rasterio.open(far, 'w', **profile) as dst:
      dst.write(src.read())
  refused(r'do not overlap', 'caption', *common, '--before', before, '--after', far, '--align')
  four = str(tmp_path / 'four.tif')
  with rasterio.open(after) as src:
    with rasterio.open(four, 'w', **dict(src.profile, count=4)) as dst:
      dst.write(np.concatenate([src.read(), src.read(1)[None]]))
  refused(r'before\.tif has 3 bands but .*four\.tif has 4', 'caption', *common, '--before',
          before, '--after', four)
  gray = [str(tmp_path / f'gray_{n}.tif') for n in 'ab']
  with rasterio.open(before) as src:
    for g in gray:
      with rasterio.open(g, 'w', **dict(src.profile, count=1)) as dst:
        dst.write(src.read(1)[None])
  refused(r'gray_a\.tif has 1 band\(s\); say which three .* --bands', 'caption', *common,
          '--before', gray[0], '--after', gray[1])
  refused(r'--tile 1000 is larger than .*before\.tif \(192x256', 'caption', *common, '--before',
          before, '--after', after, '--tile', '1000')
  folder = tmp_path / 'pairs'
  for sub, names in (('A', ['x1.png', 'x2.png', 'x3.png']), ('B', ['x1.png'])):
    (folder / sub).mkdir(parents=True)
    for n in names:
      (folder / sub / n).write_bytes(b'')
  refused(r'2 image\(s\) in .*A have no namesake in .*B: x2\.png, x3\.png', 'caption', *common,
          '--pairs', str(folder))
  # Index directories.
  not_index = tmp_path / 'not_index'
  not_index.mkdir()
  (not_index / 'notes.txt').write_text('mine')
  refused('is not an index', 'index', '--checkpoint', model_dir, '--before', before, '--after',
          after, '--index', str(not_index), error=emb_index.IndexDirError)
  refused('is not an index', 'search', '--index', str(not_index), '--query', 'a road',
          '--out', out, error=emb_index.IndexDirError)
  idx_dir = str(tmp_path / 'idx')
  _run('index', '--checkpoint', model_dir, '--before', before, '--after', after, '--index',
       idx_dir)
  other = str(tmp_path / 'other_model')
  config = tiny.get_config()
  config.model.vocab_size = len(json.load(open(os.path.join(model_dir, 'vocab.json'))))
  model_io.save_model(other, RSICRC(config.model, rngs=nnx.Rngs(1)), config.model)
  refused(r'was built by another model', 'index', '--checkpoint', other, '--vocab',
          os.path.join(model_dir, 'vocab.json'), '--before', before, '--after', after,
          '--index', idx_dir, error=emb_index.IndexDirError)
  refused(r'is not the model that built', 'search', '--index', idx_dir, '--query', 'a road',
          '--checkpoint', other, '--out', out, error=emb_index.IndexDirError)
  # Queries.
  refused(r"no word of the query 'skyscrapers glow' .*unknown: skyscrapers, glow", 'search',
          '--index', idx_dir, '--query', 'skyscrapers glow', '--out', out, error=ValueError)
  refused('is empty', 'search', '--index', idx_dir, '--query', ' ?! ', '--out', out,
          error=ValueError)
  refused("no tile 'nowhere'", 'search', '--index', idx_dir, '--like', 'nowhere', '--out', out,
          error=emb_index.IndexDirError)


def test_every_subcommand_has_help_and_failures_are_one_line(model_dir, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  for sub in ('caption', 'index', 'search'):
    out = subprocess.run([sys.executable, '-m', 'rsicrc_jax.predict', sub, '--help'], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f'predict {sub}' in out.stdout, out.stderr
  out = subprocess.run([sys.executable, '-m', 'rsicrc_jax.predict', 'search', '--index',
                        str(tmp_path / 'nothing'), '--query', 'a road', '--out',
                        str(tmp_path / 'o')], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 1 and out.stderr.strip().count('\n') == 0, out.stderr
  assert 'nothing does not exist' in out.stderr


def test_a_folder_of_png_pairs_of_any_size(model_dir, tmp_path):
  """--pairs in the LEVIR-CC layout: each pair one tile, resized to the model's input as the
  data pipeline does, or cut into tiles with --tile; PNGs carry no CRS, so no bbox and no
  GeoJSON."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = tmp_path / 'pairs'
  sizes = {'p1.png': (64, 64), 'p2.png': (80, 128)}
  for i, (name, (h, w)) in enumerate(sizes.items()):
    a, b, _ = synthetic.make_pair(5, 'test', i, size=max(h, w))
    for sub, img in (('A', a), ('B', b)):
      (folder / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(img[:h, :w]).save(folder / sub / name)
  out = tmp_path / 'out'
  _run('caption', '--checkpoint', model_dir, '--pairs', str(folder), '--out', str(out))
  recs = [json.loads(l) for l in open(out / 'captions.jsonl')]
  assert [(r['tile_id'], r['window'], r['bbox']) for r in recs] == [
      ('p1', [0, 0, 64, 64], None), ('p2', [0, 0, 80, 128], None)]
  assert not os.path.exists(out / 'captions.geojson')
  # The whole-image tile is what the training pipeline would feed: resize + centre crop.
  from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  imagery = predict.Imagery(pairs=str(folder))
  tile = imagery.tiles(SIZE)[1]
  a, _, _ = imagery.read(tile, SIZE)
  np.testing.assert_array_equal(a, pipeline.resize_center_crop(
      np.asarray(Image.open(folder / 'A' / 'p2.png').convert('RGB')), SIZE))
  tiled = predict.Imagery(pairs=str(folder), tile=64, stride=32).tiles(SIZE)
  assert [t.tile_id for t in tiled] == ['p1_r0_c0', 'p2_r0_c0', 'p2_r0_c32', 'p2_r0_c64',
                                        'p2_r16_c0', 'p2_r16_c32', 'p2_r16_c64']


def test_leftovers_of_dead_writers_on_this_host_are_removed_others_kept(tmp_path):
  idx = emb_index.TileIndex.open_or_create(str(tmp_path / 'idx'), embedding_dim=2,
                                           model={'fingerprint': 'f', 'checkpoint': 'c'},
                                           vocab={})
  dead = subprocess.Popen(['true'])
  dead.wait()  # its pid no longer runs
  seg = tmp_path / 'idx' / 'segments'
  host = emb_index.socket.gethostname()
  names = [f'.tmp-{host}-{dead.pid}-aa-s.npz', f'.tmp-{host}-{os.getpid()}-bb-s.npz',
           f'.tmp-elsewhere-{dead.pid}-cc-s.npz']
  for n in names:
    (seg / n).write_bytes(b'partial')
  idx.add([{'tile_id': 't0'}], np.ones((1, 2)))
  assert idx.remove_leftovers() == [names[0]]
  assert sorted(os.listdir(seg))[:2] == sorted(names[1:]) and len(idx) == 1


def test_a_vocabulary_without_the_no_change_words_gives_no_change_score(model_dir):
  """A model trained on other captions (a user's change_captions dataset) may lack every word of
  LEVIR-CC's no-change sentences: no change score then, rather than a failure; sentences with
  some known words still count."""
  p = predict.Predictor.load(model_dir)
  assert p.no_change_embedding() is not None
  small = {'PAD': 0, 'START': 1, 'UNK': 2, 'END': 3, 'road': 4}
  q = predict.Predictor(p.checkpoint, p.model, p.model_config, small, 'test', p.fingerprint,
                        p.inference)
  assert q.no_change_embedding() is None
  assert predict.change_scores(np.ones((2, q.embedding_dim)), None) == [None, None]
  partial = dict(small, scene=5)  # only 'the scene is the same as before' has a known word
  r = predict.Predictor(p.checkpoint, p.model, p.model_config, partial, 'test', p.fingerprint,
                        p.inference)
  tokens = predict.query_tokens('the scene is the same as before', partial, p.max_len)[0]
  want = r.text_embeddings(tokens[None])[0]
  np.testing.assert_allclose(r.no_change_embedding(), want / np.linalg.norm(want), rtol=1e-5,
                             atol=1e-6)
