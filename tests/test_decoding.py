"""Cached greedy decoding and beam search against the uncached decoder and the reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import reference_tiny
from rsicrc_jax import decoding, weights
from rsicrc_jax.models.rsicrc import RSICRC, model_skeleton
from conftest import nhwc


@pytest.fixture(scope='module')
def model_and_images(reference):
  state = {k[len('state/'):]: v for k, v in reference.items() if k.startswith('state/')}
  model = model_skeleton(reference_tiny.get_config().model)
  weights.import_rsicrc(model, state)
  model.eval()
  return model, nhwc(reference['input/img_before']), nhwc(reference['input/img_after'])


def _until_end(tokens):
  return [row[:row.index(3) + 1] if 3 in row else row for row in np.asarray(tokens).tolist()]


def test_cached_greedy_equals_uncached_and_the_reference(model_and_images, reference):
  model, a, b = model_and_images
  expected = [[t for t in row if t != -1] for row in reference['eval/greedy_tokens'].tolist()]
  cached, finished, attn = decoding.greedy_decode_cached(model, a, b)
  uncached, finished_u = decoding.greedy_decode(model, a, b)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  np.testing.assert_array_equal(np.asarray(finished), np.asarray(finished_u))
  assert _until_end(cached) == expected
  # The cached step's cross-attention equals the full pass's at every generated position.
  full = model(a, b, cached[:, :-1], jnp.zeros(cached[:, :-1].shape, bool)).cross_attention
  steps = [len(row) - 1 for row in _until_end(cached)]
  for i, n in enumerate(steps):
    np.testing.assert_allclose(np.asarray(attn[i, :n]), np.asarray(full[i, :n]), rtol=1e-4,
                               atol=1e-6)


def test_cached_greedy_on_random_weights_many_lengths():
  cfg = reference_tiny.get_config().model
  model = RSICRC(cfg, rngs=nnx.Rngs(3))
  model.eval()
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(6, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(6, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  for steps in (1, 4, cfg.max_len):
    c, fc, _ = decoding.greedy_decode_cached(model, a, b, max_steps=steps)
    u, fu = decoding.greedy_decode(model, a, b, max_steps=steps)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(u))


def test_beam_size_one_is_greedy_and_wider_beams_score_at_least_as_well(model_and_images):
  model, a, b = model_and_images
  greedy, _, _ = decoding.greedy_decode_cached(model, a, b)
  beam1, _, _ = decoding.beam_search(model, a, b, beam_size=1)
  np.testing.assert_array_equal(np.asarray(beam1), np.asarray(greedy))

  def logprob(tokens):
    """Summed log-probability of each sequence under the model (full, uncached pass)."""
    t = jnp.asarray(tokens)
    logits = model(a, b, t[:, :-1], jnp.zeros(t[:, :-1].shape, bool)).logits
    logp = np.asarray(jax_log_softmax(logits))
    out = []
    for i, row in enumerate(np.asarray(t).tolist()):
      n = row.index(3) if 3 in row else len(row) - 1
      out.append(sum(logp[i, j, row[j + 1]] for j in range(n)))
    return np.asarray(out)

  beam3, _, score3 = decoding.beam_search(model, a, b, beam_size=3)
  np.testing.assert_allclose(logprob(beam3), np.asarray(score3), rtol=1e-4, atol=1e-4)
  assert (logprob(beam3) >= logprob(greedy) - 1e-4).all()


def jax_log_softmax(x):
  return jax.nn.log_softmax(x.astype(jnp.float32), -1)


def test_strip_tokens():
  assert decoding.strip_tokens([[1, 5, 6, 3, 0], [1, 7, 7, 7, 7]]) == [[5, 6], [7, 7, 7, 7]]


def test_decoding_also_gives_the_pair_embedding_of_its_one_image_encoding(model_and_images,
                                                                          reference):
  """Captioning and embedding a pair share one backbone + encoder pass (eval and predict use
  this): the embedding that decoding returns is the model's visual embedding, and the tokens are
  those decoding returns without it."""
  model, a, b = model_and_images
  want = np.asarray(model.encode_images(a, b)[0])
  np.testing.assert_allclose(want, reference['eval/vis_emb'], rtol=1e-4, atol=1e-5)
  tokens, _, _ = decoding.greedy_decode_cached(model, a, b)
  tokens_e, _, _, emb = decoding.greedy_decode_cached(model, a, b, with_embedding=True)
  np.testing.assert_array_equal(np.asarray(tokens_e), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(emb), want, rtol=1e-4, atol=1e-5)  # jit vs eager
  beam, _, _, emb = decoding.beam_search(model, a, b, beam_size=2, with_embedding=True)
  np.testing.assert_array_equal(np.asarray(beam),
                                np.asarray(decoding.beam_search(model, a, b, beam_size=2)[0]))
  np.testing.assert_allclose(np.asarray(emb), want, rtol=1e-4, atol=1e-5)  # jit vs eager


def test_inference_programs_compile_with_the_cpu_option_and_agree_with_plain_jit(
    model_and_images):
  """On the CPU, decoding compiles with xla_options.INFERENCE_CPU (YNNPACK given one matmul at a
  time: faster in eval mode); XLA's default fusion gives the same captions."""
  from rsicrc_jax import xla_options
  model, a, b = model_and_images
  assert jax.default_backend() == 'cpu'
  tuned = decoding.greedy_decode_cached(model, a, b, with_embedding=True)
  graphdef, state = nnx.split(model)
  kw = dict(start_id=1, end_id=3, pad_id=0, max_steps=model.decoder.max_len)
  plain = decoding._greedy_cached._plain(graphdef, state, a, b, **kw)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(tuned[0]), np.asarray(plain[0]))
  np.testing.assert_allclose(np.asarray(tuned[3]), np.asarray(plain[3]), rtol=1e-4, atol=1e-5)
  # What the option does: every fused computation holds one matmul or convolution at most,
  # where XLA's default fuses several of them (and the layers between) into one.
  def most_per_fusion(jitted):
    text = jitted.lower(graphdef, state, a, b, **kw).compile().as_text()
    return max(len(re.findall(r' (?:dot|convolution)\(', comp))
               for comp in re.split(r'\n(?=\S)', text) if comp.startswith('%fused'))
  assert most_per_fusion(decoding._greedy_cached._tuned) == 1  # pylint: disable=protected-access
  assert most_per_fusion(decoding._greedy_cached._plain) > 1  # pylint: disable=protected-access
  assert decoding._greedy_cached._tuned_ok  # pylint: disable=protected-access
  assert xla_options.INFERENCE_CPU == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def test_inference_jit_falls_back_when_xla_refuses_the_option(monkeypatch, caplog):
  from rsicrc_jax import xla_options
  monkeypatch.setattr(xla_options, 'INFERENCE_CPU',
                      {xla_options.OPTION: 'LIBRARY_FUSION_TYPE_NO_SUCH_TYPE'})
  double = xla_options.inference_jit(lambda x: 2 * x)
  np.testing.assert_array_equal(double(jnp.arange(3.0)), [0.0, 2.0, 4.0])
  assert not double._tuned_ok  # pylint: disable=protected-access
  assert 'compiles without it' in caplog.text
  np.testing.assert_array_equal(double(jnp.arange(2.0)), [0.0, 2.0])  # plain from now on


