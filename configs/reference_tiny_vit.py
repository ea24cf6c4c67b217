"""The tiny configuration of tests/fixtures/rsicrc_reference_tiny_vit.npz (ViT parity tests).

The reference's ViT path (SPEC section 10) with a tiny OpenCLIP VisionTransformer: 64 px, patch
16, width 32, 2 layers, 2 heads, exact GELU -> a 4x4x32 map, projected to d_model=64.
"""

from configs import reference_tiny


def get_config():
  config = reference_tiny.get_config()
  m = config.model
  m.backbone = 'ViT-B-32'  # the reference's ViT code path; the sizes are the fields below
  m.image_size = 64
  m.vit_patch_size = 16
  m.vit_width = 32
  m.vit_layers = 2
  m.vit_heads = 2
  m.pos_table_size = 4
  return config
