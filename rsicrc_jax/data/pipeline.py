"""Input pipeline: built TFDS datasets -> batches of model inputs, with grain.

Why grain over tf.data: the datasets are stored as array_record, which gives random access, so
the whole pipeline is a `grain.MapDataset` indexed by position. That makes it deterministic given
a seed, lets each process compute exactly its slice of every global batch, and makes the
iterator state a position that checkpoints and restores exactly. No TensorFlow runs at train time.

Items (SPEC section 1): training iterates (pair, caption) over every caption that fits max_len;
val/test iterate pairs, the text input being the first caption that fits, with the five raw
captions as references. Images leave the pipeline as uint8 after the resize and center crop;
`normalize_images` (on device, inside the jitted step) does the float scaling, so the host moves
4x fewer bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
import threading
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from PIL import Image

from rsicrc_jax.data import captions as cap

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# config.model.normalization -> (mean, std) per channel: CLIP's for the RemoteCLIP towers,
# ImageNet's for the torchvision ResNets (SPEC section 10).
NORMALIZATION = {'clip': (CLIP_MEAN, CLIP_STD), 'imagenet': (IMAGENET_MEAN, IMAGENET_STD)}

DATASETS = ('levir_cc', 'levir_mci', 'whu_cdc', 'dubai_cc', 'second_cc', 'change_captions',
            'synthetic_cc')

# grain is imported inside the two functions that build and iterate batches, not here: the train
# step and decoding import this module (normalize_images) and must also run where grain is not
# installed (benchmarks/accelerator.py on a bare accelerator machine).


def _builders():
  # TFDS (and TensorFlow behind it) loads only when a dataset is opened: the train step, the
  # benchmarks and the accelerator check import this module on machines without them.
  from rsicrc_jax.data import builders  # pylint: disable=import-outside-toplevel
  return builders


def build_hint(name: str) -> str:
  if name == 'synthetic_cc':
    return 'tfds build datasets/synthetic_cc [--data_dir DIR]'
  folder = {'levir_cc': '/path/to/Levir-CC-dataset', 'change_captions': '/path/to/your/pairs'}
  return (f'tfds build datasets/{name} --manual_dir {folder.get(name, "/path/to/download")} '
          '[--data_dir DIR]')


@dataclasses.dataclass
class Dataset:
  """A built dataset: its builder (for records) and the metadata the pipeline needs."""
  name: str
  builder: Any  # tfds.core.DatasetBuilder
  vocab: dict[str, int]
  caption_lengths: dict[str, list[list[int]]]
  # As a member of a Mixture: added to changed pairs' flags (imgids of two datasets are
  # different pairs), and local caption id -> the mixture's (same text, same id).
  flag_offset: int = 0
  caption_id_map: np.ndarray | None = None
  # Records kept in memory once read (config.data.cache_mb); None = read every time.
  cache: 'RecordCache | None' = None

  @property
  def members(self) -> list['Dataset']:
    return [self]

  def describe(self) -> str:
    return f'dataset {self.name} ({self.builder.data_dir})'

  @property
  def image_size(self) -> int:
    return self.builder.builder_config.image_size

  @property
  def has_embeddings(self) -> bool:
    return 'caption_embeddings' in self.builder.info.features

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.caption_lengths)

  def source(self, split: str):
    if split not in self.caption_lengths:
      raise cap.DataError(f'dataset {self.name} at {self.builder.data_dir} has no split "{split}"; '
                          f'it has {list(self.caption_lengths)}')
    return self.builder.as_data_source(split)

  def reader(self, split: str, image_size: int) -> Callable[[int], Mapping[str, Any]]:
    """pair -> its record as the pipeline uses it (`_ITEM_FIELDS`, the pictures resized and
    center-cropped to image_size), from memory when `cache` holds it."""
    source = self.source(split)

    def read(pair: int) -> dict[str, Any]:
      rec = source[pair]
      out = {k: rec[k] for k in _ITEM_FIELDS if k in rec}
      for k in ('image_a', 'image_b'):
        out[k] = resize_center_crop(out[k], image_size)
      return out

    if self.cache is None:
      return read
    key = (self.name, str(self.builder.data_dir), split, image_size)
    return lambda pair: self.cache.get(key, int(pair), read)


# The record fields that items are made of: the other pictures some datasets carry (change masks,
# semantic maps) are neither read into items nor cached.
_ITEM_FIELDS = ('image_a', 'image_b', 'tokens', 'imgid', 'filename', 'changeflag', 'caption_ids',
                'captions', 'caption_embeddings')


class RecordCache:
  """Records kept in memory after their first read, up to `budget_mb` of arrays.

  Without it the pipeline decodes both PNG pictures of a pair again for each of its captions in
  every epoch (the demo: 40 times per pair, about 1 ms per item, ~12% of its train step on two
  cores). First read, first kept: once the budget is spent, other records are read from disk
  every time; under a shuffled order an evicting cache would hit no more often. Cached arrays are
  read-only, so an item that aliases one cannot change it. Safe under grain's read threads.
  """

  def __init__(self, budget_mb: float):
    self.budget = int(budget_mb * 2**20)
    self.used = 0
    self._records: dict[tuple, Mapping[str, Any]] = {}
    self._lock = threading.Lock()

  def get(self, key: tuple, pair: int, read: Callable[[int], Mapping[str, Any]]):
    rec = self._records.get((key, pair))
    if rec is not None:
      return rec
    rec = read(pair)
    size = 0
    for v in rec.values():
      if isinstance(v, np.ndarray):
        v.setflags(write=False)
        size += v.nbytes
    with self._lock:
      if (key, pair) not in self._records and self.used + size <= self.budget:
        self._records[(key, pair)] = rec
        self.used += size
    return rec

  def __len__(self) -> int:
    return len(self._records)


def make_builder(data_cfg: Mapping[str, Any]):
  """The TFDS builder named by `config.data` (name, builder_config, data_dir)."""
  name = data_cfg['name']
  if name not in DATASETS:
    raise cap.DataError(f'config.data.name: unknown dataset "{name}", expected one of '
                        f'{sorted(DATASETS)}')
  builders = _builders()
  cls = {'levir_cc': builders.LevirCCBuilder, 'levir_mci': builders.LevirMCIBuilder,
         'whu_cdc': builders.WhuCDCBuilder, 'dubai_cc': builders.DubaiCCBuilder,
         'second_cc': builders.SecondCCBuilder, 'change_captions': builders.ChangeCaptionsBuilder,
         'synthetic_cc': builders.SyntheticCCBuilder}[name]
  fields = dict(data_cfg.get('builder_config') or {})
  fields.setdefault('name', 'default')
  known = set(builders.config_fields(cls.BUILDER_CONFIGS[0])) | {'name', 'description'}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise cap.DataError(f'config.data.builder_config: unknown fields {unknown} for {name}; '
                        f'expected some of {sorted(known)}')
  config = cls.builder_config_cls(**fields)
  for registered in cls.BUILDER_CONFIGS:
    if registered.name != config.name:
      continue
    if builders.config_fields(registered) == builders.config_fields(config):
      config = registered.name  # tfds wants the registered object itself for a registered name
    else:
      raise cap.DataError(
          f'config.data.builder_config: name "{config.name}" is the registered config of {name}, '
          f'but the other fields differ ({builders.config_fields(config)}); give the variant its own name')
  data_dir = data_cfg.get('data_dir') or None
  return cls(config=config, data_dir=os.path.expanduser(data_dir) if data_dir else None)


MEMBER_STRIDE = 1 << 24  # flag offset between mixture members: room for 16M pairs each


def parse_names(name: str) -> list[tuple[str, float]]:
  """config.data.name -> [(dataset, weight)]: 'levir_cc', or a mixture such as
  'levir_cc:3,whu_cdc:1' (a missing weight is 1; weights are relative)."""
  out = []
  for part in str(name).split(','):
    member, _, weight = part.strip().partition(':')
    if member not in DATASETS:
      raise cap.DataError(f'config.data.name={name!r}: unknown dataset {member!r}, expected one '
                          f'of {list(DATASETS)}, or several as "levir_cc:3,whu_cdc:1"')
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      w = -1.0
    if not (w > 0 and math.isfinite(w)):
      raise cap.DataError(f'config.data.name={name!r}: the weight of {member} must be a positive '
                          f'number, got {weight!r}')
    if member in [m for m, _ in out]:
      raise cap.DataError(f'config.data.name={name!r}: {member} is listed twice')
    out.append((member, w))
  return out


def open_dataset(data_cfg: Mapping[str, Any], *,
                 build_if_missing: bool = False) -> 'Dataset | Mixture':
  """Opens a built dataset, or a Mixture when config.data.name lists several; builds the
  synthetic one on request (it needs no download)."""
  names = parse_names(data_cfg['name'])
  cache_mb = float(data_cfg.get('cache_mb', 0) or 0)
  if len(names) > 1:
    members = [open_dataset({**data_cfg, 'name': n, 'vocab_path': '', 'cache_mb': 0},
                            build_if_missing=build_if_missing) for n, _ in names]
    mixture = Mixture.of(members, [w for _, w in names], data_cfg.get('vocab_path') or '')
    if cache_mb > 0:  # one budget for all members
      cache = RecordCache(cache_mb)
      mixture.members = [dataclasses.replace(m, cache=cache) for m in mixture.members]
    return mixture
  builder = make_builder(data_cfg)
  name = data_cfg['name']
  if not builder.is_prepared():
    if build_if_missing and name == 'synthetic_cc':
      builder.download_and_prepare()
    else:
      raise cap.DataError(
          f'dataset {name} (config "{builder.builder_config.name}") is not built under '
          f'{builder.data_dir}; run: {build_hint(name)}')
  meta = builder.info.metadata
  want = _builders().config_fields(builder.builder_config)
  # A field added to the builder configs after the dataset was built means what it always
  # meant then: its default (e.g. stored_size 0, raw False).
  defaults = _builders().config_fields(type(builder.builder_config)(name='defaults'))
  built = {**{k: v for k, v in defaults.items() if k not in meta.get('builder_config', want)},
           **meta.get('builder_config', want)}
  if built != want:
    raise cap.DataError(f'{builder.data_dir} was built with {meta["builder_config"]}, but '
                        f'config.data.builder_config asks for {want}; give the variant its own '
                        'name or delete that folder')
  vocab_path = data_cfg.get('vocab_path') or ''
  vocab = cap.read_vocabulary(vocab_path) if vocab_path else cap.check_vocabulary(
      dict(meta['vocab']), os.path.join(builder.data_dir, 'metadata.json'))
  return Dataset(name, builder, vocab, record_caption_lengths(builder, meta['caption_lengths']),
                 cache=RecordCache(cache_mb) if cache_mb > 0 else None)


def record_caption_lengths(builder, splits) -> dict[str, list[list[int]]]:
  """Words of each caption of each pair, per split, in the order the records are read: index p
  is `source[p]`. Read from the records (pictures left undecoded: 0.3 s for the synthetic
  dataset's 2,000 train pairs), not from the builders' `caption_lengths` metadata, which lists the pairs in the order they were
  generated; TFDS shuffles that order when it writes the records."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  undecoded = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
               if isinstance(f, tfds.features.Image)}
  out = {}
  for split in splits:
    source = builder.as_data_source(split, decoders=undecoded)
    out[split] = [[len(_text(t).split()) for t in source[p]['tokens']]
                  for p in range(len(source))]
  return out


