"""Before/after imagery read tile by tile with rasterio: a pair of rasters of any size (PNG, JPEG,
TIFF, GeoTIFF) or a folder of pairs in the LEVIR-CC layout. A scene is never loaded whole: every
read is one window (and the percentile stretch reads a decimated overview).

A tile is a window [row, col, height, width] in pixels of the before raster. Its footprint is the
window's bounds in the raster's CRS and, for GeoJSON, that rectangle in WGS84 (RFC 7946).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from typing import Iterator, Sequence

import numpy as np

from rsicrc_jax.data import captions as cap

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
STATS_SIDE = 1024  # the longer side of the decimated read that the percentile stretch uses


class InputError(cap.DataError):
  """Imagery that cannot be tiled as asked; the message names the file or the value at fault."""


def _rasterio():
  import rasterio  # pylint: disable=import-outside-toplevel
  # PNG and JPEG pairs have no georeferencing, which is fine here; the warnings filter is
  # process-wide because reader threads open files too (catch_warnings is not thread-safe).
  warnings.filterwarnings('ignore', category=rasterio.errors.NotGeoreferencedWarning)
  return rasterio


@dataclasses.dataclass(frozen=True)
class Tile:
  """One tile pair: where it comes from and where it lies."""
  tile_id: str
  before: str  # absolute paths of the source images
  after: str
  window: tuple[int, int, int, int]  # row, col, height, width (pixels of the before image)

  def to_json(self) -> dict:
    return {'tile_id': self.tile_id, 'before': self.before, 'after': self.after,
            'window': list(self.window)}


def tile_windows(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
  """Windows of tile x tile pixels every `stride` pixels, row-major; when the last one does not
  reach the image's edge, one more flush with the edge, so every pixel is covered."""
  if tile < 1 or stride < 1:
    raise InputError(f'--tile and --stride must be >= 1; got tile {tile}, stride {stride}')

  def starts(n):
    s = list(range(0, n - tile + 1, stride))
    if s[-1] + tile < n:
      s.append(n - tile)
    return s

  return [(r, c, tile, tile) for r in starts(height) for c in starts(width)]


def parse_bands(text: str | None) -> tuple[int, ...] | None:
  """'3,2,1' -> (3, 2, 1): the 1-based bands that become red, green, blue."""
  if not text:
    return None
  try:
    bands = tuple(int(b) for b in text.split(','))
  except ValueError:
    raise InputError(f'--bands {text!r}: expected three 1-based band numbers, e.g. 3,2,1') from None
  if len(bands) != 3 or min(bands) < 1:
    raise InputError(f'--bands {text!r}: expected three 1-based band numbers, e.g. 3,2,1')
  return bands


def _open(path: str):
  rasterio = _rasterio()
  if not os.path.exists(path):
    raise InputError(f'{path}: no such file')
  try:
    return rasterio.open(path)
  except rasterio.errors.RasterioIOError as err:
    raise InputError(f'{path}: cannot be read as an image ({err})') from err


def _georeferenced(ds) -> bool:
  return ds.crs is not None


def _describe_grid(path: str, ds) -> str:
  t = ds.transform
  return (f'{path}: CRS {ds.crs.to_string() if ds.crs else None}, {ds.width}x{ds.height} px, '
          f'transform ({t.a:g}, {t.b:g}, {t.c:g}, {t.d:g}, {t.e:g}, {t.f:g})')


