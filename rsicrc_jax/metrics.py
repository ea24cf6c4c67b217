"""The paper's metrics (SPEC section 8): captioning with pycocoevalcap, retrieval vectorised.

Pure functions of arrays and strings; no I/O besides pycocoevalcap's own METEOR subprocess.
"""

from __future__ import annotations

import contextlib
import shutil
import string
from typing import Any, Iterator, Sequence

import numpy as np

from rsicrc_jax import index

AT_K = (1, 3, 5, 10)
LITERATURE_K = (1, 5, 10)  # the RS cross-modal retrieval papers' R@k (SPEC section 13)

# How captions are scored (SPEC section 12): 'reference' as the RSICRC code does (raw text, the
# final " ." counts as a token); 'chg2cap' as most published LEVIR-CC tables (lowercased,
# punctuation stripped from hypotheses and references alike).
CAPTION_PROTOCOLS = ('reference', 'chg2cap')
_PUNCTUATION = str.maketrans({c: ' ' for c in string.punctuation})


def normalise_caption(text: str, protocol: str = 'reference') -> str:
  """A caption as `protocol` scores it."""
  if protocol == 'reference':
    return text
  if protocol == 'chg2cap':
    return ' '.join(text.lower().translate(_PUNCTUATION).split())
  raise ValueError(f'caption protocol {protocol!r}: expected one of {list(CAPTION_PROTOCOLS)}')


def java_available() -> bool:
  return shutil.which('java') is not None


@contextlib.contextmanager
def meteor_scorer(enabled: bool = True) -> Iterator[Any]:
  """pycocoevalcap's METEOR scorer, started on entry and stopped on exit, for `caption_metrics`
  calls to share: its Java process takes about 5 s to start and load its tables, then about 1 ms
  a caption, and it loads in the background, so entering this before other work (running the
  model) hides that start. Yields None when not `enabled` or when no `java` is on PATH."""
  if not (enabled and java_available()):
    yield None
    return
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel
  scorer = Meteor()
  try:
    yield scorer
  finally:
    # pycocoevalcap's Meteor stops its process in __del__ (it has no close(), and calling it
    # twice is harmless): stop it now, not whenever the caller drops its last reference.
    (getattr(scorer, 'close', None) or scorer.__del__)()


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                    meteor: bool = True, protocol: str = 'reference',
                    scorer: Any = None) -> tuple[dict[str, float], list[str]]:
  """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (coco-caption definitions) of one hypothesis per
  item against its references, strings split on whitespace after `normalise_caption(protocol)`
  ('reference': as the RSICRC code, no change). METEOR uses `scorer` (from `meteor_scorer`)
  when given, else starts its own. Returns (scores, notes); a note says why METEOR is missing,
  if it is."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(f'need one hypothesis per item: {len(hypotheses)} hypotheses, '
                     f'{len(references)} reference sets')
  res = {i: [normalise_caption(h, protocol)] for i, h in enumerate(hypotheses)}
  gts = {i: [normalise_caption(t, protocol) for t in r] for i, r in enumerate(references)}
  scores, notes = {}, []
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  scores.update({f'BLEU-{n + 1}': float(b) for n, b in enumerate(bleu)})
  if meteor and scorer is not None:
    scores['METEOR'] = float(scorer.compute_score(gts, res)[0])
  elif meteor and java_available():
    with meteor_scorer() as own:
      scores['METEOR'] = float(own.compute_score(gts, res)[0])
  elif meteor:
    notes.append('METEOR skipped: it runs a Java program and no `java` is on PATH (install a '
                 'JRE, e.g. `apt-get install default-jre-headless`)')
  scores['ROUGE-L'] = float(Rouge().compute_score(gts, res)[0])
  scores['CIDEr-D'] = float(Cider().compute_score(gts, res)[0])
  return scores, notes


def retrieval_metrics(text_emb: np.ndarray, visual_emb: np.ndarray, relevant: np.ndarray,
                      ks: Sequence[int] = AT_K) -> dict[str, float]:
  """Text-to-pair retrieval as the reference ranks it: query i is pair i's caption embedding,
  the index is every pair's visual embedding (L2-normalised, inner product).

  relevant: (N, N) bool, relevant[i, x] = pair x answers query i (same flag, or the captions
  count as the same sentence). P@k = hits in the top k / k, R@k = hits / |relevant|,
  MRR@k = 1 / rank of the first hit within the top k (0 if none); means over queries.
  """
  order = index.rank(text_emb, visual_emb)
  hits = np.take_along_axis(relevant, order, axis=1)  # (N, N) in rank order
  num_rel = relevant.sum(axis=1)
  out = {}
  for k in ks:
    top = hits[:, :k]
    first = np.where(top.any(axis=1), top.argmax(axis=1), -1)
    out[f'P@{k}'] = float(np.mean(top.sum(axis=1) / k))
    out[f'R@{k}'] = float(np.mean(top.sum(axis=1) / np.maximum(num_rel, 1)))
    rr = np.divide(1.0, first + 1, out=np.zeros(len(first)), where=first >= 0)
    out[f'MRR@{k}'] = float(np.mean(rr))
  return out


def relevance(flags: np.ndarray, same_caption: np.ndarray) -> np.ndarray:
  """The reference's relevant set: same flag (every no-change pair for a no-change query, the
  pair itself otherwise) or captions that count as the same sentence."""
  return (flags[:, None] == flags[None, :]) | same_caption


def hit_rate(query_emb: np.ndarray, index_emb: np.ndarray, relevant: np.ndarray,
             ks: Sequence[int] = AT_K) -> dict[str, float]:
  """R@k as the remote-sensing retrieval literature reports it (SPEC section 13): the share of
  queries with at least one relevant item in the top k (cosine ranking). relevant: (Q, M) bool.
  Pair -> caption (the reference lacks it) and caption -> pair are both this."""
  hits = np.take_along_axis(relevant, index.rank(query_emb, index_emb), axis=1)
  return {f'R@{k}': float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def mean_recall(text_to_pair: dict[str, float], pair_to_text: dict[str, float]) -> float:
  """mR: the mean of the hit rates R@1, R@5, R@10 in both directions (six numbers)."""
  return float(np.mean([d[f'R@{k}'] for d in (text_to_pair, pair_to_text)
                        for k in LITERATURE_K]))