def text_statistics(dataset: Dataset) -> tuple[dict[str, int], list[str]]:
  """(word counts in first-seen order, caption texts with id = position) of a built dataset:
  from its metadata, or for a dataset built before they were recorded there, read from its
  records' text (pictures are not decoded)."""
  meta = dataset.builder.info.metadata
  if 'word_counts' in meta and 'caption_texts' in meta:
    return {w: int(c) for w, c in meta['word_counts']}, list(meta['caption_texts'])
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  counts, texts = cap.word_counts([]), set()
  only_text = {k: tfds.decode.SkipDecoding() for k, f in dataset.builder.info.features.items()
               if isinstance(f, tfds.features.Image)}  # PNG bytes stay undecoded
  for split in dataset.splits:
    source = dataset.builder.as_data_source(split, decoders=only_text)
    for i in range(len(source)):
      rec = source[i]
      counts.update(w for t in rec['tokens'] for w in _text(t).split())
      texts.update(cap.normalize_caption(_text(c)) for c in rec['captions'])
  return dict(counts), sorted(texts)


@dataclasses.dataclass
class Mixture:
  """Several built datasets trained on together (config.data.name 'levir_cc:3,whu_cdc:1'): one
  vocabulary merged by the SPEC rule over all their captions (or config.data.vocab_path), one
  caption id per distinct text across them, flags that keep their pairs apart. Training draws
  items from the members by weight (grain's mix, deterministic and resumable); evaluation runs
  per member (`members`), each a Dataset carrying the mixture's vocabulary."""
  name: str
  members: list[Dataset]
  weights: list[float]
  vocab: dict[str, int]

  @classmethod
  def of(cls, datasets: list[Dataset], weights: list[float], vocab_path: str = '') -> 'Mixture':
    stats = [text_statistics(d) for d in datasets]
    if vocab_path:
      vocab = cap.read_vocabulary(vocab_path)
    else:
      min_counts = {d.builder.builder_config.vocab_min_count for d in datasets}
      if len(min_counts) > 1:
        found = {d.name: d.builder.builder_config.vocab_min_count for d in datasets}
        raise cap.DataError(f'the datasets of a mixture must share vocab_min_count; got {found}')
      merged = cap.word_counts([])
      for counts, _ in stats:
        for w, c in counts.items():
          merged[w] += c
      vocab = cap.vocabulary_from_counts(merged, min_counts.pop())
    embeddings = {d.name: d.has_embeddings for d in datasets}
    if len(set(embeddings.values())) > 1:
      raise cap.DataError(f'a mixture needs caption embeddings in every dataset or in none; got '
                          f'{embeddings} (build them with the same sentence_encoder)')
    table = {t: i for i, t in enumerate(sorted({t for _, texts in stats for t in texts}))}
    members = [dataclasses.replace(
        d, vocab=vocab, flag_offset=k * MEMBER_STRIDE,
        caption_id_map=np.asarray([table[t] for t in texts], np.int32))
               for k, (d, (_, texts)) in enumerate(zip(datasets, stats))]
    name = ','.join(f'{d.name}:{w:g}' for d, w in zip(datasets, weights))
    return cls(name, members, list(weights), vocab)

  @property
  def has_embeddings(self) -> bool:
    return self.members[0].has_embeddings

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(s for s in cap.SPLITS if all(s in m.splits for m in self.members))

  @property
  def caption_lengths(self) -> dict[str, list[list[int]]]:
    return {s: [p for m in self.members for p in m.caption_lengths[s]] for s in self.splits}

  def describe(self) -> str:
    return 'mixture ' + ', '.join(f'{m.name} ({m.builder.data_dir})' for m in self.members)