class _Reader:
  """Window reads of one image as uint8 RGB: band selection, then a percentile stretch for
  anything that is not 8-bit (computed once per image, on a decimated read)."""

  def __init__(self, path: str, ds, bands: Sequence[int], percentiles: tuple[float, float]):
    self.path, self.ds, self.bands = path, ds, tuple(bands)
    self.stretch = None
    if any(ds.dtypes[b - 1] != 'uint8' for b in self.bands):
      scale = max(ds.width, ds.height) / STATS_SIDE
      shape = (len(self.bands), max(1, int(ds.height / max(scale, 1))),
               max(1, int(ds.width / max(scale, 1))))
      data = ds.read(self.bands, out_shape=shape, masked=True).astype(np.float64)
      lo, hi = [], []
      for band in data:
        values = band.compressed()
        if not values.size:
          raise InputError(f'{path}: band data are all nodata; nothing to stretch')
        p_lo, p_hi = np.percentile(values, percentiles)
        lo.append(p_lo)
        hi.append(max(p_hi, p_lo + 1e-9))
      self.stretch = (np.asarray(lo)[:, None, None], np.asarray(hi)[:, None, None])

  def read(self, window) -> tuple[np.ndarray, float]:
    """(uint8 (h, w, 3), share of nodata pixels) for window (row, col, h, w)."""
    from rasterio.windows import Window  # pylint: disable=import-outside-toplevel
    r, c, h, w = window
    win = Window(c, r, w, h)
    data = self.ds.read(self.bands, window=win, boundless=False)
    valid = self.ds.dataset_mask(window=win) > 0
    if self.stretch is not None:
      lo, hi = self.stretch
      data = np.clip((data.astype(np.float64) - lo) / (hi - lo) * 255.0, 0, 255).round()
    image = np.ascontiguousarray(np.moveaxis(data.astype(np.uint8), 0, -1))
    image[~valid] = 0
    return image, 1.0 - float(valid.mean())


