"""Procedural bi-temporal aerial scenes with grounded change captions (the demo dataset).

Each pair is drawn from a scene description (terrain, roads, houses, trees, water, parking lots);
the after image differs from the before image only where a change event happened, plus nuisance
(illumination, season tint, sensor noise, a pixel or two of misregistration) that must NOT be
described. About half the pairs are no-change pairs and carry LEVIR-CC's five no-change sentences;
change pairs get five captions from a LEVIR-CC-style grammar, generated from the events, so the
words always match what was drawn.

Everything is a pure function of (seed, split, index): `make_pair` is deterministic.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np

from rsicrc_jax.data.captions import NO_CHANGE_SENTENCES

# The scene is a 3x3 grid of named places; a change event fills one cell.
LOCATIONS = {
    'top left': (0, 0), 'top': (0, 1), 'top right': (0, 2),
    'left': (1, 0), 'center': (1, 1), 'right': (1, 2),
    'bottom left': (2, 0), 'bottom': (2, 1), 'bottom right': (2, 2),
}

LOCATION_PHRASES = {
    'top left': ('in the top left corner', 'at the top left of the scene',
                 'in the upper left corner'),
    'top': ('at the top', 'on the top side of the scene', 'in the upper part of the scene'),
    'top right': ('in the top right corner', 'at the top right of the scene',
                  'in the upper right corner'),
    'left': ('on the left', 'on the left side of the scene', 'at the left of the scene'),
    'center': ('in the center', 'in the middle of the scene', 'in the center of the scene'),
    'right': ('on the right', 'on the right side of the scene', 'at the right of the scene'),
    'bottom left': ('in the bottom left corner', 'at the bottom left of the scene',
                    'in the lower left corner'),
    'bottom': ('at the bottom', 'on the bottom side of the scene',
               'in the lower part of the scene'),
    'bottom right': ('in the bottom right corner', 'at the bottom right of the scene',
                     'in the lower right corner'),
}

# Change events: what the cell holds before -> after.
EVENTS = {
    'houses_built': ('bareland', 'houses'),
    'houses_removed': ('houses', 'bareland'),
    'road_built': ('bareland', 'road'),
    'trees_to_houses': ('trees', 'houses'),
    'trees_removed': ('trees', 'bareland'),
}

_NUMBER_WORDS = {2: 'two', 3: 'three'}

# Templates per event; {h} = houses phrase (with its count), {loc} = location phrase,
# {be} = 'is'/'are' agreeing with {h}. No template contains ' and ', which joins two events.
_TEMPLATES = {
    'houses_built': (
        '{h} {be} built {loc}', '{h} {appear} {loc}', '{h} {be} constructed on the bareland {loc}',
        'the bareland {loc} is replaced by {h}', '{h} {have} been built {loc}',
        '{h} {appear} on the bareland {loc}'),
    'houses_removed': (
        '{h} {loc} {be} removed', '{h} {loc} {disappear}', '{h} {loc} {be} demolished',
        '{h} {loc} {have} been torn down', 'the bareland {loc} replaces {h}',
        '{h} {loc} {have} disappeared'),
    'road_built': (
        'a road is built {loc}', 'a new road appears {loc}', 'a road has been constructed {loc}',
        'a road appears on the bareland {loc}', 'the bareland {loc} is replaced by a road',
        'a straight road is built {loc}'),
    'trees_to_houses': (
        'some trees {loc} are replaced by {h}', '{h} {be} built in the woods {loc}',
        '{h} {appear} in place of the trees {loc}', 'the trees {loc} are replaced by {h}',
        '{h} {have} been built among the trees {loc}', '{h} {appear} in the woods {loc}'),
    'trees_removed': (
        'some trees {loc} are removed', 'the trees {loc} disappear', 'the vegetation {loc} is cleared',
        'some trees {loc} have been cut down', 'the woods {loc} are replaced by bareland',
        'the trees {loc} have been removed'),
}


@dataclasses.dataclass(frozen=True)
class ChangeEvent:
  kind: str  # a key of EVENTS
  location: str  # a key of LOCATIONS
  count: int  # houses involved (0 when none)


@dataclasses.dataclass(frozen=True)
class PairScene:
  """What a pair shows: the change events (empty = no change), the five captions, and the private
  layout and seeds the renderer needs."""
  events: tuple[ChangeEvent, ...]
  captions: tuple[str, ...]
  layout: '_Layout'
  event_seeds: tuple[int, ...]
  nuisance_seed: int

  @property
  def changed(self) -> bool:
    return bool(self.events)

  def to_json(self) -> dict:
    return {'changed': self.changed,
            'events': [dataclasses.asdict(e) for e in self.events]}


def _houses_phrase(count: int, rng: np.random.Generator) -> tuple[str, bool]:
  """('a house' | 'two buildings' | 'some villas' ..., plural)."""
  noun = rng.choice(['house', 'building', 'villa'])
  if count == 1:
    return f'a {noun}', False
  if count in _NUMBER_WORDS and rng.random() < 0.6:
    return f'{_NUMBER_WORDS[count]} {noun}s', True
  return f'{rng.choice(["some", "several", "many"] if count > 2 else ["some", "two"])} {noun}s', True


def _event_caption(event: ChangeEvent, template: str, rng: np.random.Generator) -> str:
  h, plural = _houses_phrase(max(event.count, 1), rng)
  return template.format(
      h=h, loc=rng.choice(LOCATION_PHRASES[event.location]),
      be='are' if plural else 'is', have='have' if plural else 'has',
      appear='appear' if plural else 'appears', disappear='disappear' if plural else 'disappears')


def describe(events: Sequence[ChangeEvent], rng: np.random.Generator) -> tuple[str, ...]:
  """Five distinct captions for the events (LEVIR-CC's no-change sentences when there are none)."""
  if not events:
    return tuple(NO_CHANGE_SENTENCES)
  captions: list[str] = []
  for _ in range(200):
    parts = [_event_caption(e, str(rng.choice(_TEMPLATES[e.kind])), rng) for e in events]
    caption = ' and '.join(parts)
    if caption not in captions:
      captions.append(caption)
    if len(captions) == 5:
      return tuple(captions)
  raise AssertionError(f'grammar cannot produce 5 distinct captions for {events}')


# ----------------------------------------------------------------------------------------------
# Rendering. Coordinates are fractions of the image side so any image size works; the scene is
# drawn at twice the size and box-filtered down for soft, aerial-looking edges.

_BARELAND = np.array([172, 152, 118], np.float32)
_GRASS = np.array([96, 124, 70], np.float32)
_ROAD = np.array([118, 118, 114], np.float32)
_WATER = np.array([46, 84, 112], np.float32)
_ROOFS = np.array([[178, 74, 58], [196, 110, 64], [150, 150, 156], [214, 210, 200],
                   [84, 108, 140], [120, 64, 56]], np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Value noise in [0, 1]: a coarse random grid bilinearly upsampled to size x size."""
  grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
  t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
  i = t.astype(np.int32)
  f = t - i
  f = f * f * (3 - 2 * f)
  rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
  return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


class _Canvas:
  """A float32 RGB image with compositing primitives that only touch their bounding box."""

  def __init__(self, image: np.ndarray):
    self.image = image
    self.n = image.shape[0]

  def _window(self, y0, x0, y1, x1):
    n = self.n
    r0, c0 = max(int(np.floor(y0 * n)), 0), max(int(np.floor(x0 * n)), 0)
    r1, c1 = min(int(np.ceil(y1 * n)), n), min(int(np.ceil(x1 * n)), n)
    yy = (np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5) / n
    xx = (np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5) / n
    return (slice(r0, r1), slice(c0, c1)), yy, xx

  def _blend(self, win, mask, color, alpha):
    if mask.size == 0:
      return
    m = (mask.astype(np.float32) * alpha)[..., None]
    self.image[win] = self.image[win] * (1 - m) + np.asarray(color, np.float32) * m

  def rect(self, y0, x0, y1, x1, color, alpha=1.0):
    win, yy, xx = self._window(y0, x0, y1, x1)
    self._blend(win, (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1), color, alpha)

  def ellipse(self, cy, cx, ry, rx, color, alpha=1.0):
    win, yy, xx = self._window(cy - ry, cx - rx, cy + ry, cx + rx)
    self._blend(win, ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1, color, alpha)


_SHADOW = np.zeros(3, np.float32)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Everything drawn in a pair except the change events: shared by both dates."""
  terrain_seed: int
  roads: tuple  # ('h'|'v', position, width) along grid lines, or ('curve', phase, amp, width)
  cell_content: dict  # (row, col) -> ('houses'|'trees'|'water'|'parking'|'bareland', seed)


def _draw_houses(c: _Canvas, cell: tuple[int, int], count: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  r, q = cell
  slots = [(0, 0), (0, 1), (1, 0), (1, 1)]
  rng.shuffle(slots)
  for k in range(count):
    sy, sx = slots[k % 4]
    h, w = rng.uniform(0.26, 0.38, size=2)  # in cell units; slots are 0.44 apart
    y0 = (r + 0.08 + 0.44 * sy + rng.uniform(0, 0.04)) / 3
    x0 = (q + 0.08 + 0.44 * sx + rng.uniform(0, 0.04)) / 3
    y1, x1 = y0 + h / 3, x0 + w / 3
    off = 0.012
    c.rect(y0 + off, x0 + off, y1 + off, x1 + off, _SHADOW, 0.45)
    roof = _ROOFS[rng.integers(len(_ROOFS))]
    c.rect(y0, x0, y1, x1, roof)
    if rng.random() < 0.7:  # ridge: one half of a gabled roof catches more light
      if rng.random() < 0.5:
        c.rect(y0, x0, (y0 + y1) / 2, x1, np.minimum(roof * 1.18, 255))
      else:
        c.rect(y0, x0, y1, (x0 + x1) / 2, np.minimum(roof * 1.18, 255))


def _draw_trees(c: _Canvas, cell: tuple[int, int], seed: int) -> None:
  rng = np.random.default_rng(seed)
  r, q = cell
  for _ in range(int(rng.integers(14, 22))):
    cy = (r + rng.uniform(0.1, 0.9)) / 3
    cx = (q + rng.uniform(0.1, 0.9)) / 3
    rad = rng.uniform(0.018, 0.032)
    tone = rng.uniform(0.75, 1.1)
    c.ellipse(cy + 0.008, cx + 0.008, rad, rad, _SHADOW, 0.4)
    c.ellipse(cy, cx, rad, rad, np.array([46, 86, 40], np.float32) * tone)
    c.ellipse(cy - rad * 0.3, cx - rad * 0.3, rad * 0.45, rad * 0.45,
              np.array([70, 118, 56], np.float32) * tone, 0.8)


def _draw_road_in_cell(c: _Canvas, cell: tuple[int, int], seed: int) -> None:
  rng = np.random.default_rng(seed)
  r, q = cell
  w = 0.07  # new roads are wide, dark asphalt with a light centre line
  asphalt, line = np.array([84, 84, 88], np.float32), np.array([210, 206, 190], np.float32)
  if rng.random() < 0.5:  # horizontal through the cell
    y = (r + rng.uniform(0.35, 0.65)) / 3
    c.rect(y - w / 2, q / 3, y + w / 2, (q + 1) / 3, asphalt)
    c.rect(y - 0.004, q / 3, y + 0.004, (q + 1) / 3, line, 0.8)
  else:
    x = (q + rng.uniform(0.35, 0.65)) / 3
    c.rect(r / 3, x - w / 2, (r + 1) / 3, x + w / 2, asphalt)
    c.rect(r / 3, x - 0.004, (r + 1) / 3, x + 0.004, line, 0.8)


def _draw_layout_cell(c: _Canvas, cell, what: str, seed: int) -> None:
  rng = np.random.default_rng(seed)
  r, q = cell
  if what == 'houses':
    _draw_houses(c, cell, int(rng.integers(1, 4)), seed)
  elif what == 'trees':
    _draw_trees(c, cell, seed)
  elif what == 'water':
    cy, cx = (r + 0.5) / 3, (q + 0.5) / 3
    c.ellipse(cy, cx, 0.11, rng.uniform(0.08, 0.14), _WATER)
  elif what == 'parking':
    y0, x0 = (r + 0.15) / 3, (q + 0.15) / 3
    c.rect(y0, x0, y0 + 0.7 / 3, x0 + 0.7 / 3, np.array([96, 96, 98], np.float32))
    for k in range(5):
      x = x0 + (0.06 + 0.12 * k) / 3
      c.rect(y0 + 0.02, x, y0 + 0.68 / 3, x + 0.006, np.array([220, 220, 220], np.float32))
      for j in range(3):
        if rng.random() < 0.6:
          cy = y0 + (0.12 + 0.2 * j) / 3
          c.rect(cy, x + 0.012, cy + 0.035, x + 0.03, _ROOFS[rng.integers(len(_ROOFS))])


def _render(layout: _Layout, events: Sequence[ChangeEvent], after: bool, size: int,
            event_seeds: Sequence[int]) -> np.ndarray:
  n = 2 * size
  trng = np.random.default_rng(layout.terrain_seed)
  low = _smooth_noise(trng, n, 4)[..., None]
  grass = (_smooth_noise(trng, n, 6) > 0.55)[..., None]
  fine = trng.normal(0, 1, (n, n, 1)).astype(np.float32)
  terrain = _BARELAND * (0.85 + 0.3 * low) + 7 * fine
  terrain = np.where(grass, _GRASS * (0.85 + 0.3 * low) + 6 * fine, terrain)
  c = _Canvas(terrain.astype(np.float32))
  event_cells = {LOCATIONS[e.location] for e in events}
  # Background roads run along the grid lines, so they never hide a change cell's content.
  for road in layout.roads:
    kind, pos, width = road
    if kind == 'h':
      c.rect(pos - width / 2, 0, pos + width / 2, 1, _ROAD)
    else:
      c.rect(0, pos - width / 2, 1, pos + width / 2, _ROAD)
  for cell, (what, seed) in layout.cell_content.items():
    if cell not in event_cells:
      _draw_layout_cell(c, cell, what, seed)
  for e, seed in zip(events, event_seeds):
    cell = LOCATIONS[e.location]
    what = EVENTS[e.kind][1 if after else 0]
    if what == 'houses':
      _draw_houses(c, cell, e.count, seed)
    elif what == 'trees':
      _draw_trees(c, cell, seed)
    elif what == 'road':
      _draw_road_in_cell(c, cell, seed)
    elif what == 'bareland' and EVENTS[e.kind][0] != 'bareland' and after:
      # Cleared ground is lighter than the surrounding terrain.
      r, q = cell
      c.rect((r + 0.1) / 3, (q + 0.1) / 3, (r + 0.9) / 3, (q + 0.9) / 3,
             np.array([190, 172, 140], np.float32), 0.55)
  return c.image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))


def _nuisance(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Illumination, season tint, noise and a small misregistration: changes nobody describes."""
  gain = 1 + strength * rng.uniform(-0.12, 0.12)
  tint = 1 + strength * rng.uniform(-0.06, 0.06, size=3)
  out = image * gain * tint + rng.normal(0, 2.5 * strength, image.shape)
  dy, dx = rng.integers(-2, 3, size=2) if strength > 0 else (0, 0)
  out = np.roll(out, (int(dy), int(dx)), axis=(0, 1))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pair_rng(seed: int, split: str, index: int) -> np.random.Generator:
  digest = hashlib.sha256(f'{seed}/{split}/{index}'.encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], 'little'))


def make_scene(seed: int, split: str, index: int, change_fraction: float = 0.5) -> PairScene:
  """The description of pair `index` of `split`: cheap, no pixels."""
  rng = pair_rng(seed, split, index)
  events: list[ChangeEvent] = []
  if rng.random() < change_fraction:
    n_events = 2 if rng.random() < 0.2 else 1
    for loc in rng.choice(list(LOCATIONS), size=n_events, replace=False):
      kind = str(rng.choice(list(EVENTS)))
      count = int(rng.integers(1, 5)) if 'houses' in EVENTS[kind] else 0
      events.append(ChangeEvent(kind, str(loc), count))
  event_cells = {LOCATIONS[e.location] for e in events}
  roads = tuple((str(rng.choice(['h', 'v'])), float(rng.choice([1 / 3, 2 / 3])), 0.04)
                for _ in range(int(rng.integers(0, 3))))
  content = {}
  for cell in LOCATIONS.values():
    if cell not in event_cells:
      what = str(rng.choice(['bareland', 'houses', 'trees', 'water', 'parking'],
                            p=[0.35, 0.25, 0.25, 0.07, 0.08]))
      content[cell] = (what, int(rng.integers(2**31)))
  layout = _Layout(int(rng.integers(2**31)), roads, content)
  event_seeds = tuple(int(rng.integers(2**31)) for _ in events)
  nuisance_seed = int(rng.integers(2**31))
  return PairScene(tuple(events), describe(events, rng), layout, event_seeds, nuisance_seed)


def render_pair(scene: PairScene, size: int = 96,
                nuisance: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(before, after) uint8 images of shape (size, size, 3). Without nuisance the two images
  differ only inside the event cells."""
  before = _render(scene.layout, scene.events, False, size, scene.event_seeds)
  after = _render(scene.layout, scene.events, True, size, scene.event_seeds)
  rng = np.random.default_rng(scene.nuisance_seed)
  scale = 1.0 if nuisance else 0.0
  return _nuisance(before, rng, 0.3 * scale), _nuisance(after, rng, scale)


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


_workers_failed = False  # set when render workers could not start in this process


def render_pool(workers: int = 0) -> concurrent.futures.Executor | None:
  """A pool of `workers` render processes (0: one per available core) to share between
  `render_pairs` calls, or None where that is one process (or workers failed here before).

  The workers are spawned, not forked (the caller may hold JAX's and TensorFlow's threads), and a
  spawned process first imports the caller's main script, so a pool is worth keeping across
  calls. A script whose main code is not under `if __name__ == '__main__':` runs again in each
  worker, and multiprocessing stops the worker when that code starts another pool;
  `render_pairs` then draws in this process, with a warning.
  """
  workers = workers or available_cores()
  if workers <= 1 or _workers_failed:
    return None
  return concurrent.futures.ProcessPoolExecutor(workers,
                                                mp_context=multiprocessing.get_context('spawn'))


def render_pairs(scenes: Iterable[PairScene], size: int = 96, *,
                 pool: concurrent.futures.Executor | None = None, workers: int = 0,
                 chunk: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`render_pair` of each scene, in order, `chunk` scenes per task: in `pool`, or without one
  in a pool of its own of `workers` processes (0: one per available core; 1: in this process).
  Drawing is pure Python and numpy, one core at a time, and every pair comes from its own seeds,
  so the pixels are the same either way. See `render_pool` for the main-script caveat."""
  global _workers_failed
  scenes = list(scenes)
  own = pool is None and len(scenes) > chunk
  if own:
    pool = render_pool(min(workers or available_cores(), -(-len(scenes) // max(chunk, 1))))
  done = 0
  if pool is not None and not _workers_failed:
    try:
      for pair in pool.map(functools.partial(render_pair, size=size), scenes, chunksize=chunk):
        yield pair
        done += 1
    except concurrent.futures.BrokenExecutor as e:
      _workers_failed = True  # they would fail again: later calls draw here at once
      warnings.warn(f'synthetic pictures: the render workers stopped ({e}); drawing the other '
                    f'{len(scenes) - done} pairs in this process. If the main script has no '
                    "`if __name__ == '__main__':` guard, add one.", RuntimeWarning, stacklevel=2)
    finally:  # also when the consumer stops early: drop the tasks not started
      if own:
        pool.shutdown(wait=True, cancel_futures=True)
  for scene in scenes[done:]:
    yield render_pair(scene, size)


def make_pair(seed: int, split: str, index: int, size: int = 96,
              change_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, PairScene]:
  """Returns (before uint8 (size, size, 3), after uint8 (size, size, 3), scene)."""
  scene = make_scene(seed, split, index, change_fraction)
  return (*render_pair(scene, size), scene)


def write_scene_rasters(before_path: str, after_path: str, *, seed: int, rows: int, cols: int,
                        size: int = 96, change_fraction: float = 1 / 3, split: str = 'scene',
                        crs: str = 'EPSG:32631', origin: tuple[float, float] = (500000.0, 5000000.0),
                        pixel_size: float = 0.5) -> list[dict]:
  """A georeferenced scene for the own-imagery tool: rows x cols synthetic pairs laid out in a
  grid and written as two 3-band uint8 GeoTIFFs (tiled, deflate) in a projected CRS, the
  top-left corner at `origin` (x, y in metres), `pixel_size` metres per pixel. Returns, per
  grid cell (row-major), its window [row, col, size, size] in pixels and its scene's events:
  the ground truth of what changed there."""
  import rasterio  # pylint: disable=import-outside-toplevel
  from rasterio.transform import from_origin  # pylint: disable=import-outside-toplevel
  height, width = rows * size, cols * size
  profile = {'driver': 'GTiff', 'width': width, 'height': height, 'count': 3, 'dtype': 'uint8',
             'crs': crs, 'transform': from_origin(*origin, pixel_size, pixel_size),
             'tiled': True, 'blockxsize': 256, 'blockysize': 256, 'compress': 'deflate'}
  truth = []
  with rasterio.open(before_path, 'w', **profile) as fb, \
       rasterio.open(after_path, 'w', **profile) as fa:
    scenes = [make_scene(seed, split, i, change_fraction) for i in range(rows * cols)]
    for i, (scene, (before, after)) in enumerate(zip(scenes, render_pairs(scenes, size),
                                                     strict=True)):
      r, c = divmod(i, cols)
      window = rasterio.windows.Window(c * size, r * size, size, size)
      fb.write(np.moveaxis(before, -1, 0), window=window)
      fa.write(np.moveaxis(after, -1, 0), window=window)
      truth.append({'window': [r * size, c * size, size, size], **scene.to_json()})
  return truth