# ----------------------------------------------------------------------------------------------
# Per-item transforms.

def resize_center_crop(image: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
  """SPEC section 2 geometry: shorter side to `size` (bicubic, as PIL does for torchvision's
  Resize), then the central size x size crop. uint8 in, uint8 out. `nearest` resamples by
  nearest neighbour instead, for label maps (class ids must stay class ids)."""
  h, w = image.shape[:2]
  if (h, w) != (size, size):
    if h <= w:
      nh, nw = size, int(size * w / h)
    else:
      nh, nw = int(size * h / w), size
    squeeze = image.ndim == 3 and image.shape[-1] == 1  # PIL has no (H, W, 1) mode
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    image = np.asarray(pil.resize((nw, nh), Image.NEAREST if nearest else Image.BICUBIC))
    if squeeze:
      image = image[..., None]
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    image = image[top:top + size, left:left + size]
  return image


def normalize_images(images: jnp.ndarray, dtype=jnp.float32,
                     normalization: str = 'clip') -> jnp.ndarray:
  """uint8 (..., H, W, 3) -> (x / 255 - mean) / std with `normalization`'s mean and std (the
  model's: `model.normalization`, from config.model.normalization)."""
  if normalization not in NORMALIZATION:
    raise ValueError(f'config.model.normalization={normalization!r}: expected one of '
                     f'{list(NORMALIZATION)}')
  mean, std = NORMALIZATION[normalization]
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def item_index(caption_lengths: list[list[int]], max_len: int, train: bool) -> np.ndarray:
  """(N, 2) int32 rows of (pair, caption): every caption that fits when training, else the first
  that fits per pair. Captions of more than max_len - 2 words are dropped, as in the reference."""
  rows = []
  for p, lengths in enumerate(caption_lengths):
    fits = [c for c, n in enumerate(lengths) if n <= max_len - 2]
    rows.extend((p, c) for c in (fits if train else fits[:1]))
  return np.asarray(rows, np.int32).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class _Fetch:
  """Turns (pair, caption) into one model input item."""
  read: Callable[[int], Mapping[str, Any]]  # Dataset.reader: pair -> record
  vocab: Mapping[str, int]
  max_len: int
  with_embeddings: bool
  with_references: bool
  flag_offset: int = 0
  caption_id_map: np.ndarray | None = None

  @classmethod
  def of(cls, dataset: Dataset, split: str, max_len: int, image_size: int,
         with_references: bool) -> '_Fetch':
    return cls(dataset.reader(split, image_size), dataset.vocab, max_len,
               dataset.has_embeddings, with_references, dataset.flag_offset,
               dataset.caption_id_map)

  def _ids(self, ids) -> np.ndarray:
    ids = np.asarray(ids, np.int32)
    return ids if self.caption_id_map is None else self.caption_id_map[ids]

  def __call__(self, pair: int, caption: int, valid: bool) -> dict[str, Any]:
    rec = self.read(int(pair))
    words = _text(rec['tokens'][caption]).split()
    imgid = int(rec['imgid'])
    if self.flag_offset and not 0 <= imgid < MEMBER_STRIDE:
      raise cap.DataError(f'pair {_text(rec["filename"])}: imgid {imgid} is outside '
                          f'[0, {MEMBER_STRIDE}), the range a mixture member may use')
    item = {
        'image_a': rec['image_a'],
        'image_b': rec['image_b'],
        'tokens': cap.encode_caption(words, self.vocab, self.max_len),
        # SPEC: the item label is -1 for a no-change pair, else the pair's imgid.
        'flag': np.int32(-1 if int(rec['changeflag']) == 0 else imgid + self.flag_offset),
        'caption_id': self._ids(rec['caption_ids'])[caption],
        'pair_index': np.int32(pair),
        'valid': np.bool_(valid),
    }
    if self.with_embeddings:
      item['caption_emb'] = np.asarray(rec['caption_embeddings'][caption], np.float32)
    if self.with_references:
      item['references'] = np.array([_text(c) for c in rec['captions']])
      item['filename'] = np.array(_text(rec['filename']))
      # Every caption of the pair (for pair -> text retrieval); over-long ones are truncated.
      item['all_tokens'] = np.stack([
          cap.encode_caption(_text(t).split()[:self.max_len - 2], self.vocab, self.max_len)
          for t in rec['tokens']])
      item['all_caption_ids'] = self._ids(rec['caption_ids'])
    return item


def _text(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which items each step of each process sees."""
  num_items: int
  global_batch: int
  steps_per_epoch: int
  num_epochs: int

  @property
  def num_steps(self) -> int:
    return self.steps_per_epoch * self.num_epochs


def make_batches(dataset: 'Dataset | Mixture', split: str, *, global_batch: int, max_len: int,
                 image_size: int, train: bool, seed: int = 0, num_epochs: int = 1,
                 process_index: int = 0, process_count: int = 1,
                 with_references: bool = False,
                 caption_pad_multiple: int = 0) -> tuple[grain.MapDataset, Plan]:
  """A `grain.MapDataset` of this process's batches, and the plan it follows.

  Training: items shuffled per epoch (a different permutation each epoch, fixed by `seed`), the
  last partial batch of each epoch dropped. Evaluation: items in order, the last batch padded by
  repeating item 0 with `valid` False so shapes stay fixed.

  A Mixture trains on its members' items drawn by weight (each member's items shuffled, a new
  permutation each pass over them); an epoch is as many items as the members hold together.

  Step s of the global batch holds items s*B .. s*B+B-1 of the epoch order; process p reads the
  contiguous slice p*b .. p*b+b-1 (b = B / process_count). Concatenating the processes' batches in
  process order gives exactly the single-process global batch.

  `caption_pad_multiple` k > 0 (training only): each step's `tokens` are (b, L), L the global
  batch's longest caption with START and END rounded up to a multiple of k (at most max_len),
  instead of (b, max_len); see `captions.padded_length`. L comes from the dataset's caption
  lengths, so every process cuts its slice to the same L without talking to the others.
  """
  if global_batch % process_count:
    raise cap.DataError(f'batch size {global_batch} must be divisible by the number of processes '
                        f'({process_count})')
  tables, fetches = [], []
  for m in dataset.members:
    lengths = m.caption_lengths.get(split)
    if lengths is None:
      raise cap.DataError(f'dataset {m.name} has no split "{split}"; it has '
                          f'{list(m.caption_lengths)}')
    stored = getattr(m.builder.builder_config, 'stored_size', 0)
    if stored and stored != image_size:
      raise cap.DataError(
          f'dataset {m.name} ({m.builder.builder_config.name}) stores its pictures resized to '
          f'{stored} px, but config.model.image_size={image_size}: resizing them again is not '
          f'the reference\'s preprocessing; build it with stored_size={image_size} (or 0)')
    tables.append(item_index(lengths, max_len, train))
    if len(tables[-1]) == 0:
      raise cap.DataError(f'split "{split}" of {m.name} has no caption of at most '
                          f'{max_len - 2} words')
    fetches.append(_Fetch.of(m, split, max_len, image_size, with_references))
  # (member, pair, caption) rows, the members' items one after the other.
  index = np.concatenate([np.concatenate([np.full((len(t), 1), k, np.int32), t], axis=1)
                          for k, t in enumerate(tables)])
  n = len(index)
  steps = n // global_batch if train else math.ceil(n / global_batch)
  if steps == 0:
    raise cap.DataError(f'split "{split}" has {n} items, fewer than one batch of {global_batch}')
  import grain  # pylint: disable=import-outside-toplevel
  plan = Plan(n, global_batch, steps, num_epochs)
  local = global_batch // process_count
  if train and len(tables) > 1:
    order = _mixture_order([len(t) for t in tables], dataset.weights, seed)
  else:
    order = _item_order(n, train, seed, num_epochs)

  def load(k: int) -> dict[str, Any]:
    step, slot = divmod(k, local)
    epoch, step_in_epoch = divmod(step, steps)
    i = step_in_epoch * global_batch + process_index * local + slot
    valid = i < n
    member, pair, caption = index[order[epoch * n + (i if valid else 0)]]
    return fetches[member](pair, caption, valid)

  ds = grain.MapDataset.range(plan.num_steps * local).map(load).batch(local, drop_remainder=True)
  if train and caption_pad_multiple:
    words = np.concatenate([_caption_words(m.caption_lengths[split], t)
                            for m, t in zip(dataset.members, tables)])

    def cut(step: int, batch: dict[str, Any]) -> dict[str, Any]:
      epoch, step_in_epoch = divmod(step, steps)
      first = epoch * n + step_in_epoch * global_batch
      longest = max(int(words[order[first + j]]) for j in range(global_batch))
      return cut_captions(batch, cap.padded_length(longest, caption_pad_multiple, max_len),
                          dataset.describe())

    ds = ds.map_with_index(cut)
  return ds, plan


def _caption_words(caption_lengths: list[list[int]], items: np.ndarray) -> np.ndarray:
  """Words of each (pair, caption) item row, from the dataset's caption lengths."""
  return np.asarray([caption_lengths[p][c] for p, c in items], np.int32).reshape(-1)


def cut_captions(batch: dict[str, Any], length: int, source: str = 'the batch') -> dict[str, Any]:
  """The batch with `tokens` (b, max_len) cut to (b, length). Only PAD may be cut off: a real
  token there means the dataset's caption lengths (its metadata) disagree with its records."""
  tokens = batch['tokens']
  if np.any(tokens[:, length:] != cap.PAD):
    raise cap.DataError(f'{source}: a caption runs past token {length}, the batch\'s longest '
                        'according to the caption lengths read when the dataset was opened; the '
                        'records changed since: reopen the dataset')
  return {**batch, 'tokens': tokens[:, :length]}


def concat_items(batch: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
  """The items of `batch` followed by those of `more` (a step's mined negatives), `tokens`
  padded with PAD to the longer of the two (each may have been cut to its own length)."""
  out = {}
  for k, v in batch.items():
    w = more[k]
    if k == 'tokens' and v.shape[1] != w.shape[1]:
      length = max(v.shape[1], w.shape[1])
      pad = lambda x: np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=cap.PAD)
      v, w = pad(v), pad(w)
    out[k] = np.concatenate([v, w])
  return out


def _item_order(n: int, train: bool, seed: int, num_epochs: int):
  """Item rows in the order the epochs visit them: order[epoch * n + i]."""
  import grain  # pylint: disable=import-outside-toplevel
  order = grain.MapDataset.range(n)
  if train:
    order = order.shuffle(seed=seed)
  return order.repeat(num_epochs)


def _mixture_order(sizes: list[int], weights: list[float], seed: int):
  """Rows of the members' concatenated item tables, drawn by weight: member k's items shuffled
  (seed + k; a new permutation each pass over them, endlessly) and interleaved by grain's
  deterministic mix. Random access, so the iterator state is a position, as for one dataset."""
  import grain  # pylint: disable=import-outside-toplevel
  starts = np.cumsum([0] + sizes[:-1])
  parts = [grain.MapDataset.range(size).shuffle(seed=seed + k).repeat()
           .map(functools.partial(operator.add, int(start)))
           for k, (size, start) in enumerate(zip(sizes, starts))]
  return grain.MapDataset.mix(parts, weights)


def _single(dataset, what: str) -> Dataset:
  if len(dataset.members) > 1:
    raise cap.DataError(f'{what} works on one dataset, not the mixture {dataset.name}')
  return dataset


def train_items(dataset: Dataset, max_len: int) -> np.ndarray:
  """The train split's item table, (N, 2) rows of (pair, caption), as `make_batches` reads it."""
  return item_index(_single(dataset, 'hard-negative mining').caption_lengths['train'], max_len,
                    train=True)


def mined_batches(dataset: Dataset, plan: Plan, table: np.ndarray, *, epoch: int,
                  start_step: int, max_len: int, image_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  caption_pad_multiple: int = 0) -> grain.MapDataset:
  """This process's mined items for steps start_step.. of `epoch` (0-based) of the train plan
  that `make_batches(..., train=True, seed=seed)` made: per step, the local batch's items' hard
  negatives, `table` (N, n) item rows (mining.NONE: an invalid item), item by item: a batch of b
  items gets b*n, (item 0's n negatives, item 1's, ...). Concatenated after the step's batch
  (`concat_items`). With `caption_pad_multiple`, tokens are cut as in `make_batches`, to the
  longest caption among all processes' mined items of the step."""
  import grain  # pylint: disable=import-outside-toplevel
  index = train_items(dataset, max_len)
  n_items, n = len(index), table.shape[1]
  if table.shape[0] != n_items:
    raise cap.DataError(f'the mining table has {table.shape[0]} rows; the train split has '
                        f'{n_items} items')
  local = plan.global_batch // process_count
  order = _item_order(n_items, True, seed, plan.num_epochs)
  fetch = _Fetch.of(dataset, 'train', max_len, image_size, False)

  def load(k: int) -> dict[str, Any]:
    step_in_epoch, slot = divmod(k, local * n)
    base_slot, j = divmod(slot, n)
    i = step_in_epoch * plan.global_batch + process_index * local + base_slot
    row = int(table[order[epoch * n_items + i], j])
    pair, caption = index[max(row, 0)]
    return fetch(pair, caption, row >= 0)

  steps = plan.steps_per_epoch - start_step
  ds = grain.MapDataset.range(steps * local * n).map(
      lambda k: load(k + start_step * local * n)).batch(local * n, drop_remainder=True)
  if caption_pad_multiple:
    words = _caption_words(dataset.caption_lengths['train'], index)

    def cut(k: int, batch: dict[str, Any]) -> dict[str, Any]:
      first = epoch * n_items + (start_step + k) * plan.global_batch
      rows = table[[order[first + i] for i in range(plan.global_batch)]]
      longest = int(words[np.maximum(rows, 0)].max())
      return cut_captions(batch, cap.padded_length(longest, caption_pad_multiple, max_len),
                          dataset.describe())

    ds = ds.map_with_index(cut)
  return ds


def iterate(ds: grain.MapDataset, *, num_threads: int = 4, prefetch: int = 8):
  """A checkpointable iterator (`get_state` / `set_state`) with threaded prefetch."""
  import grain  # pylint: disable=import-outside-toplevel
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch)))


def dataset_summary(dataset: 'Dataset | Mixture') -> str:
  summary = [{'dataset': m.name, 'config': m.builder.builder_config.name,
              'pairs': {s: len(v) for s, v in m.caption_lengths.items()},
              'image_size': m.image_size} for m in dataset.members]
  if len(summary) == 1:
    return json.dumps({**summary[0], 'vocab': len(dataset.vocab)})
  return json.dumps({'mixture': [dict(d, weight=w) for d, w in zip(summary, dataset.weights)],
                     'vocab': len(dataset.vocab)})