def _cache_copies(jitted, model, a, b) -> list[str]:
  """Instructions of the decoding loop that copy or transpose a whole self-attention cache
  (B x H x Dh x max_len elements) in the compiled CPU program."""
  graphdef, state = nnx.split(model)
  text = jitted.lower(graphdef, state, a, b, start_id=1, end_id=3, pad_id=0,
                      max_steps=model.decoder.max_len).compile().as_text()
  dec = model.decoder
  cache = a.shape[0] * dec.tokens_embed.features * dec.max_len
  found = []
  for line in text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]\S* (\w+)\(', line)
    if not m or 'while/body' not in line:
      continue
    name, dims, op = m.groups()
    size = int(np.prod([int(d) for d in dims.split(',') if d]))
    if size == cache and (op in ('copy', 'transpose') or
                          (op == 'fusion' and re.match(r'(transpose|copy)', name))):
      found.append(line.strip()[:160])
  return found


def test_decoding_steps_read_the_cache_in_place(model_and_images):
  """The cache is held in the layout of the attention dots ((B, H, Dh, slots)), so no step copies
  it: held as the layers' (B, slots, H, Dh), XLA:CPU transposed every layer's keys and values at
  every step (levir: 4 x 10.7 MB a step at batch 32, 4% of captioning's time)."""
  model, a, b = model_and_images
  assert _cache_copies(decoding._greedy_cached, model, a, b) == []  # pylint: disable=protected-access
