"""Caption decoding.

`greedy_decode` is batched and jit-compiled with fixed shapes: the token buffer always has
max_len + 1 slots and every step re-runs the decoder on it; the causal mask makes the logits at
position t depend only on tokens 0..t, so this equals the reference's growing-sequence loop
(`greedy_decode_reference`, kept as the per-pair baseline) token for token.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from rsicrc_jax import xla_options
from rsicrc_jax.data import captions as cap


def _until_done(step, max_steps: int, carry, done_index: int):
  """`carry = step(t, carry)` for t = 0, 1, ... until max_steps, or until every caption has
  ended (carry[done_index] all True): the steps after that would only append PAD."""
  def cond(tc):
    t, c = tc
    return (t < max_steps) & ~jnp.all(c[done_index])

  _, carry = jax.lax.while_loop(cond, lambda tc: (tc[0] + 1, step(tc[0], tc[1])), (0, carry))
  return carry


@xla_options.inference_jit(static_argnames=('graphdef', 'start_id', 'end_id', 'pad_id',
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

  return _until_done(step, max_steps, (tokens, jnp.zeros(batch, bool)), done_index=1)


def greedy_decode(model: nnx.Module, img_before: jax.Array, img_after: jax.Array, *,
                  start_id: int = cap.START, end_id: int = cap.END, pad_id: int = cap.PAD,
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


def greedy_decode_reference(model: nnx.Module, img_before, img_after, *,
                            start_id: int = cap.START, end_id: int = cap.END,
                            max_steps: int | None = None) -> list[list[int]]:
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


def strip_tokens(tokens, *, start_id: int = cap.START, end_id: int = cap.END) -> list[list[int]]:
  """Rows of (START ..., END, PAD...) -> the word ids between START and END."""
  out = []
  for row in np.asarray(tokens).tolist():
    row = row[1:] if row and row[0] == start_id else row
    out.append(row[:row.index(end_id)] if end_id in row else row)
  return out


# ----------------------------------------------------------------------------------------------
# Key/value-cached decoding. One token per step: each self-attention layer appends the new
# token's keys/values to a fixed-size cache (max_len slots) and attends to the filled slots; the
# cross-attention keys/values of the visual tokens are computed once. Same math as the full
# pass, O(L) work per step instead of O(L^2).
#
# The cache is held as (B, H, Dh, max_len), slots last: the layout in which XLA:CPU's batched
# dots read both keys (q.k over Dh) and values (p.v over slots). Held as the layers' (B, L, H,
# Dh), XLA copied all four caches of the levir decoder into that layout at every step (4 x 10.7
# MB at batch 32); without the copies levir captioning takes 0.96x the time (README). Each step
# writes its new slot in place; the layers see a rearranged view, which XLA folds into the dots.

def _init_cache(model, visual_tokens, batch: int):
  dec = model.decoder
  d = dec.tokens_embed.features
  heads = dec.uni_layers[0].self_attn.num_heads if len(dec.uni_layers) else (
      dec.cross_layers[0].self_attn.num_heads)
  shape = (batch, heads, d // heads, dec.max_len)
  dtype = visual_tokens.dtype
  self_kv = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
             for _ in range(len(dec.uni_layers) + len(dec.cross_layers))]
  cross_kv = [layer.cross_attn.project_kv(visual_tokens) for layer in dec.cross_layers]
  return self_kv, cross_kv


def _write_slot(cache, new, t):
  """cache (B, H, Dh, max_len) with slot t set to new (B, 1, H, Dh)."""
  return jax.lax.dynamic_update_slice_in_dim(
      cache, rearrange(new, 'b l h d -> b h d l').astype(cache.dtype), t, 3)


def _cached_step(model, token, t, self_kv, cross_kv):
  """token (B,) at position t -> (logits (B, V), cross-attention (B, S), updated self_kv)."""
  dec = model.decoder
  x = dec.embed(token[:, None], offset=t)
  mask = (jnp.arange(dec.max_len) <= t)[None, None, None, :]
  new_kv = []
  layers = list(dec.uni_layers) + list(dec.cross_layers)
  weights = None
  for i, layer in enumerate(layers):
    k, v = (_write_slot(cache, new, t) for cache, new in zip(self_kv[i], layer.self_kv(x)))
    new_kv.append((k, v))
    cross = cross_kv[i - len(dec.uni_layers)] if layer.cross_attn is not None else None
    x, w = layer(x, tuple(rearrange(c, 'b h d l -> b l h d') for c in (k, v)), mask, cross)
    if w is not None:
      weights = w[:, 0]
  return dec.project(x)[:, 0], weights, new_kv


@xla_options.inference_jit(static_argnames=('graphdef', 'start_id', 'end_id', 'pad_id',
                                             'max_steps'))
def _greedy_cached(graphdef, state, img_before, img_after, *, start_id, end_id, pad_id,
                   max_steps):
  model = nnx.merge(graphdef, state)
  visual_emb, visual_tokens = model.encode_images(img_before, img_after)
  batch = img_before.shape[0]
  max_len = model.decoder.max_len
  self_kv, cross_kv = _init_cache(model, visual_tokens, batch)
  tokens = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(start_id)
  attn = jnp.zeros((batch, max_len, visual_tokens.shape[1]), jnp.float32)

  def step(t, carry):
    tokens, done, self_kv, attn = carry
    token = jax.lax.dynamic_index_in_dim(tokens, t, 1, keepdims=False)
    logits, w, self_kv = _cached_step(model, token, t, self_kv, cross_kv)
    next_token = jnp.where(done, pad_id, jnp.argmax(logits, -1)).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token, t + 1, 1)
    attn = jax.lax.dynamic_update_index_in_dim(attn, w.astype(jnp.float32), t, 1)
    return tokens, done | (next_token == end_id), self_kv, attn

  tokens, done, _, attn = _until_done(
      step, max_steps, (tokens, jnp.zeros(batch, bool), self_kv, attn), done_index=1)
  return tokens, done, attn, visual_emb


def greedy_decode_cached(model: nnx.Module, img_before: jax.Array, img_after: jax.Array, *,
                         start_id: int = cap.START, end_id: int = cap.END, pad_id: int = cap.PAD,
                         max_steps: int | None = None, with_embedding: bool = False):
  """Greedy captions with a key/value cache; same outputs as `greedy_decode`.

  Returns (tokens (B, max_len + 1), finished (B,), cross-attention (B, max_len, S): row t holds
  the last multimodal layer's head-averaged weights when predicting token t + 1; rows after the
  batch's last END are zeros, since decoding stops there), and with `with_embedding` the pairs'
  visual embeddings (B, C) from the same image encoding (no second pass for retrieval).
  """
  max_steps = model.decoder.max_len if max_steps is None else max_steps
  if not 0 < max_steps <= model.decoder.max_len:
    raise ValueError(f'max_steps={max_steps} must be in 1..max_len={model.decoder.max_len}')
  graphdef, state = nnx.split(model)
  out = _greedy_cached(graphdef, state, img_before, img_after, start_id=start_id,
                       end_id=end_id, pad_id=pad_id, max_steps=max_steps)
  return out if with_embedding else out[:3]


@xla_options.inference_jit(static_argnames=('graphdef', 'beam_size', 'start_id', 'end_id',
                                             'pad_id', 'max_steps', 'length_penalty'))
def _beam(graphdef, state, img_before, img_after, *, beam_size, start_id, end_id, pad_id,
          max_steps, length_penalty):
  model = nnx.merge(graphdef, state)
  visual_emb, visual_tokens = model.encode_images(img_before, img_after)
  batch, k = img_before.shape[0], beam_size
  max_len = model.decoder.max_len
  # Beams are flattened into the batch: row b * k + j is beam j of pair b.
  visual_tokens = jnp.repeat(visual_tokens, k, axis=0)
  self_kv, cross_kv = _init_cache(model, visual_tokens, batch * k)
  tokens = jnp.full((batch, k, max_len + 1), pad_id, jnp.int32).at[:, :, 0].set(start_id)
  # All beams start equal: only beam 0 may expand at the first step.
  scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)
  done = jnp.zeros((batch, k), bool)
  lengths = jnp.zeros((batch, k), jnp.int32)

  def step(t, carry):
    tokens, scores, done, lengths, self_kv = carry
    token = tokens[:, :, t].reshape(-1)
    logits, _, self_kv = _cached_step(model, token, t, self_kv, cross_kv)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(batch, k, -1)
    vocab = logp.shape[-1]
    # A finished beam continues only with PAD, at no cost, so it keeps its score.
    frozen = jnp.full((vocab,), -jnp.inf).at[pad_id].set(0.0)
    logp = jnp.where(done[..., None], frozen, logp)
    cand = (scores[..., None] + logp).reshape(batch, k * vocab)
    scores, idx = jax.lax.top_k(cand, k)
    parent, word = idx // vocab, (idx % vocab).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(x, parent, axis=1)
    tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, t + 1].set(word)
    was_done = gather(done)
    lengths = gather(lengths) + (~was_done).astype(jnp.int32)
    done = was_done | (word == end_id)
    flat_parent = (parent + jnp.arange(batch)[:, None] * k).reshape(-1)
    self_kv = [(kk[flat_parent], vv[flat_parent]) for kk, vv in self_kv]
    return tokens, scores, done, lengths, self_kv

  # Once every beam has ended, a step only appends PAD at no cost: stopping changes nothing.
  tokens, scores, done, lengths, _ = _until_done(
      step, max_steps, (tokens, scores, done, lengths, self_kv), done_index=2)
  normalized = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
  best = jnp.argmax(normalized, axis=1)
  pick = lambda x: jnp.take_along_axis(x, best[:, None, *([None] * (x.ndim - 2))], axis=1)[:, 0]
  return pick(tokens), pick(done), pick(normalized), visual_emb


def beam_search(model: nnx.Module, img_before: jax.Array, img_after: jax.Array, *,
                beam_size: int = 3, length_penalty: float = 0.0, start_id: int = cap.START,
                end_id: int = cap.END, pad_id: int = cap.PAD, max_steps: int | None = None,
                with_embedding: bool = False):
  """Batched beam search with a key/value cache (model in eval mode).

  Beams are ranked by summed log-probability; the final choice divides it by
  length ** length_penalty (0 = no normalisation; length counts generated tokens, END included).
  Returns (tokens (B, max_len + 1), finished (B,), score (B,)), and with `with_embedding` the
  pairs' visual embeddings (B, C). beam_size 1 is greedy.
  """
  max_steps = model.decoder.max_len if max_steps is None else max_steps
  if not 0 < max_steps <= model.decoder.max_len:
    raise ValueError(f'max_steps={max_steps} must be in 1..max_len={model.decoder.max_len}')
  if beam_size < 1:
    raise ValueError(f'beam_size={beam_size} must be >= 1')
  graphdef, state = nnx.split(model)
  out = _beam(graphdef, state, img_before, img_after, beam_size=beam_size, start_id=start_id,
              end_id=end_id, pad_id=pad_id, max_steps=max_steps,
              length_penalty=float(length_penalty))
  return out if with_embedding else out[:3]
