"""The learning-rate schedule and the optimizer (SPEC section 7)."""

from __future__ import annotations

import optax


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over warmup_fraction of all steps, then (config.lr_schedule):
  'constant', the reference (HF's get_constant_schedule_with_warmup, whose first update uses
  lr 0); or 'cosine', a cosine decay to 0 at the last step."""
  warmup = int(config.warmup_fraction * total_steps)
  kind = config.get('lr_schedule', 'constant')
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                              max(total_steps, warmup + 1))
  if kind != 'constant':
    raise ValueError(f"config.lr_schedule: expected 'constant' or 'cosine', got {kind!r}")
  if warmup <= 0:
    return optax.constant_schedule(config.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup),
       optax.constant_schedule(config.learning_rate)], [warmup])


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """AdamW over the trainable parameters only (frozen ones get no update and no decay)."""
  chain = []
  if config.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(config.max_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=0.9, b2=0.999,
                           eps=config.adam_eps, weight_decay=config.weight_decay))
  return optax.chain(*chain)


def grad_accum_steps(config) -> int:
  """Microbatches per update (config.grad_accum_steps; absent or < 1 means 1)."""
  return max(int(config.get('grad_accum_steps', 1)), 1)
