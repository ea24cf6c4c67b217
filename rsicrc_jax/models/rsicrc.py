"""RSICRC: one model for remote sensing image change retrieval and captioning."""

from __future__ import annotations

from flax import struct

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rsicrc_jax.models import backbone as backbones
from rsicrc_jax.models.decoder import CaptionDecoder
from rsicrc_jax.models.encoder import ChangeEncoder
from rsicrc_jax.models.modified_resnet import ModifiedResNet
from rsicrc_jax.models.resnet import ResNet
from rsicrc_jax.models.vit import VisionTransformer

_MODEL_KEYS = (
    'd_model', 'vocab_size', 'max_len', 'num_heads', 'h_dim',
    'a_dim', 'encoder_layers', 'decoder_layers', 'dropout', 'learnable', 'fine_tune',
    'tie_embeddings', 'prenorm', 'value_from_key', 'pos_table_size', 'dtype')


@struct.dataclass
class RSICRCOutput:
  logits: jax.Array  # (B, L, V) next-token logits
  visual_emb: jax.Array  # (B, C) pair embedding for retrieval
  text_emb: jax.Array  # (B, C) caption embedding for retrieval
  visual_tokens: jax.Array  # (B, hw, C) decoder memory, transposed-grid order
  cross_attention: jax.Array  # (B, L, hw) head-averaged, last multimodal layer


_BACKBONE_KEYS = {ModifiedResNet: ('backbone_layers', 'backbone_width'),
                  ResNet: ('backbone_layers', 'backbone_width'),
                  VisionTransformer: ('image_size', 'vit_width', 'vit_layers', 'vit_heads',
                                      'vit_patch_size')}


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  tower = backbones.family(cfg.get('backbone', 'RN50'))
  missing = [k for k in _MODEL_KEYS + _BACKBONE_KEYS[tower] if k not in cfg]
  if missing:
    raise KeyError(f'config.model lacks {missing}; see configs/levir.py for the full set')
  if cfg.d_model % cfg.num_heads or cfg.a_dim % cfg.num_heads:
    raise ValueError(f'config.model: d_model={cfg.d_model} and a_dim={cfg.a_dim} must be '
                     f'divisible by num_heads={cfg.num_heads}')


class RSICRC(nnx.Module):
  """Change encoder + decoupled caption decoder.

  Build from `config.model` (see configs/levir.py). Images are NHWC, normalised as in
  SPEC section 2; tokens are `[START] w.. [END] PAD..` of length <= max_len.
  `model.train()` switches on dropout and BatchNorm batch statistics (every BN layer, frozen
  ones included, as the reference does); `model.eval()` switches them off.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    _check_config(cfg)
    self.backbone_name = cfg.get('backbone', 'RN50')  # static: which parameters train
    # static: the input normalisation the tower expects (pipeline.normalize_images)
    self.normalization = cfg.get('normalization', 'clip')
    dtype = jnp.dtype(cfg.dtype) if cfg.dtype else None
    self.encoder = ChangeEncoder(cfg, rngs=rngs, dtype=dtype)
    self.decoder = CaptionDecoder(cfg, rngs=rngs, dtype=dtype)
    self.eval()

  def __call__(self, img_before: jax.Array, img_after: jax.Array, tokens: jax.Array,
               pad_mask: jax.Array) -> RSICRCOutput:
    """img_*: (B, H, W, 3); tokens: (B, L) int; pad_mask: (B, L) bool, True at PAD."""
    visual_emb, visual_tokens = self.encoder(img_before, img_after)
    out = self.decoder(tokens, visual_tokens, pad_mask)
    return RSICRCOutput(out.logits, visual_emb, out.text_emb, visual_tokens, out.cross_attention)

  def encode_images(self, img_before: jax.Array, img_after: jax.Array):
    """-> (visual_emb (B, C), visual_tokens (B, hw, C))."""
    return self.encoder(img_before, img_after)

  def encode_text(self, tokens: jax.Array, pad_mask: jax.Array) -> jax.Array:
    """-> text_emb (B, C): the retrieval query embedding of a caption."""
    return self.decoder(tokens, None, pad_mask).text_emb


def model_skeleton(cfg: ml_collections.ConfigDict, seed: int = 0) -> RSICRC:
  """An RSICRC whose parameters and BN statistics are shape placeholders, for loading weights
  into (`nnx.update`) without paying for random initialisation; dropout RNGs are concrete."""
  model = nnx.eval_shape(lambda: RSICRC(cfg, rngs=nnx.Rngs(seed)))
  nnx.reseed(model, default=seed)
  return model


def is_trainable(path: tuple, fine_tune: bool = True,
                 fine_tuned: tuple[str, ...] = ModifiedResNet.FINE_TUNED) -> bool:
  """Whether the parameter at `path` (as in nnx.state) is trained: everything outside the
  backbone; inside it, with `fine_tune`, the children named in `fine_tuned` (the tower's
  FINE_TUNED: layer2..layer4 of RN50, transformer and ln_post of a ViT). Without fine-tuning
  the whole backbone is frozen. BatchNorm statistics are not parameters and always update."""
  keys = [str(getattr(p, 'key', p)) for p in path]
  if keys[:2] != ['encoder', 'backbone']:
    return True
  return fine_tune and keys[2] in fine_tuned


def trainable_filter(fine_tune: bool = True, backbone: str = 'RN50'):
  """An nnx filter selecting the trainable parameters of a model whose config.model.backbone is
  `backbone` (use with nnx.state / nnx.Optimizer)."""
  fine_tuned = backbones.family(backbone).FINE_TUNED
  return nnx.All(nnx.Param, lambda path, _: is_trainable(path, fine_tune, fine_tuned))


def count_params(model: nnx.Module, filter_=nnx.Param) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, filter_)))
