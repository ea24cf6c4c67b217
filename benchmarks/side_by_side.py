"""This port next to the reference PyTorch code, on this machine, in one run: the levir train step
and captioning at levir size, same batch, same shapes, same weights for captioning.

  pip install -e ".[torch]" open_clip_torch pytorch_metric_learning  # the reference's own deps
  git clone https://github.com/rogerferrod/RSICRC /path/to/RSICRC
  python benchmarks/side_by_side.py --reference /path/to/RSICRC [--batch 4] [--steps 2] \
      [--rounds 3] [--pairs 4] [--ours_pairs 32] [--out side_by_side.json]

Train step: the reference's ICCModel (RN50 tower from open_clip, random weights) with its
InfoNCELoss (FNA on), `loss = cap + lamb * con`, backward and AdamW over the trainable
parameters, as its train.py does; ours is the step launch.py runs (`measure.train_step`). Both
are timed after one warm-up step, on one batch with captions of LEVIR-CC's lengths
(`measure.random_train_batch`): the reference pads them to max_len (41 slots) as its dataset
does; ours cuts them to the batch's longest, rounded up (config.data.caption_pad_multiple), and
is also timed at 41 slots, as a third column of each round. GFLOP/s for both use XLA's FLOP
count of the step at 41 slots, and each framework's float32 matmul peak is measured in the same
run.

Rounds: the same program's speed drifts by 10-20% over minutes on a shared machine, so both sides
are timed in alternating rounds (reference, ours, reference, ...) and each round gives a ratio;
the table shows the medians and the ratios' range.

Captioning, seconds per pair: the reference's loop (one pair at a time, the full decoder re-run
on the growing sequence, argmax, stop at END or max_len) and ours as eval runs it (a batch of
pairs, jit, KV cache) on the same weights: the reference model's state_dict imported with
`weights.import_rsicrc`, so both write the same tokens on the pairs both caption (checked).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402  (benchmarks/measure.py)

from rsicrc_jax import cli, decoding, weights  # noqa: E402
from rsicrc_jax.data import captions as cap  # noqa: E402
from rsicrc_jax.data import pipeline  # noqa: E402
from rsicrc_jax.models import model_skeleton  # noqa: E402

_REFERENCE = flags.DEFINE_string('reference', None, 'A checkout of rogerferrod/RSICRC (its src/ '
                                 'is imported).')
_CONFIG = config_flags.DEFINE_config_file('config', 'configs/levir.py', 'The levir config (the '
                                          'reference builds exactly this architecture).')
_BATCH = flags.DEFINE_integer('batch', 4, 'Train batch (the paper: 4).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed train steps per round, after one warm-up step.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds (reference, then ours) for the '
                               'train step and for captioning; each gives a ratio.')
_PAIRS = flags.DEFINE_integer('pairs', 4, 'Pairs captioned by the reference loop per round (its '
                              'time per pair does not depend on how many).')
_OURS_PAIRS = flags.DEFINE_integer('ours_pairs', 32, 'Pairs captioned by ours in one batch (eval\'s '
                                   'default batch, config.eval.batch_size); the first --pairs of '
                                   'them are the reference\'s, whose tokens must match.')
_STOP_AT_END = flags.DEFINE_bool(
    'stop_at_end', False, 'Stop each caption at END. Off (the default), END is never matched, so '
    'every caption runs max_len steps in both loops, as the issue measured: with random weights '
    'where END falls depends on the initialisation (8 pairs took 9 steps each with torch 2.13, '
    '41 with 2.14), and the reference loop\'s cost grows with the square of the length.')
_MATMUL = flags.DEFINE_integer('matmul_n', 2048, 'n of the n x n x n float32 matmul peak.')
_OUT = flags.DEFINE_string('out', '', 'Also write the results here as JSON.')


def _import_reference(path: str):
  src = os.path.join(path, 'src')
  if not os.path.isfile(os.path.join(src, 'model.py')):
    raise app.UsageError(f'--reference {path}: no src/model.py; expected a checkout of '
                         'https://github.com/rogerferrod/RSICRC')
  sys.path.insert(0, src)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import open_clip  # pylint: disable=import-outside-toplevel
    from Loss import InfoNCELoss  # pylint: disable=import-outside-toplevel
    from model import ICCModel  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise app.UsageError(f'the reference needs {err.name}: pip install torch open_clip_torch '
                         'pytorch_metric_learning') from err
  return torch, open_clip, InfoNCELoss, ICCModel


def _torch_matmul_peak(torch, n: int, repeats: int = 10) -> float:
  a = torch.randn(n, n)
  b = torch.randn(n, n) / n ** 0.5
  best = float('inf')
  for _ in range(3):
    t = time.perf_counter()
    x = a
    for _ in range(repeats):
      x = x @ b
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 * repeats / best / 1e12


def _reference_model(torch, open_clip, ICCModel, m):  # pylint: disable=invalid-name
  if m.get('backbone', 'RN50') != 'RN50' or m.d_model != 2048 or m.image_size != 224:
    raise app.UsageError('the reference hard-codes the RN50 feature map at 224 px: use '
                         'configs/levir.py')
  torch.manual_seed(0)
  clip = open_clip.create_model('RN50')  # random weights: the speed does not depend on them
  return ICCModel(torch.device('cpu'), clip, 'RN50', m.d_model, m.vocab_size, m.max_len,
                  m.num_heads, m.h_dim, m.a_dim, m.encoder_layers, m.decoder_layers, m.dropout,
                  learnable=m.learnable, fine_tune=m.fine_tune,
                  tie_embeddings=m.tie_embeddings, prenorm=m.prenorm)


def _torch_batch(torch, config, batch: int):
  host = measure.random_train_batch(config, batch)
  # Normalised as our pipeline does it (CLIP statistics), then NCHW for the reference.
  images = [torch.from_numpy(np.asarray(pipeline.normalize_images(jnp.asarray(host[k])))
                             .transpose(0, 3, 1, 2).copy()) for k in ('image_a', 'image_b')]
  # The same captions, padded to max_len as the reference's dataset pads every caption.
  cut = host['tokens']
  tokens = np.pad(cut, ((0, 0), (0, config.model.max_len - cut.shape[1])),
                  constant_values=cap.PAD)
  tokens = torch.from_numpy(tokens.astype(np.int64))
  flags_ = torch.from_numpy(host['flag'].astype(np.int64))
  embs = torch.nn.functional.normalize(torch.randn(batch, 768), dim=1)
  return images, tokens, tokens == cap.PAD, flags_, embs


def reference_step_timer(torch, InfoNCELoss, model, config, batch: int):  # pylint: disable=invalid-name
  """The reference's training step, run once (warm-up): returns time(steps) -> seconds per
  step over that many more steps."""
  (img_a, img_b), tokens, pad_mask, flags_, embs = _torch_batch(torch, config, batch)
  infonce = InfoNCELoss(torch.device('cpu'), k=config.loss.top_k,
                        temperature=config.loss.temperature,
                        threshold=config.loss.s_threshold, fna=config.loss.fna)
  optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=config.learning_rate, eps=config.adam_eps)
  model.train()

  def step():
    cap_loss, vis_emb, text_emb, _, _, _ = model(img_a, img_b, tokens, tokens, pad_mask)
    con_loss, _ = infonce(vis_emb, text_emb, flags_, embs)
    loss = cap_loss + config.loss.lamb * con_loss
    loss.backward()
    optim.step()
    optim.zero_grad()
    return float(loss.detach())

  def timed(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      step()
    return (time.perf_counter() - t) / steps

  step()
  return timed


def reference_captions(torch, model, img_a, img_b, max_len: int, end_id: int = cap.END):
  """The reference's inference loop: per pair, encode once, re-run the whole decoder on the
  sequence so far, append the argmax, stop at end_id or after max_len steps."""
  model.eval()
  out = []
  with torch.no_grad():
    for i in range(img_a.shape[0]):
      _, vis_toks = model.encoder(img_a[i:i + 1], img_b[i:i + 1])
      ids = torch.tensor([[cap.START]])
      for _ in range(max_len):
        _, _, logits, _ = model.decoder(ids, None, None, vis_toks)
        nxt = logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.reshape(1, 1)], dim=1)
        if int(nxt) == end_id:
          break
      out.append(ids[0].tolist())
  return out


def main(argv):
  del argv
  if not _REFERENCE.value:
    raise app.UsageError('--reference is required: a checkout of rogerferrod/RSICRC')
  for flag in (_STEPS, _ROUNDS, _PAIRS):
    if flag.value < 1:
      raise app.UsageError(f'--{flag.name}={flag.value}: expected at least 1')
  torch, open_clip, InfoNCELoss, ICCModel = _import_reference(_REFERENCE.value)  # pylint: disable=invalid-name
  config = _CONFIG.value
  m = config.model
  res = {'machine': f'{os.cpu_count()} CPU cores', 'torch': torch.__version__,
         'jax': jax.__version__, 'torch_threads': torch.get_num_threads(),
         'batch': _BATCH.value}
  res['matmul_tflops'] = {'torch': _torch_matmul_peak(torch, _MATMUL.value),
                          'jax': measure.matmul_peak(_MATMUL.value)}
  model = _reference_model(torch, open_clip, ICCModel, m)

  ref_step = reference_step_timer(torch, InfoNCELoss, model, config, _BATCH.value)
  ours_step = measure.StepTimer(config, _BATCH.value)
  steps = _STEPS.value
  tokens = np.asarray(ours_step.device_batch['tokens'])
  slots, longest = tokens.shape[1], int((tokens != cap.PAD).sum(axis=1).max())
  others = {}
  if slots < m.max_len:  # also ours on the reference's max_len captions: what the cut buys
    full = config.copy_and_resolve_references()
    full.data.caption_pad_multiple = 0
    full_step = measure.StepTimer(full, _BATCH.value)
    others['max_len'] = lambda: full_step.time(steps)
  res['train_step'] = measure.alternating_rounds(
      lambda: ref_step(steps), lambda: ours_step.time(steps), _ROUNDS.value, others)
  ours = ours_step.result(res['train_step']['ours_s'])
  # GFLOP/s for both sides from the count of the reference's shapes (captions at max_len): the
  # work the reference does; ours skips the cut PAD slots' share of it.
  gflop = full_step.flops / 1e9 if others else ours['gflop_per_step']
  res['train_step'].update(
      caption_slots=slots, longest_caption_slots=longest, max_len=m.max_len,
      gflop_per_step_xla=gflop,
      gflop_per_step_ours=ours['gflop_per_step'],
      reference_gflops=gflop / res['train_step']['reference_s'] if gflop else None,
      ours_gflops=gflop / res['train_step']['ours_s'] if gflop else None)

  # Captioning on the same weights: the reference's state_dict imported into ours.
  n_ref, n_ours = _PAIRS.value, max(_PAIRS.value, _OURS_PAIRS.value)
  (img_a, img_b), _, _, _, _ = _torch_batch(torch, config, n_ours)
  # An id past the vocabulary is never the argmax: END does not stop a caption.
  end_id = cap.END if _STOP_AT_END.value else m.vocab_size
  ours_model = model_skeleton(m)
  weights.import_rsicrc(ours_model, {k: v.detach().numpy() for k, v in model.state_dict().items()})
  a = jnp.asarray(img_a.numpy().transpose(0, 2, 3, 1))
  b = jnp.asarray(img_b.numpy().transpose(0, 2, 3, 1))
  decode = lambda: decoding.greedy_decode_cached(ours_model, a, b, end_id=end_id)
  jax.block_until_ready(decode())  # compile
  captions = {}

  def reference_round():
    t = time.perf_counter()
    captions['reference'] = reference_captions(torch, model, img_a[:n_ref], img_b[:n_ref],
                                                m.max_len, end_id)
    return (time.perf_counter() - t) / n_ref

  def ours_round():
    t = time.perf_counter()
    captions['ours'] = np.asarray(jax.block_until_ready(decode())[0]).tolist()
    return (time.perf_counter() - t) / n_ours

  res['captioning'] = measure.alternating_rounds(reference_round, ours_round, _ROUNDS.value)
  ref_tokens = captions['reference']
  ours_tokens = [row[:row.index(end_id) + 1] if end_id in row else row
                 for row in captions['ours']]
  decode_steps = sum(len(r) - 1 for r in ref_tokens)
  res['captioning'].update(
      reference_pairs=n_ref, ours_pairs=n_ours, reference_decoding_steps=decode_steps,
      stop_at_end=_STOP_AT_END.value, same_tokens=ours_tokens[:n_ref] == ref_tokens)

  s, c = res['train_step'], res['captioning']
  mm = res['matmul_tflops']
  print(f'{res["machine"]}; torch {res["torch"]} ({res["torch_threads"]} threads), jax '
        f'{res["jax"]}; levir config, batch {_BATCH.value}, float32; captions of LEVIR-CC\'s '
        f'lengths, the longest {s["longest_caption_slots"]} slots with START and END: the '
        f'reference pads them to {m.max_len}, ours to {s["caption_slots"]} '
        f'(config.data.caption_pad_multiple={config.data.get("caption_pad_multiple", 0)})')
  print('| | reference (PyTorch) | rsicrc_jax | ratio (range over rounds) |\n'
        '| --- | --- | --- | --- |')
  print(f'| f32 matmul {_MATMUL.value}^3, GFLOP/s | {mm["torch"] * 1e3:.0f} | '
        f'{mm["jax"] * 1e3:.0f} | |')
  spread = lambda r: f'{r["speedup"]:.2f}x ({r["speedup_min"]:.2f}-{r["speedup_max"]:.2f})'
  print(f'| train step, s (median of {_ROUNDS.value} rounds of {_STEPS.value}) | '
        f'{s["reference_s"]:.2f} | {s["ours_s"]:.2f} | {spread(s)} |')
  if gflop:
    print(f'| train step, GFLOP/s ({gflop:.0f} GFLOP/step, XLA) | {s["reference_gflops"]:.0f} | '
          f'{s["ours_gflops"]:.0f} | |')
  if 'others' in s:
    o = s['others']['max_len']
    print(f'| ours with captions at max_len ({m.max_len} slots), s | | {o["s"]:.2f} | '
          f'{o["speedup"]:.2f}x ({o["speedup_min"]:.2f}-{o["speedup_max"]:.2f}) |')
  print(f'| captioning, s per pair (reference: {n_ref} pairs one by one; ours: {n_ours} in one '
        f'batch; median of {_ROUNDS.value} rounds) | {c["reference_s"]:.3f} | {c["ours_s"]:.3f} | '
        f'{spread(c)} |')
  print(f'same tokens on the reference\'s {n_ref} pairs ({decode_steps} decoding steps, '
        f'{"stopped at END" if _STOP_AT_END.value else "END ignored"}): {c["same_tokens"]}')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(res, f, indent=2)
  return 0 if c['same_tokens'] else 1


if __name__ == '__main__':
  cli.use_transparent_huge_pages()  # as launch.py: what users run
  app.run(main)
