"""LEVIR-CC caption records, vocabulary and token encoding (SPEC section 1).

Pure functions over the dataset's JSON schema; no TFDS, no JAX. Every error names the file and the
record at fault and says what was expected.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

PAD, START, UNK, END = 0, 1, 2, 3
SPECIAL_TOKENS = {'PAD': PAD, 'START': START, 'UNK': UNK, 'END': END}
SPLITS = ('train', 'val', 'test')
CAPTIONS_PER_PAIR = 5

# Every no-change pair of LEVIR-CC carries exactly these five sentences.
NO_CHANGE_SENTENCES = (
    'there is no difference',
    'the two scenes seem identical',
    'the scene is the same as before',
    'no change has occurred',
    'almost nothing has changed',
)


class DataError(ValueError):
  """A dataset file does not follow the expected schema or layout."""


@dataclasses.dataclass(frozen=True)
class PairRecord:
  """One bi-temporal pair as listed in `LevirCCcaptions.json`."""
  filepath: str  # split folder under images/, e.g. 'train'
  filename: str  # e.g. 'train_000016.png'; the same name under A/ and B/
  imgid: int
  split: str
  changeflag: int  # 0 = no change, 1 = change
  raws: tuple[str, ...]  # the captions as written, e.g. ' several houses appear .'
  tokens: tuple[tuple[str, ...], ...]  # the dataset's own tokenisation of each caption


def normalize_caption(text: str) -> str:
  """Canonical text used to decide that two captions are the same sentence.

  Lower case, punctuation dropped, whitespace collapsed: ' The road is built .' and
  'the road is built' are the same caption.
  """
  return ' '.join(re.sub(r'[^\w\s]', ' ', text.lower()).split())


def infer_changeflag(raws: Iterable[str]) -> int:
  """SPEC rule for copies of the JSON without `changeflag`: no change iff every caption is one of
  the five no-change sentences."""
  no_change = {normalize_caption(s) for s in NO_CHANGE_SENTENCES}
  return 0 if all(normalize_caption(r) in no_change for r in raws) else 1


def _expect(cond: bool, path: str, where: str, what: str) -> None:
  if not cond:
    raise DataError(f'{path}: {where}: expected {what}')


def parse_captions(data: object, path: str = '<captions json>') -> list[PairRecord]:
  """Validates the LEVIR-CC caption schema and returns one record per pair."""
  _expect(isinstance(data, dict) and isinstance(data.get('images'), list), path, 'top level',
          'an object {"images": [...]} (the LevirCCcaptions.json schema)')
  records = []
  seen_ids: dict[int, int] = {}
  for i, entry in enumerate(data['images']):
    where = f'images[{i}]'
    _expect(isinstance(entry, dict), path, where, 'an object')
    if isinstance(entry.get('filename'), str):
      where = f'{where} ({entry["filename"]})'
    for key, kind in (('filepath', str), ('filename', str), ('imgid', int), ('split', str),
                      ('sentences', list)):
      _expect(key in entry, path, where, f'key "{key}"')
      _expect(isinstance(entry[key], kind) and not isinstance(entry[key], bool), path,
              f'{where}.{key}', f'a {kind.__name__}, got {entry[key]!r:.60}')
    _expect(entry['split'] in SPLITS, path, f'{where}.split', f'one of {SPLITS}, got '
            f'{entry["split"]!r}')
    _expect(entry['imgid'] not in seen_ids, path, f'{where}.imgid',
            f'a unique id, {entry["imgid"]} is also used by images[{seen_ids.get(entry["imgid"])}]')
    seen_ids[entry['imgid']] = i
    sentences = entry['sentences']
    _expect(len(sentences) == CAPTIONS_PER_PAIR, path, f'{where}.sentences',
            f'{CAPTIONS_PER_PAIR} captions, got {len(sentences)}')
    raws, tokens = [], []
    for j, s in enumerate(sentences):
      sw = f'{where}.sentences[{j}]'
      _expect(isinstance(s, dict) and isinstance(s.get('raw'), str), path, sw,
              'an object with a string "raw"')
      _expect(isinstance(s.get('tokens'), list) and all(isinstance(t, str) for t in s['tokens'])
              and s['tokens'], path, f'{sw}.tokens', 'a non-empty list of words')
      raws.append(s['raw'])
      tokens.append(tuple(s['tokens']))
    if 'changeflag' in entry:
      _expect(entry['changeflag'] in (0, 1), path, f'{where}.changeflag',
              f'0 or 1, got {entry["changeflag"]!r}')
      changeflag = int(entry['changeflag'])
    else:
      changeflag = infer_changeflag(raws)
    records.append(PairRecord(entry['filepath'], entry['filename'], entry['imgid'], entry['split'],
                              changeflag, tuple(raws), tuple(tokens)))
  _expect(bool(records), path, 'images', 'at least one pair')
  return records


def read_captions(path: str | os.PathLike) -> list[PairRecord]:
  """Reads and validates a captions JSON in the LEVIR-CC schema (`LevirCCcaptions.json`, WHU-CDC's
  `whuCCcaptions.json`)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: caption file not found (expected the download\'s captions JSON, '
                    'e.g. LevirCCcaptions.json of LEVIR-CC)')
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e})') from e
  return parse_captions(data, path)


