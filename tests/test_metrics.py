"""Captioning metrics against pycocoevalcap run directly; retrieval against a plain loop."""

import numpy as np
import pytest

from rsicrc_jax import metrics

HYPS = ['some houses are built at the top', 'there is no difference', 'a road appears',
        'the trees on the left are removed']
REFS = [[' several houses are built at the top .', ' houses appear at the top .',
         ' some villas are constructed in the upper part .', ' the bareland is replaced by houses .',
         ' some houses are built at the top of the scene .'],
        [' there is no difference .', ' the two scenes seem identical .',
         ' the scene is the same as before .', ' no change has occurred .',
         ' almost nothing has changed .'],
        [' a road is built .', ' a new road appears in the middle .', ' a road appears .',
         ' a road has been constructed .', ' a straight road is built .'],
        [' some trees on the right are removed .', ' the vegetation is cleared .',
         ' trees disappear .', ' the trees on the left are cut down .',
         ' the woods are replaced by bareland .']]


def test_caption_metrics_equal_pycocoevalcap_directly():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  got, notes = metrics.caption_metrics(HYPS, REFS, meteor=False)
  gts = {i: r for i, r in enumerate(REFS)}
  res = {i: [h] for i, h in enumerate(HYPS)}
  bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
  assert [got[f'BLEU-{n}'] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
  assert got['ROUGE-L'] == pytest.approx(Rouge().compute_score(gts, res)[0])
  assert got['CIDEr-D'] == pytest.approx(Cider().compute_score(gts, res)[0])
  assert 'METEOR' not in got and notes == []
  # A perfect hypothesis set scores BLEU 1 (the references carry the ' .' token, as LEVIR-CC's).
  perfect, _ = metrics.caption_metrics([r[0] for r in REFS], REFS, meteor=False)
  assert perfect['BLEU-4'] == pytest.approx(1.0)


def test_meteor_runs_with_java_or_says_why_not(monkeypatch):
  if metrics.java_available():
    got, notes = metrics.caption_metrics(HYPS, REFS)
    assert 0 < got['METEOR'] < 1 and notes == []
  monkeypatch.setattr(metrics.shutil, 'which', lambda _: None)
  got, notes = metrics.caption_metrics(HYPS, REFS)
  assert 'METEOR' not in got and 'BLEU-4' in got
  assert 'METEOR skipped' in notes[0] and 'java' in notes[0]


def test_subsets_share_one_meteor_process_and_score_as_alone(monkeypatch):
  if not metrics.java_available():
    pytest.skip('METEOR runs Java and no `java` is on PATH')
  from pycocoevalcap.meteor import meteor as pycoco_meteor
  from rsicrc_jax import evaluators
  started = []

  class Counted(pycoco_meteor.Meteor):
    def __init__(self):
      super().__init__()
      started.append(self)

  monkeypatch.setattr(pycoco_meteor, 'Meteor', Counted)
  run = {'hypothesis': HYPS, 'references': REFS, 'flag': np.array([0, -1, 1, 2])}
  results, notes = evaluators.caption_scores(run)
  assert len(started) == 1 and notes == []
  assert started[0].meteor_p.poll() is not None  # stopped on return, not at collection
  for name, idx in (('all', [0, 1, 2, 3]), ('changed', [0, 2, 3])):
    alone, _ = metrics.caption_metrics([HYPS[i] for i in idx], [REFS[i] for i in idx])
    assert results[name]['pairs'] == len(idx)
    assert results[name]['captioning'] == alone
  assert len(started) == 3  # each call alone started its own
  # A scorer given by the caller is used and left running for its next call.
  with metrics.meteor_scorer() as scorer:
    again, _ = metrics.caption_metrics(HYPS, REFS, scorer=scorer)
    assert scorer.meteor_p.poll() is None
  assert again == results['all']['captioning'] and len(started) == 4
  assert scorer.meteor_p.poll() is not None
  with metrics.meteor_scorer(enabled=False) as none:
    assert none is None


def plain_retrieval(text, visual, relevant, ks):
  """The reference's loop: rank the index for each query, count hits."""
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  visual = visual / np.linalg.norm(visual, axis=1, keepdims=True)
  out = {f'{m}@{k}': [] for m in ('P', 'R', 'MRR') for k in ks}
  for i in range(len(text)):
    scores = [float(text[i] @ visual[x]) for x in range(len(visual))]
    ranking = sorted(range(len(visual)), key=lambda x: -scores[x])
    rel = {x for x in range(len(visual)) if relevant[i, x]}
    for k in ks:
      p, rr = 0, 0.0
      for rank, idx in enumerate(ranking[:k]):
        if idx in rel:
          if p == 0:
            rr = 1 / (rank + 1)
          p += 1
      out[f'P@{k}'].append(p / k)
      out[f'R@{k}'].append(p / len(rel))
      out[f'MRR@{k}'].append(rr)
  return {key: float(np.mean(v)) for key, v in out.items()}


def test_retrieval_metrics_match_a_plain_loop_on_random_data():
  rng = np.random.default_rng(0)
  for trial in range(5):
    n = int(rng.integers(12, 40))
    text, visual = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    flags = np.where(rng.random(n) < 0.5, -1, np.arange(n))
    same = rng.random((n, n)) < 0.05
    same = same | same.T
    rel = metrics.relevance(flags, same)
    got = metrics.retrieval_metrics(text, visual, rel)
    want = plain_retrieval(text, visual, rel, metrics.AT_K)
    assert got == pytest.approx(want, abs=1e-12)


def test_retrieval_by_hand():
  # Queries 0, 1, 2; pair 2 is no-change like pair 1 (flag -1).
  visual = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  text = np.array([[0.0, 1.0],   # ranks pairs 1 (1.0), 2 (0.8), 0 (0.0); relevant {0}
                   [0.0, 1.0],   # relevant {1, 2}: hits at ranks 1 and 2
                   [1.0, 0.0]])  # ranks 0 (1.0), 2 (0.6), 1 (0); relevant {1, 2}
  flags = np.array([5, -1, -1])
  got = metrics.retrieval_metrics(text, visual, metrics.relevance(flags, np.eye(3, dtype=bool)),
                                  ks=(1, 3))
  assert got['P@1'] == pytest.approx((0 + 1 + 0) / 3)
  assert got['R@3'] == pytest.approx((1 + 1 + 1) / 3)
  assert got['P@3'] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
  assert got['MRR@1'] == pytest.approx(1 / 3)
  assert got['MRR@3'] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)


