"""RSICRC losses as pure functions (SPEC sections 5 and 6).

All functions take whole-batch arrays. In a sharded train step pass the GLOBAL batch (under
`jit` with named shardings the arrays already are global): the contrastive loss then sees every
negative of every device, as the reference's single-device batch does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def caption_loss(logits: jax.Array, tokens: jax.Array, pad_mask: jax.Array) -> jax.Array:
  """Cross-entropy of logits[t] predicting tokens[t+1], PAD targets ignored, mean over the
  non-PAD targets. logits (B, L, V); tokens (B, L) int; pad_mask (B, L) bool, True at PAD."""
  targets, valid = tokens[:, 1:], ~pad_mask[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), targets)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def false_negative_mask(sentence_embs: jax.Array | None = None,
                        caption_ids: jax.Array | None = None, *, threshold: float = 1.0,
                        tolerance: float = 0.0) -> jax.Array:
  """(N, N) bool: item pairs whose captions count as "the same sentence".

  sentence_embs: (N, E) L2-normalised sentence embeddings; a pair qualifies when their inner
    product is >= threshold - tolerance (the reference compares with `>= threshold` exactly, so
    at threshold 1.0 float rounding decides; a small tolerance makes it robust).
  caption_ids: (N,) int, equal for identical normalised caption text; such pairs always
    qualify (cosine similarity 1 by definition).
  """
  if sentence_embs is None and caption_ids is None:
    raise ValueError('false_negative_mask needs sentence_embs, caption_ids or both')
  mask = None
  if sentence_embs is not None:
    e = sentence_embs.astype(jnp.float32)
    mask = e @ e.T >= threshold - tolerance
  if caption_ids is not None:
    same = caption_ids[:, None] == caption_ids[None, :]
    mask = same if mask is None else mask | same
  return mask


_NO_NEGATIVE = -1e30


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_loss(visual_emb: jax.Array, text_emb: jax.Array, flags: jax.Array,
                     false_negatives: jax.Array | None = None, *, temperature: float = 0.01,
                     fne: bool = True, fna: bool = True, top_k: int = -1,
                     valid: jax.Array | None = None):
  """Image-to-text InfoNCE with False Negative Elimination / Attraction.

  visual_emb, text_emb: (N, C); flags: (N,) int, -1 for no-change pairs else the pair id;
  false_negatives: (N, N) bool from `false_negative_mask` (None: no false negatives).

  positives(a) = {p : flag[a] == flag[p]} (+ false negatives with `fna`), the diagonal always;
  negatives(a) = the rest (- false negatives with `fne`), never the diagonal. With top_k > 0
  only the k most similar negative pairs of the whole batch stay negatives (as the reference).
  Loss = mean over positive pairs (a, p) of
  -log(exp(l_ap) / (exp(l_ap) + sum_n exp(l_an))), l = cos / temperature.
  valid: optional (N,) bool; items with False (batch padding) are neither anchors, positives
  nor negatives of anyone.
  Returns (loss, number of positive pairs).
  """
  n = visual_emb.shape[0]
  logits = _l2_normalize(visual_emb) @ _l2_normalize(text_emb).T / temperature
  eye = jnp.eye(n, dtype=bool)
  positive = flags[:, None] == flags[None, :]
  negative = ~positive
  if false_negatives is not None:
    if fne:
      negative = negative & ~false_negatives
    if fna:
      positive = positive | false_negatives
  positive, negative = positive | eye, negative & ~eye
  if valid is not None:
    both = valid[:, None] & valid[None, :]
    positive, negative = positive & both, negative & both

  if top_k > 0:
    masked = jnp.where(negative, logits, -jnp.inf).reshape(-1)
    k = min(top_k, n * n)
    values, index = jax.lax.top_k(masked, k)
    keep = jnp.zeros(n * n, bool).at[index].set(values > -jnp.inf)
    negative = keep.reshape(n, n)

  # -log(e^l_ap / (e^l_ap + sum_n e^l_an)) = logaddexp(l_ap, lse_n) - l_ap. A finite stand-in
  # for -inf keeps rows without negatives at exactly 0 loss with finite gradients.
  neg_lse = jax.nn.logsumexp(jnp.where(negative, logits, _NO_NEGATIVE), axis=1, keepdims=True)
  per_pair = jnp.logaddexp(logits, neg_lse) - logits
  num_pos = jnp.sum(positive)
  return jnp.sum(per_pair * positive) / jnp.maximum(num_pos, 1), num_pos


def total_loss(cap_loss: jax.Array, con_loss: jax.Array, lamb: float) -> jax.Array:
  """caption + lambda * contrastive (SPEC section 6)."""
  return cap_loss + lamb * con_loss