class RasterPair:
  """Two co-registered images of the same place. Before and after must share CRS, pixel grid
  and extent; with `align`, the after image is warped onto the before image's grid (rasterio's
  WarpedVRT, bilinear), which needs both georeferenced and overlapping."""

  def __init__(self, before: str, after: str, *, bands: Sequence[int] | None = None,
               align: bool = False, percentiles: tuple[float, float] = (2.0, 98.0)):
    self.before, self.after = os.path.abspath(before), os.path.abspath(after)
    self._ds_before, self._ds_after = _open(self.before), _open(self.after)
    b, a = self._ds_before, self._ds_after
    if b.count != a.count:
      raise InputError(f'{self.before} has {b.count} bands but {self.after} has {a.count}; '
                       'before and after must have the same bands')
    self.bands = tuple(bands) if bands else self._default_bands(b)
    if max(self.bands) > b.count:
      raise InputError(f'--bands {",".join(map(str, self.bands))}: {self.before} has only '
                       f'{b.count} bands')
    self.aligned = False
    same_grid = (b.crs == a.crs and b.transform.almost_equals(a.transform)
                 and (b.width, b.height) == (a.width, a.height))
    if not same_grid:
      if not align:
        raise InputError('before and after do not share CRS, pixel grid and extent: '
                         f'{_describe_grid(self.before, b)}; {_describe_grid(self.after, a)}. '
                         'Pass --align to warp the after image onto the before image\'s grid')
      self._ds_after = self._warped(b, a)
      self.aligned = True
    self.crs = b.crs
    self.transform = b.transform
    self.height, self.width = b.height, b.width
    self._percentiles = percentiles
    self._local = threading.local()
    self._owner = threading.get_ident()
    self._readers = (_Reader(self.before, b, self.bands, percentiles),
                     _Reader(self.after, self._ds_after, self.bands, percentiles))

  def _default_bands(self, ds) -> tuple[int, ...]:
    if ds.count in (3, 4):  # RGB, or RGB + alpha / near infrared: the first three
      return (1, 2, 3)
    raise InputError(f'{self.before} has {ds.count} band(s); say which three are red, green and '
                     'blue with --bands, e.g. --bands 3,2,1')

  def _warped(self, b, a):
    from rasterio import warp  # pylint: disable=import-outside-toplevel
    from rasterio.vrt import WarpedVRT  # pylint: disable=import-outside-toplevel
    if not (_georeferenced(b) and _georeferenced(a)):
      raise InputError(f'--align needs georeferenced images: {_describe_grid(self.before, b)}; '
                       f'{_describe_grid(self.after, a)}')
    left, bottom, right, top = warp.transform_bounds(a.crs, b.crs, *a.bounds)
    bb = b.bounds
    if left >= bb.right or right <= bb.left or bottom >= bb.top or top <= bb.bottom:
      raise InputError(f'{self.before} and {self.after} do not overlap: bounds {tuple(bb)} and '
                       f'{(left, bottom, right, top)} (in {b.crs.to_string()})')
    return WarpedVRT(a, crs=b.crs, transform=b.transform, width=b.width, height=b.height,
                     resampling=warp.Resampling.bilinear)

  @property
  def georeferenced(self) -> bool:
    return self.crs is not None

  def windows(self, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    if tile > min(self.height, self.width):
      raise InputError(f'--tile {tile} is larger than {self.before} ({self.height}x{self.width} '
                       'px); pass a smaller --tile')
    return tile_windows(self.height, self.width, tile, stride)

  def tiles(self, tile: int, stride: int, prefix: str | None = None) -> list[Tile]:
    stem = prefix or os.path.splitext(os.path.basename(self.before))[0]
    return [Tile(f'{stem}_r{r}_c{c}', self.before, self.after, (r, c, h, w))
            for r, c, h, w in self.windows(tile, stride)]

  def read(self, window) -> tuple[np.ndarray, np.ndarray, float]:
    """(before, after uint8 (h, w, 3), the larger share of nodata pixels of the two)."""
    # rasterio datasets are not thread-safe: each reading thread opens its own handles.
    readers = getattr(self._local, 'readers', None)
    if readers is None:
      if threading.get_ident() == self._owner:
        readers = self._readers
      else:
        b, a = _open(self.before), _open(self.after)
        a = self._warped(b, a) if self.aligned else a
        readers = tuple(_Reader.__new__(_Reader) for _ in range(2))
        for r, own, ds in zip(readers, self._readers, (b, a)):
          r.path, r.ds, r.bands, r.stretch = own.path, ds, own.bands, own.stretch
      self._local.readers = readers
    (a, na), (b, nb) = readers[0].read(window), readers[1].read(window)
    return a, b, max(na, nb)

  def close(self) -> None:
    for ds in (self._ds_before, self._ds_after):
      ds.close()


def window_bbox(window, transform, crs) -> list[float] | None:
  """[minx, miny, maxx, maxy] of window (row, col, h, w) in the CRS (None without one)."""
  if crs is None:
    return None
  from rasterio.windows import Window, bounds  # pylint: disable=import-outside-toplevel
  r, c, h, w = window
  return [float(v) for v in bounds(Window(c, r, w, h), transform)]


def footprint_wgs84(bbox, crs) -> dict | None:
  """A CRS bbox as a GeoJSON Polygon in WGS84 (lon, lat), counter-clockwise (RFC 7946)."""
  if bbox is None:
    return None
  from rasterio import warp  # pylint: disable=import-outside-toplevel
  x0, y0, x1, y1 = bbox
  ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
  return warp.transform_geom(crs, 'EPSG:4326', {'type': 'Polygon', 'coordinates': [ring]})


def pair_folder(path: str) -> list[tuple[str, str]]:
  """(before, after) paths of a LEVIR-CC-layout folder: A/ and B/ holding the same file names."""
  path = os.path.abspath(path)
  dirs = [os.path.join(path, d) for d in ('A', 'B')]
  for d in dirs:
    if not os.path.isdir(d):
      raise InputError(f'{path}: expected the LEVIR-CC layout, A/ and B/ with the same file '
                       f'names; {d} does not exist')
  names = [{f for f in os.listdir(d) if f.lower().endswith(IMAGE_SUFFIXES)} for d in dirs]
  for (mine, other), (d, od) in (((names[0], names[1]), (dirs[0], dirs[1])),
                                 ((names[1], names[0]), (dirs[1], dirs[0]))):
    missing = sorted(mine - other)
    if missing:
      raise InputError(f'{len(missing)} image(s) in {d} have no namesake in {od}: '
                       + ', '.join(missing[:5]) + (' ...' if len(missing) > 5 else ''))
  if not names[0]:
    raise InputError(f'{dirs[0]}: no images ({", ".join(IMAGE_SUFFIXES)})')
  return [(os.path.join(dirs[0], n), os.path.join(dirs[1], n)) for n in sorted(names[0])]


def iter_sources(*, before: str | None = None, after: str | None = None,
                 pairs: str | None = None) -> Iterator[tuple[str, str]]:
  if pairs:
    yield from pair_folder(pairs)
  else:
    yield before, after