def test_pair_to_text_recall_by_hand():
  visual = np.array([[1.0, 0.0], [0.0, 1.0]])
  captions = np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7]])
  relevant = np.array([[False, False, True], [False, True, False]])
  got = metrics.hit_rate(visual, captions, relevant, ks=(1, 2))
  assert got == {'R@1': 0.5, 'R@2': 1.0}  # pair 0: caption 2 is ranked second


def test_literature_hit_rates_differ_from_the_references_recall_by_hand():
  """The same queries as test_retrieval_by_hand: the hit rate counts query 1 (two relevant
  pairs, one in the top 1) as a hit, the reference's R@1 as half a hit."""
  visual = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  text = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
  rel = metrics.relevance(np.array([5, -1, -1]), np.eye(3, dtype=bool))
  hits = metrics.hit_rate(text, visual, rel, ks=(1, 2, 3))
  assert hits == pytest.approx({'R@1': 1 / 3, 'R@2': 2 / 3, 'R@3': 1.0})
  assert metrics.retrieval_metrics(text, visual, rel, ks=(1,))['R@1'] == pytest.approx(1 / 6)
  # Pair -> text over the same embeddings (relevant texts: pair 0 {0}, pairs 1 and 2 {1, 2}):
  # pair 0 ranks text 2 (1.0) before 0 and 1 (tied at 0: the stable order keeps 0 first);
  # pairs 1 and 2 rank texts 0 and 1 (tied) first: every top 1 misses, every top 2 hits.
  p2t = metrics.hit_rate(visual, text, rel.T, ks=(1, 2, 5))
  assert p2t == pytest.approx({'R@1': 0.0, 'R@2': 1.0, 'R@5': 1.0})
  t2p = {'R@1': 0.1, 'R@5': 0.2, 'R@10': 0.3}
  assert metrics.mean_recall(t2p, {'R@1': 0.4, 'R@5': 0.5, 'R@10': 0.6, 'R@3': 9.0}) == (
      pytest.approx(0.35))  # R@3 is not one of the six


def test_caption_protocols_differ_and_each_is_pycocoevalcap():
  """'reference' scores the raw text (the final ' .' is a token the decoder never writes),
  'chg2cap' strips punctuation and case first; each equals pycocoevalcap on those strings."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  hyps = ['a house is built on the bareland', 'there is no difference']
  refs = [['a house is built on the bareland .', 'A house is built on the bare land .',
           'one building appears , replacing the trees .'],
          ['there is no difference .', 'the two scenes seem identical .', 'nothing has changed .']]
  stripped = [['a house is built on the bareland', 'a house is built on the bare land',
               'one building appears replacing the trees'],
              ['there is no difference', 'the two scenes seem identical', 'nothing has changed']]
  got = {p: metrics.caption_metrics(hyps, refs, meteor=False, protocol=p)[0]
         for p in metrics.CAPTION_PROTOCOLS}
  for protocol, gts in (('reference', refs), ('chg2cap', stripped)):
    gts_d = {i: r for i, r in enumerate(gts)}
    res_d = {i: [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts_d, res_d, verbose=0)
    assert got[protocol]['BLEU-4'] == pytest.approx(bleu[3], abs=1e-12)
    assert got[protocol]['CIDEr-D'] == pytest.approx(Cider().compute_score(gts_d, res_d)[0],
                                                     abs=1e-12)
  # Exact matches once the ' .' is gone: chg2cap's BLEU-4 is 1, the reference's below it.
  assert got['chg2cap']['BLEU-4'] == pytest.approx(1.0, abs=1e-6)
  assert got['reference']['BLEU-4'] < 0.95  # 0.913: the brevity penalty of the missing ' .'
  assert metrics.normalise_caption('Houses, roads and trees.', 'chg2cap') == (
      'houses roads and trees')
  with pytest.raises(ValueError, match=r"caption protocol 'coco': expected one of"):
    metrics.normalise_caption('x', 'coco')
