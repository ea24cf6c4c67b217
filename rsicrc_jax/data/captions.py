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

# Dubai-CC has no changeflag: a pair is unchanged when its captions are these, the sentences its
# annotators used for "no change" (as the change-captioning codebases that evaluate on Dubai-CC
# list them). Compared after normalize_caption, so case and the final full stop do not matter.
DUBAI_NO_CHANGE_SENTENCES = (
    'Nothing has changed',
    'There is no difference',
    'All remained the same',
    'Everything remains the same',
    'Nothing has changed in this area',
    'Nothing changed in this area',
    'No changes in this area',
    'No change was made',
    'There is no change to mention',
    'No changes to mention',
    'No changed to mention',
    'No difference in this area',
    'No change to mention',
    'No change occurred in this area',
    'The area appears the same',
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


def infer_changeflag(raws: Iterable[str], sentences: Sequence[str] = NO_CHANGE_SENTENCES) -> int:
  """SPEC rule for copies of the JSON without `changeflag`: no change iff every caption is one of
  the dataset's no-change `sentences` (LEVIR-CC's five by default)."""
  no_change = {normalize_caption(s) for s in sentences}
  return 0 if all(normalize_caption(r) in no_change for r in raws) else 1


def _expect(cond: bool, path: str, where: str, what: str) -> None:
  if not cond:
    raise DataError(f'{path}: {where}: expected {what}')


def fill_captions(raws: Sequence) -> tuple[tuple, int]:
  """A user's 1..n captions of a pair -> exactly CAPTIONS_PER_PAIR (fewer are repeated in
  order, so that training samples each about equally often; repeats are the same sentence to the
  FNA loss), and how many beyond the first CAPTIONS_PER_PAIR were dropped."""
  raws = tuple(raws)
  filled = tuple(raws[i % len(raws)] for i in range(CAPTIONS_PER_PAIR))
  return filled, max(0, len(raws) - CAPTIONS_PER_PAIR)


def parse_captions(data: object, path: str = '<captions json>', *,
                   strict: bool = True) -> list[PairRecord]:
  """Validates the LEVIR-CC caption schema and returns one record per pair. With `strict`
  off (a user's own data, `change_captions`), `imgid` and each sentence's `tokens` may be left
  out (ids follow the order; tokens are the normalised words of `raw`) and a pair may have any
  number of captions from one (`fill_captions`)."""
  _expect(isinstance(data, dict) and isinstance(data.get('images'), list), path, 'top level',
          'an object {"images": [...]} (the LevirCCcaptions.json schema)')
  records = []
  seen_ids: dict[int, int] = {}
  for i, entry in enumerate(data['images']):
    where = f'images[{i}]'
    _expect(isinstance(entry, dict), path, where, 'an object')
    if isinstance(entry.get('filename'), str):
      where = f'{where} ({entry["filename"]})'
    if not strict:
      entry = {'imgid': i, **entry}
      if isinstance(entry.get('split'), str):
        entry.setdefault('filepath', entry['split'])
      sentences = entry.get('sentences')
      if isinstance(sentences, list) and sentences and all(
          isinstance(x, dict) and isinstance(x.get('raw'), str) for x in sentences):
        raws, _ = fill_captions([x['raw'] for x in sentences])
        entry['sentences'] = [{'raw': r, 'tokens': next(
            (x['tokens'] for x in sentences if x['raw'] == r and 'tokens' in x),
            normalize_caption(r).split())} for r in raws]
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
            f'{CAPTIONS_PER_PAIR} captions, got {len(sentences)}' if strict else
            'at least one caption object with a string "raw"')
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


def read_captions(path: str | os.PathLike, *, strict: bool = True) -> list[PairRecord]:
  """Reads and validates a captions JSON in the LEVIR-CC schema (`LevirCCcaptions.json`, WHU-CDC's
  `whuCCcaptions.json`; with `strict` off, a user's own, see parse_captions)."""
  path = os.fspath(path)
  return parse_captions(load_json(path, 'the download\'s captions JSON, e.g. LevirCCcaptions.json '
                                  'of LEVIR-CC'), path, strict=strict)


