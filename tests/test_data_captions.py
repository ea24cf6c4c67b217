"""Caption records, vocabulary and token encoding (SPEC section 1)."""

import json
import os

import numpy as np
import pytest

from rsicrc_jax.data import captions as cap
from conftest import FIXTURES

MINI_JSON = os.path.join(FIXTURES, 'levir_cc_mini', 'LevirCCcaptions.json')


def test_reads_the_real_levir_cc_records():
  records = cap.read_captions(MINI_JSON)
  assert [r.filename for r in records] == ['train_000016.png', 'train_000051.png',
                                           'train_000054.png']
  first = records[0]
  assert first.imgid == 1943 and first.split == 'train' and first.changeflag == 1
  assert first.raws[0] == ' several houses appear on the bareland at the bottom .'
  assert first.tokens[0] == ('several', 'houses', 'appear', 'on', 'the', 'bareland', 'at', 'the',
                             'bottom')
  assert all(len(r.raws) == 5 for r in records)


def test_changeflag_is_inferred_from_the_no_change_sentences():
  assert cap.infer_changeflag([f' {s} .' for s in cap.NO_CHANGE_SENTENCES]) == 0
  assert cap.infer_changeflag([' there is no difference .'] * 4 + [' a road is built .']) == 1
  assert cap.normalize_caption(' The road, is   built .') == 'the road is built'


def test_vocabulary_rule_counts_ties_and_threshold():
  # counts: a=7, c=7, e=7, b=6, d=5 (not kept: a word must be seen MORE than 5 times)
  sents = [['a', 'b', 'c']] * 5 + [['c', 'e', 'a'], ['e', 'a', 'c', 'b']] + [['d', 'e']] * 5
  vocab = cap.build_vocabulary(sents, min_count=5)
  # Ties keep first-seen order: a, c (first seen in sentence 0), then e; b has fewer.
  assert vocab == {'PAD': 0, 'START': 1, 'UNK': 2, 'END': 3, 'a': 4, 'c': 5, 'e': 6, 'b': 7}


def test_vocabulary_of_the_real_records_matches_a_plain_count():
  records = cap.read_captions(MINI_JSON)
  words = [w for r in records for t in r.tokens for w in t]
  vocab = cap.build_vocabulary([t for r in records for t in r.tokens])
  kept = [w for w in dict.fromkeys(words) if words.count(w) > 5]
  assert sorted(vocab) == sorted(kept + list(cap.SPECIAL_TOKENS))
  by_id = sorted(kept, key=lambda w: vocab[w])
  counts = [words.count(w) for w in by_id]
  assert counts == sorted(counts, reverse=True)
  assert by_id[0] == 'the' and counts[0] == words.count('the')


def test_encode_decode_round_trip_and_drop_rule():
  vocab = {'PAD': 0, 'START': 1, 'UNK': 2, 'END': 3, 'road': 4, 'a': 5}
  ids = cap.encode_caption(['a', 'new', 'road'], vocab, max_len=7)
  np.testing.assert_array_equal(ids, [1, 5, 2, 4, 3, 0, 0])
  assert ids.dtype == np.int32
  assert cap.encode_caption(['a'] * 5, vocab, 7) is not None  # 5 = max_len - 2 words fit
  assert cap.encode_caption(['a'] * 6, vocab, 7) is None
  assert cap.decode_caption(ids, cap.id_to_word(vocab)) == 'a UNK road'


def test_vocabulary_file_is_validated(tmp_path):
  good = {'PAD': 0, 'START': 1, 'UNK': 2, 'END': 3, 'road': 4}
  path = tmp_path / 'vocab.json'
  path.write_text(json.dumps(good))
  assert cap.read_vocabulary(path) == good
  path.write_text(json.dumps({**good, 'house': 6}))
  with pytest.raises(cap.DataError, match=r'vocab.json: ids: expected the integers 0..5'):
    cap.read_vocabulary(path)
  path.write_text(json.dumps({**good, 'END': 4, 'road': 3}))
  with pytest.raises(cap.DataError, match=r'"END": expected id 3, got 4'):
    cap.read_vocabulary(path)
  with pytest.raises(cap.DataError, match='vocabulary file not found'):
    cap.read_vocabulary(tmp_path / 'missing.json')


def _entry(**over):
  e = {'filepath': 'train', 'filename': 'train_000001.png', 'imgid': 1, 'split': 'train',
       'sentences': [{'tokens': ['a', 'road'], 'raw': ' a road .'}] * 5}
  e.update(over)
  return e


@pytest.mark.parametrize('data, message', [
    ({'pairs': []}, r'top level: expected an object \{"images": \[...\]\}'),
    ({'images': []}, 'expected at least one pair'),
    ({'images': [{k: v for k, v in _entry().items() if k != 'imgid'}]},
     r'images\[0\] \(train_000001.png\): expected key "imgid"'),
    ({'images': [_entry(split='training')]}, r"images\[0\] \(train_000001.png\).split: expected one of"),
    ({'images': [_entry(sentences=[{'tokens': ['a'], 'raw': ' a .'}] * 4)]},
     'expected 5 captions, got 4'),
    ({'images': [_entry(), _entry(filename='train_000002.png')]}, 'expected a unique id'),
    ({'images': [_entry(changeflag=2)]}, 'changeflag: expected 0 or 1, got 2'),
    ({'images': [_entry(sentences=[{'raw': ' a .'}] * 5)]}, 'tokens: expected a non-empty list'),
])
def test_schema_errors_name_the_file_and_record(tmp_path, data, message):
  path = tmp_path / 'LevirCCcaptions.json'
  path.write_text(json.dumps(data))
  with pytest.raises(cap.DataError, match=message) as err:
    cap.read_captions(path)
  assert str(path) in str(err.value)


def test_invalid_json_and_missing_file(tmp_path):
  path = tmp_path / 'LevirCCcaptions.json'
  path.write_text('{"images": [')
  with pytest.raises(cap.DataError, match='not valid JSON'):
    cap.read_captions(path)
  with pytest.raises(cap.DataError, match='caption file not found'):
    cap.read_captions(tmp_path / 'nope.json')
