"""The demo: RSICRC trained from scratch on the embedded synthetic dataset, on a CPU.

  python launch.py --config configs/demo.py --workdir runs/demo

The synthetic dataset (datasets/synthetic_cc, default config) is built on first use. The model
is the reference architecture at a small size: a narrow ModifiedResNet at 96 px (3x3 feature
map, one cell per named place of the synthetic scenes), d_model 256.
"""

from configs import levir


def get_config():
  config = levir.get_config()
  m = config.model
  m.backbone_layers = (1, 1, 1, 1)
  m.backbone_width = 16  # 512 backbone channels, projected to d_model by the 1x1 conv
  m.image_size = 96
  m.pos_table_size = 3
  m.d_model = 256
  m.encoder_layers = 1
  m.num_heads = 4
  m.a_dim = 256
  m.h_dim = 512
  m.vocab_size = 0  # from the dataset's vocabulary
  m.max_len = 32  # the synthetic grammar's longest caption has 30 words
  m.fine_tune = True
  m.dropout = 0.1

  config.data.name = 'synthetic_cc'
  config.data.builder_config.name = 'default'

  # The reference's loss averages over positive pairs, and about half the items are no-change
  # pairs that are all positives of each other: with batch 32 the changed items carry ~6% of the
  # contrastive loss. A larger lambda gives retrieval of changed pairs enough signal to learn
  # in a CPU-sized run (with 0.5, R@10 on changed test pairs was 0.18 after 4 epochs).
  config.loss.lamb = 3.0
  config.batch_size = 32
  config.epochs = 8
  config.learning_rate = 5e-4
  config.warmup_fraction = 0.025
  config.log_every_steps = 10
  return config