def load_json(path: str, expected: str) -> object:
  """A captions file's JSON; DataError naming the file when it is missing (saying `expected`)
  or not valid JSON."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: caption file not found (expected {expected})')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e})') from e


def build_vocabulary(token_lists: Iterable[Sequence[str]], min_count: int = 5) -> dict[str, int]:
  """SPEC vocabulary: words seen more than `min_count` times over all splits, ids from 4 by
  descending frequency (ties in first-seen order, like pandas' value_counts), specials 0..3."""
  return vocabulary_from_counts(word_counts(token_lists), min_count)


def word_counts(token_lists: Iterable[Sequence[str]]) -> collections.Counter:
  """Word -> count, in first-seen order (what the SPEC vocabulary rule breaks ties by)."""
  counts = collections.Counter()
  for tokens in token_lists:
    counts.update(tokens)
  return counts


def vocabulary_from_counts(counts: Mapping[str, int], min_count: int = 5) -> dict[str, int]:
  """`build_vocabulary` from word counts given in first-seen order (several datasets' counts
  summed make the merged vocabulary of a mixture)."""
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


def padded_length(longest_words: int, multiple: int, max_len: int) -> int:
  """Token slots a batch whose longest caption has `longest_words` words is padded to: its
  START .. END (words + 2) rounded up to a multiple of `multiple`, at most max_len; max_len when
  `multiple` is 0 (the reference always pads to max_len). Positions after a caption's END are
  PAD, which the decoder masks and the losses ignore, so a batch cut to this length gives the
  losses and gradients of its max_len form (dropout aside: its masks are drawn for the shape)
  while the decoder skips the PAD slots."""
  if multiple < 0:
    raise ValueError(f'caption pad multiple {multiple}: expected an integer >= 0')
  if not 0 <= longest_words <= max_len - 2:
    raise ValueError(f'a caption of {longest_words} words does not fit max_len={max_len} '
                     '(START, the words, END)')
  if not multiple:
    return max_len
  return min(-(-(longest_words + 2) // multiple) * multiple, max_len)


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


CSV_COLUMNS = ('before', 'after', 'split', 'caption')


def read_caption_csv(path: str | os.PathLike
                     ) -> tuple[list[PairRecord], dict[int, tuple[str, str]], int]:
  """A user's captions as CSV: a header naming the columns `before,after,split,caption` (others
  are ignored), then one row per caption, several rows per pair allowed. before/after are image
  paths relative to the CSV's folder. Returns one record per pair, in the order pairs first
  appear (captions filled to CAPTIONS_PER_PAIR by `fill_captions`, changeflag by the SPEC rule),
  {imgid: (before path, after path)}, and how many captions beyond the fifth were dropped."""
  import csv  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: caption file not found')
  pairs: dict[tuple[str, str], dict] = {}
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise DataError(f'{path}: the header lacks column(s) {missing}; expected '
                      f'{",".join(CSV_COLUMNS)} (found {reader.fieldnames})')
    for row in reader:
      line = reader.line_num
      values = {c: (row[c] or '').strip() for c in CSV_COLUMNS}
      for c in CSV_COLUMNS:
        if not values[c]:
          raise DataError(f'{path}: line {line}: empty "{c}"')
      if values['split'] not in SPLITS:
        raise DataError(f'{path}: line {line}: split {values["split"]!r}, expected one of '
                        f'{SPLITS}')
      if not normalize_caption(values['caption']):
        raise DataError(f'{path}: line {line}: the caption {values["caption"]!r} has no words')
      key = (values['before'], values['after'])
      pair = pairs.setdefault(key, {'split': values['split'], 'line': line, 'raws': []})
      if pair['split'] != values['split']:
        raise DataError(f'{path}: line {line}: {key[0]} -> {key[1]} is in split '
                        f'{values["split"]!r} here but {pair["split"]!r} on line {pair["line"]}')
      pair['raws'].append(values['caption'])
  if not pairs:
    raise DataError(f'{path}: no caption rows after the header')
  records, paths, dropped = [], {}, 0
  for imgid, ((before, after), pair) in enumerate(pairs.items()):
    raws, extra = fill_captions(pair['raws'])
    dropped += extra
    records.append(PairRecord('', before, imgid, pair['split'], infer_changeflag(raws), raws,
                              tuple(tuple(normalize_caption(r).split()) for r in raws)))
    paths[imgid] = (before, after)
  return records, paths, dropped


def lower_tokens(tokens: Sequence[str]) -> tuple[str, ...]:
  """Tokens as Dubai-CC writes them ('Nothing', 'changed.') -> the vocabulary's words: lower
  case, punctuation stripped ('nothing', 'changed'); a token of punctuation only disappears."""
  return tuple(normalize_caption(' '.join(tokens)).split())


def parse_dubai_captions(data: object, path: str, split: str, first_imgid: int = 0,
                         no_change: Sequence[str] = DUBAI_NO_CHANGE_SENTENCES
                         ) -> tuple[list[PairRecord], int]:
  """One of Dubai-CC's caption files ({Train,Validation,Test}_Dubai_CC.json: {"images":
  [{filename, image_id, split, sentids, sentences: [{raw, tokens, ...}]}]}), all of `split` (the
  file says which). Tokens keep case and punctuation there; records hold them lowercased and
  stripped (`lower_tokens`), raws as written. imgids run from `first_imgid` in file order (the
  files' own image_id restart per file). changeflag: the SPEC rule over `no_change`, Dubai-CC's
  own sentences. Returns the records and how many captions beyond the fifth were dropped."""
  _expect(isinstance(data, dict) and isinstance(data.get('images'), list), path, 'top level',
          'an object {"images": [...]} (Dubai-CC\'s caption schema)')
  records, seen, dropped = [], {}, 0
  for i, entry in enumerate(data['images']):
    where = f'images[{i}]'
    _expect(isinstance(entry, dict), path, where, 'an object')
    _expect(isinstance(entry.get('filename'), str) and entry['filename'], path,
            f'{where}.filename', 'the tile\'s file name, e.g. "0x0.tif"')
    where = f'{where} ({entry["filename"]})'
    _expect(entry['filename'] not in seen, path, f'{where}.filename',
            f'a file listed once, it is also images[{seen.get(entry["filename"])}]')
    seen[entry['filename']] = i
    sentences = entry.get('sentences')
    _expect(isinstance(sentences, list) and bool(sentences), path, f'{where}.sentences',
            'a non-empty list of caption objects')
    raws, tokens = [], []
    for j, s in enumerate(sentences):
      sw = f'{where}.sentences[{j}]'
      _expect(isinstance(s, dict) and isinstance(s.get('raw'), str), path, sw,
              'an object with a string "raw"')
      given = s.get('tokens')
      _expect(given is None or (isinstance(given, list) and all(isinstance(t, str) for t in given)),
              path, f'{sw}.tokens', 'a list of words')
      words = lower_tokens(given) if given else tuple(normalize_caption(s['raw']).split())
      _expect(bool(words), path, sw, f'a caption with words, got {s["raw"]!r}')
      raws.append(s['raw'])
      tokens.append(words)
    keep, extra = fill_captions(range(len(raws)))  # which captions, repeated or cut to 5
    dropped += extra
    raws_5 = tuple(raws[k] for k in keep)
    records.append(PairRecord('', entry['filename'], first_imgid + len(records), split,
                              infer_changeflag(raws_5, no_change), raws_5,
                              tuple(tokens[k] for k in keep)))
  _expect(bool(records), path, 'images', 'at least one pair')
  return records, dropped
