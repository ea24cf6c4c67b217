"""Which image tower `config.model.backbone` names (SPEC section 10), and building it.

A name picks the tower's family: `RN50` is CLIP's ModifiedResNet (modified_resnet.py), the
`ViT-*` names OpenCLIP's VisionTransformer (vit.py), `resnet50` / `resnet101` torchvision's
ResNet (resnet.py). The size comes from the config fields of that family (`backbone_layers`,
`backbone_width` for both ResNets; `vit_width`, `vit_layers`, `vit_heads`, `vit_patch_size`), so
any OpenCLIP ViT size works under any ViT name; `PRESETS` holds the reference's sizes and input
preprocessing per name, which `configs/levir.py:backbone=NAME` applies.
"""

from __future__ import annotations

from flax import nnx

from rsicrc_jax.models.modified_resnet import ModifiedResNet
from rsicrc_jax.models.resnet import ResNet
from rsicrc_jax.models.vit import VisionTransformer

FAMILIES = {'RN50': ModifiedResNet, 'ViT-B-32': VisionTransformer,
            'ViT-B-16': VisionTransformer, 'ViT-L-14': VisionTransformer,
            'ViT-H-14': VisionTransformer, 'resnet50': ResNet, 'resnet101': ResNet}

# The towers as the reference builds them: RemoteCLIP / OpenCLIP at 224 px with CLIP's
# normalisation; torchvision's ImageNet ResNets on the 256 px LEVIR-CC images as they are (no
# resize), ImageNet-normalised. pos_table_size is the feature-map side, which sizes the encoder's
# position tables (SPEC section 10).
PRESETS = {
    'RN50': dict(backbone_layers=(3, 4, 6, 3), backbone_width=64, image_size=224,
                 pos_table_size=7, normalization='clip'),
    'resnet50': dict(backbone_layers=(3, 4, 6, 3), backbone_width=64, image_size=256,
                     pos_table_size=8, normalization='imagenet'),
    'resnet101': dict(backbone_layers=(3, 4, 23, 3), backbone_width=64, image_size=256,
                      pos_table_size=8, normalization='imagenet'),
    'ViT-B-32': dict(vit_width=768, vit_layers=12, vit_heads=12, vit_patch_size=32,
                     image_size=224, pos_table_size=7, normalization='clip'),
    'ViT-B-16': dict(vit_width=768, vit_layers=12, vit_heads=12, vit_patch_size=16,
                     image_size=224, pos_table_size=14, normalization='clip'),
    'ViT-L-14': dict(vit_width=1024, vit_layers=24, vit_heads=16, vit_patch_size=14,
                     image_size=224, pos_table_size=16, normalization='clip'),
    'ViT-H-14': dict(vit_width=1280, vit_layers=32, vit_heads=16, vit_patch_size=14,
                     image_size=224, pos_table_size=16, normalization='clip'),
}


def family(name: str) -> type[nnx.Module]:
  """The tower class for a `config.model.backbone` name."""
  if name not in FAMILIES:
    raise ValueError(f'config.model.backbone={name!r}: expected one of {list(FAMILIES)}')
  return FAMILIES[name]


def build(cfg, *, rngs: nnx.Rngs, dtype=None, remat: bool = False) -> nnx.Module:
  """The image tower of `config.model`: images (B, H, W, 3) -> (B, h, w, out_channels)."""
  cls = family(cfg.get('backbone', 'RN50'))  # model dirs written before the field: RN50
  if cls is VisionTransformer:
    return VisionTransformer(cfg.image_size, cfg.vit_patch_size, cfg.vit_width, cfg.vit_layers,
                             cfg.vit_heads, quick_gelu=cfg.get('vit_quick_gelu', False),
                             rngs=rngs, dtype=dtype, remat=remat)
  return cls(tuple(cfg.backbone_layers), cfg.backbone_width, rngs=rngs, dtype=dtype, remat=remat)
