"""The tiny configuration of tests/fixtures/rsicrc_reference_tiny.npz (reference parity tests).

A ModifiedResNet [1,1,1,1] of width 8 (256 channels) at 96 px, projected to d_model=64.
"""

from configs import levir


def get_config():
  config = levir.get_config()
  m = config.model
  m.backbone_layers = (1, 1, 1, 1)
  m.backbone_width = 8
  m.image_size = 96
  m.d_model = 64
  m.vocab_size = 30
  m.max_len = 12
  m.num_heads = 4
  m.h_dim = 32
  m.a_dim = 64
  m.encoder_layers = 2
  m.decoder_layers = 2
  config.loss.s_threshold = 0.99
  return config