def build_vocabulary(token_lists: Iterable[Sequence[str]], min_count: int = 5) -> dict[str, int]:
  """SPEC vocabulary: words seen more than `min_count` times over all splits, ids from 4 by
  descending frequency (ties in first-seen order, like pandas' value_counts), specials 0..3."""
  counts = collections.Counter()
  for tokens in token_lists:
    counts.update(tokens)
  # Counter keeps first-insertion order and sorted() is stable: ties stay in first-seen order.
  words = [w for w, c in sorted(counts.items(), key=lambda wc: -wc[1]) if c > min_count]
  vocab = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(w for w in words
                                                             if w not in SPECIAL_TOKENS)}
  vocab.update(SPECIAL_TOKENS)
  return vocab


def check_vocabulary(vocab: object, path: str = '<vocabulary>') -> dict[str, int]:
  """Validates a `{word: id}` vocabulary in the reference format."""
  _expect(isinstance(vocab, dict) and vocab, path, 'top level', 'a non-empty {word: id} object')
  for name, idx in SPECIAL_TOKENS.items():
    _expect(vocab.get(name) == idx, path, f'"{name}"', f'id {idx}, got {vocab.get(name)!r}')
  ids = sorted(vocab.values())
  _expect(all(isinstance(i, int) for i in ids) and ids == list(range(len(ids))), path, 'ids',
          f'the integers 0..{len(vocab) - 1}, each used once')
  return dict(vocab)


def read_vocabulary(path: str | os.PathLike) -> dict[str, int]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: vocabulary file not found (expected a {{word: id}} JSON)')
  try:
    with open(path, encoding='utf-8') as f:
      return check_vocabulary(json.load(f), path)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e})') from e


def encode_caption(tokens: Sequence[str], vocab: Mapping[str, int],
                   max_len: int) -> np.ndarray | None:
  """`[START] w1 .. wn [END] PAD ...` of length max_len (int32), or None when the caption has more
  than max_len - 2 words (the reference drops those)."""
  if len(tokens) > max_len - 2:
    return None
  ids = np.full((max_len,), PAD, np.int32)
  ids[0] = START
  ids[1:len(tokens) + 1] = [vocab.get(t, UNK) for t in tokens]
  ids[len(tokens) + 1] = END
  return ids


def decode_caption(ids: Sequence[int], words: Sequence[str]) -> str:
  """Words between START and END joined by spaces (the reference's hypothesis string).
  `words[i]` is the word of id i."""
  out = []
  for i in ids:
    i = int(i)
    if i == END:
      break
    if i in (START, PAD):
      continue
    out.append(words[i])
  return ' '.join(out)


def id_to_word(vocab: Mapping[str, int]) -> list[str]:
  words = [''] * len(vocab)
  for w, i in vocab.items():
    words[i] = w
  return words
