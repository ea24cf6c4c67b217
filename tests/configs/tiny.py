"""A run small enough for tests: the demo recipe on the `tiny` synthetic dataset, a small model."""

from configs import demo


def get_config():
  c = demo.get_config()
  m = c.model
  m.backbone_layers, m.backbone_width, m.image_size, m.pos_table_size = (1, 1, 1, 1), 8, 64, 2
  m.d_model, m.a_dim, m.h_dim, m.num_heads, m.max_len = 64, 64, 128, 4, 41
  c.data.builder_config = {'name': 'tiny', 'image_size': 64, 'num_train': 40, 'num_val': 12,
                           'num_test': 12, 'change_fraction': 0.5}
  c.data.num_threads = 1
  c.batch_size = 8
  c.epochs = 2
  c.log_every_steps = 1
  c.checkpoint.every_steps = 5
  c.final_eval = False  # test_eval_command_on_the_trained_run runs it
  # The values the tests' tolerances were set at, before the demo moved to temperature 0.05 and
  # seed 0. At 0.05 / seed 0 the 1-vs-8-device gradient-accumulation check differs in the
  # second step's grad_norm by 0.1% (57.337 vs 57.391) while the losses agree to 3e-7: not yet
  # explained, so it is kept apart from the demo change rather than hidden by a tolerance.
  c.loss.temperature = 0.01
  c.seed = 42
  return c
