"""Caption decoding.

`greedy_decode` is batched and jit-compiled with fixed shapes: the token buffer always has
max_len + 1 slots and every step re-runs the decoder on it; the causal mask makes the logits at
position t depend only on tokens 0..t, so this equals the reference's growing-sequence loop
(`greedy_decode_reference`, kept as the per-pair baseline) token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=('graphdef', 'start_id', 'end_id', 'pad_id',
                                             'max_steps'))
def _greedy(graphdef, state, img_before, img_after, *, start_id, end_id, pad_id, max_steps):
  model = nnx.merge(graphdef, state)
  _, visual_tokens = model.encode_images(img_before, img_after)
  max_len = model.decoder.max_len
  batch = img_before.shape[0]
  tokens = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(start_id)

  def step(t, carry):
    tokens, done = carry
    logits = model.decoder(tokens[:, :max_len], visual_tokens).logits
    next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False), -1)
    next_token = jnp.where(done, pad_id, next_token).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token, t + 1, 1)
    return tokens, done | (next_token == end_id)

  tokens, done = jax.lax.fori_loop(0, max_steps, step, (tokens, jnp.zeros(batch, bool)))
  return tokens, done


def greedy_decode(model: nnx.Module, img_before: jax.Array, img_after: jax.Array, *,
                  start_id: int = 1, end_id: int = 3, pad_id: int = 0,
                  max_steps: int | None = None):
  """Greedy captions for a batch of pairs (model in eval mode).

  Returns (tokens (B, max_len + 1) int32: START, generated tokens up to and including END,
  then pad_id; finished (B,) bool: whether END was produced within max_steps).
  """
  max_steps = model.decoder.max_len if max_steps is None else max_steps
  if not 0 < max_steps <= model.decoder.max_len:
    raise ValueError(f'max_steps={max_steps} must be in 1..max_len={model.decoder.max_len}')
  graphdef, state = nnx.split(model)
  return _greedy(graphdef, state, img_before, img_after, start_id=start_id, end_id=end_id,
                 pad_id=pad_id, max_steps=max_steps)


def greedy_decode_reference(model: nnx.Module, img_before, img_after, *, start_id: int = 1,
                            end_id: int = 3, max_steps: int | None = None) -> list[list[int]]:
  """The reference loop, one pair at a time: start from [START], run the full decoder on the
  sequence so far, append the argmax, stop at END or after max_steps. Slow; for checks and as
  the speed baseline."""
  max_steps = model.decoder.max_len if max_steps is None else max_steps
  encode = nnx.jit(lambda m, a, b: m.encode_images(a, b)[1])
  step = nnx.jit(lambda m, seq, vis: m.decoder(seq, vis).logits[0, -1])  # one compile per length
  results = []
  for i in range(img_before.shape[0]):
    visual_tokens = encode(model, img_before[i:i + 1], img_after[i:i + 1])
    seq = [start_id]
    for _ in range(max_steps):
      logits = step(model, jnp.asarray([seq], jnp.int32), visual_tokens)
      seq.append(int(np.argmax(np.asarray(logits))))
      if seq[-1] == end_id:
        break
    results.append(seq)
  return results


def strip_tokens(tokens, *, start_id: int = 1, end_id: int = 3) -> list[list[int]]:
  """Rows of (START ..., END, PAD...) -> the word ids between START and END."""
  out = []
  for row in np.asarray(tokens).tolist():
    row = row[1:] if row and row[0] == start_id else row
    out.append(row[:row.index(end_id)] if end_id in row else row)
  return out
