"""What `rsicrc_jax.predict` writes for people and GIS tools: JSON lines, GeoJSON (RFC 7946) and a
self-contained HTML page of before/after thumbnails with captions and the decoder's attention."""

from __future__ import annotations

import html
import json
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

THUMB = 192  # thumbnail side in the HTML pages, pixels


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def write_geojson(path: str, records: Sequence[dict], properties: Sequence[str]) -> None:
  """One Polygon feature per record that has a WGS84 'footprint', with `properties`."""
  features = [{'type': 'Feature', 'geometry': r['footprint'],
               'properties': {k: r.get(k) for k in properties}}
              for r in records if r.get('footprint')]
  with open(path, 'w') as f:
    json.dump({'type': 'FeatureCollection', 'features': features}, f)


def attention_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """uint8 (H, W, 3) image with a (g, g) attention map blended over it (magma colour map,
  scaled to the map's own maximum), each cell a block of the image."""
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  m = np.asarray(attention, np.float64)
  m = m / m.max() if m.max() > 0 else m
  heat = (colormaps['magma'](m)[..., :3] * 255).astype(np.uint8)
  heat = np.asarray(Image.fromarray(heat).resize(image.shape[1::-1], Image.NEAREST))
  return np.clip((1 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)


def save_thumbnail(image: np.ndarray, path: str) -> str:
  img = Image.fromarray(image)
  img.thumbnail((THUMB, THUMB)) if max(image.shape[:2]) > THUMB else None
  if max(img.size) < THUMB:  # small tiles: enlarge without blurring the pixels
    s = THUMB / max(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.NEAREST)
  img.save(path, quality=90)
  return path


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } .meta { color: #555; font-size: 0.9em; margin-bottom: 1em; }
.tile { display: flex; gap: 1em; align-items: flex-start; padding: 0.8em 0;
        border-bottom: 1px solid #ddd; }
.tile figure { margin: 0; text-align: center; font-size: 0.8em; color: #555; }
.tile img { width: %dpx; height: %dpx; image-rendering: pixelated; display: block; }
.text { max-width: 34em; } .caption { font-size: 1.1em; font-weight: 600; margin: 0.2em 0 0.6em; }
.score { font-variant-numeric: tabular-nums; } .small { font-size: 0.85em; color: #555; }
.missing { width: %dpx; height: %dpx; background: #eee; display: flex; align-items: center;
           justify-content: center; color: #999; }
""" % (THUMB, THUMB, THUMB, THUMB)


def write_html(path: str, title: str, meta: Sequence[str], entries: Sequence[dict]) -> None:
  """entries: {'heading', 'caption', 'lines' (list of str), 'images': [(label, relative path or
  None)]}, shown in the given order."""
  esc = html.escape
  parts = [f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
           f'<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>']
  parts += [f'<div class="meta">{esc(m)}</div>' for m in meta]
  for e in entries:
    figs = []
    for label, src in e['images']:
      body = (f'<img src="{esc(src)}" alt="{esc(label)}">' if src else
              '<div class="missing">source not readable</div>')
      figs.append(f'<figure>{body}<figcaption>{esc(label)}</figcaption></figure>')
    lines = ''.join(f'<div class="small">{esc(l)}</div>' for l in e['lines'])
    caption = (f'<div class="caption">{esc(e["caption"])}</div>' if e.get('caption') else '')
    parts.append(f'<div class="tile">{"".join(figs)}<div class="text"><div><b>'
                 f'{esc(e["heading"])}</b></div>{caption}{lines}</div></div>')
  parts.append('</body></html>')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(parts))


def relpath(path: str, start: str) -> str:
  return os.path.relpath(path, start).replace(os.sep, '/')
