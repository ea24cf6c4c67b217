"""Import PyTorch weights: reference RSICRC checkpoints and OpenCLIP (RemoteCLIP) image towers
(ModifiedResNet RN50, VisionTransformer ViT-B-32 / ViT-L-14 / any ViT size).

Every model leaf (parameters and BatchNorm statistics) is named by one PyTorch key; the mapping
is a renaming plus a layout change (OIHW -> HWIO convs, (out, in) -> (in, out) linears, the
packed q/k/v `in_proj` split in three). Import is strict: a missing key, an unexpected key or a
shape mismatch raises `CheckpointError` naming the key, the expected and the found shape.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsicrc_jax.models import backbone as backbones
from rsicrc_jax.models.decoder import sinusoidal_positions
from rsicrc_jax.models.modified_resnet import ModifiedResNet
from rsicrc_jax.models.resnet import ResNet
from rsicrc_jax.models.vit import VisionTransformer

Array = np.ndarray


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model."""


# ----------------------------------------------------------------------------- reading files

def _check_looks_like_torch(path: str) -> None:
  """torch.save writes a zip archive (since 1.6) or a pickle stream (before): anything else
  (an HTML page from a failed download, a text file, a truncated header) is refused here, before
  torch is needed to find that out."""
  with open(path, 'rb') as f:
    head = f.read(512)
  if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
    return
  if not head:
    raise CheckpointError(f'{path}: the file is empty, not a PyTorch checkpoint')
  text = all(32 <= b < 127 or b in b'\t\r\n' for b in head[:64])
  what = (f'it starts with text: {head[:40].decode("ascii", "replace")!r}' if text
          else f'it starts with bytes {head[:8].hex(" ")}')
  raise CheckpointError(f'{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a '
                        f'pickle; {what})')


def load_torch_state_dict(path: str) -> dict[str, Array]:
  """Reads a PyTorch state_dict from a `.pt`/`.pth`/`.bin` file or a `.npz` of arrays.

  `.npz` needs nothing beyond numpy; `.pt` needs torch (`pip install -e ".[torch]"`) and is
  opened with `weights_only=True`, so no code inside the file runs.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as data:
        state = {k: np.asarray(data[k]) for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise CheckpointError(f'{path}: not a readable .npz archive of arrays ({e})') from e
  else:
    _check_looks_like_torch(path)
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise CheckpointError(
          f'{path}: reading PyTorch files needs torch; install it with pip install -e ".[torch]" '
          'or convert the file to .npz with numpy.savez') from e
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
      raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})'
                            ) from e
    if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
      obj = obj['state_dict']
    if not isinstance(obj, Mapping) or not all(hasattr(v, 'numpy') for v in obj.values()):
      raise CheckpointError(f'{path}: expected a state_dict (name -> tensor), got {type(obj)}')
    state = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
             for k, v in obj.items()}
  if not state:
    raise CheckpointError(f'{path}: the checkpoint holds no tensors')
  return state


# ----------------------------------------------------------------------------- name mapping

# In an RSICRC checkpoint the backbone is `nn.Sequential(*children)`: children by index.
_RSICRC_STEM_INDEX = {'conv1': 0, 'bn1': 1, 'conv2': 3, 'bn2': 4, 'conv3': 6, 'bn3': 7,
                      'layer1': 10, 'layer2': 11, 'layer3': 12, 'layer4': 13}
_RSICRC_TORCHVISION_INDEX = {'conv1': 0, 'bn1': 1, 'layer1': 4, 'layer2': 5, 'layer3': 6,
                             'layer4': 7}
_BN_LEAF = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_LINEAR_LEAF = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'embedding': 'weight'}
_MHA_SLOT = {'query': 0, 'key': 1, 'value': 2}


def _leaf(name: str) -> str:
  return _BN_LEAF.get(name) or _LINEAR_LEAF[name]


def _backbone_key(parts: list[str], prefix: str, index: Mapping[str, int] | None = None) -> str:
  """['layer2', '0', 'downsample_bn', 'mean'] -> '<prefix>layer2.0.downsample.1.running_mean'
  (a CLIP ModifiedResNet or a torchvision ResNet); with `index`, children are numbered (the
  RSICRC checkpoint layout: layer2 -> 11 or 5)."""
  head, rest = parts[0], parts[1:]
  if index is not None:
    head = str(index[head])
  if len(rest) == 1:  # stem conv/bn
    return f'{prefix}{head}.{_leaf(rest[0])}'
  block, module, leaf = rest
  module = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(module, module)
  return f'{prefix}{head}.{block}.{module}.{_leaf(leaf)}'


def _mha_key(prefix: str, module: str, leaf: str) -> tuple[str, int | None]:
  """A MultiheadAttention leaf -> (torch key, slot of the packed in_proj or None)."""
  if module == 'out':
    return f'{prefix}.out_proj.{_leaf(leaf)}', None
  return f'{prefix}.in_proj_{"weight" if leaf == "kernel" else "bias"}', _MHA_SLOT[module]


_ENCODER_BLOCK = {'ff_in': 'feedforward.net.0', 'ff_out': 'feedforward.net.3',
                  'norm1': 'norm1', 'norm2': 'norm2'}
_RESBLOCK = {'conv1': 'left.0', 'bn1': 'left.1', 'conv2': 'left.3', 'bn2': 'left.4',
             'conv3': 'left.6', 'bn3': 'left.7'}


def _vit_key(parts: list[str], prefix: str) -> tuple[str, int | None]:
  """['transformer', 'resblocks', '0', 'mlp', 'c_fc', 'kernel'] ->
  '<prefix>transformer.resblocks.0.mlp.c_fc.weight' (OpenCLIP names, ours mirror them)."""
  if parts[-1] in ('class_embedding', 'positional_embedding'):
    return prefix + parts[-1], None
  if len(parts) >= 3 and parts[-3] == 'attn':
    return _mha_key(prefix + '.'.join(parts[:-2]), parts[-2], parts[-1])
  return prefix + '.'.join(parts[:-1]) + '.' + _leaf(parts[-1]), None


def _is_vit(backbone: str) -> bool:
  return backbones.family(backbone) is VisionTransformer


def rsicrc_torch_key(path: tuple[str, ...], backbone: str = 'RN50') -> tuple[str, int | None]:
  """Path of a leaf in `nnx.state(RSICRC)` -> (reference state_dict key, in_proj slot), for a
  model whose config.model.backbone is `backbone`."""
  p = list(path)
  if p[:2] == ['encoder', 'backbone']:
    tower = backbones.family(backbone)
    if tower is VisionTransformer:
      return _vit_key(p[2:], 'encoder.encoder.net.')
    index = _RSICRC_TORCHVISION_INDEX if tower is ResNet else _RSICRC_STEM_INDEX
    return _backbone_key(p[2:], 'encoder.encoder.net.', index), None
  if p[0] == 'encoder':
    name = p[1]
    if name == 'proj':
      return f'encoder.encoder.proj.{_leaf(p[2])}', None
    if name == 'img_queries':
      return 'encoder.img_queries', None
    if name == 'fuse':
      return f'encoder.Conv1.{_leaf(p[2])}', None
    if name == 'resblock':
      return f'encoder.LN.{_RESBLOCK[p[2]]}.{_leaf(p[3])}', None
    if name == 'att_pool':
      return _mha_key('encoder.att_pool', p[2], p[3])
    if name == 'att_pool_norm':
      return f'encoder.att_pool_norm.{_leaf(p[2])}', None
    if name == 'attentive':
      if p[2] in ('h_embedding', 'w_embedding'):
        return f'encoder.encoder_trans.{p[2]}.weight', None
      _, _, _, layer, block, *rest = p
      base = f'encoder.encoder_trans.selftrans.{layer}.{0 if block == "shared" else 1}'
      if rest[0] == 'att':
        module = 'to_out.0' if rest[1] == 'to_out' else rest[1]
        return f'{base}.att.{module}.{_leaf(rest[2])}', None
      return f'{base}.{_ENCODER_BLOCK[rest[0]]}.{_leaf(rest[1])}', None
  if p[0] == 'decoder':
    name = p[1]
    if name == 'tokens_embed':
      return 'decoder.tokens_embed.weight', None
    if name == 'lm_head':
      return 'decoder.lm_head.weight', None
    if name == 'pos_embed':
      return 'decoder.position_encoding.pos_emb.weight', None
    if name in ('uni_layers', 'cross_layers'):
      base = f'decoder.{"uni" if name == "uni_layers" else "cross"}_decoder.{p[2]}'
      if p[3] in ('self_attn', 'cross_attn'):
        return _mha_key(f'{base}.{p[3]}', p[4], p[5])
      return f'{base}.{p[3]}.{_leaf(p[4])}', None
  raise KeyError(f'no PyTorch name known for model leaf {"/".join(path)}')


def openclip_backbone_key(path: tuple[str, ...]) -> tuple[str, int | None]:
  """Path of a leaf in `nnx.state(ModifiedResNet)` -> (OpenCLIP key, None)."""
  return _backbone_key(list(path), 'visual.'), None


def torchvision_backbone_key(path: tuple[str, ...]) -> tuple[str, int | None]:
  """Path of a leaf in `nnx.state(ResNet)` -> (torchvision key, None)."""
  return _backbone_key(list(path), ''), None


def openclip_vit_key(path: tuple[str, ...]) -> tuple[str, int | None]:
  """Path of a leaf in `nnx.state(VisionTransformer)` -> (OpenCLIP key, in_proj slot)."""
  return _vit_key(list(path), 'visual.')


def _tower(state_dict: Mapping[str, Array], prefix: str) -> tuple[type | None, str]:
  """Which image tower the tensors under `prefix` hold: (family, description), e.g.
  (VisionTransformer, 'an OpenCLIP ViT (width 768, 12 layers, patch 32, 224 px)'), or
  (None, '') when the keys say nothing clear."""
  conv = state_dict.get(prefix + 'conv1.weight')
  if conv is None:
    conv = state_dict.get(prefix + '0.weight')  # the RSICRC layout of both ResNets
  if conv is None or np.ndim(conv) != 4:
    return None, ''
  blocks = {k[len(prefix):].split('.')[2] for k in state_dict
            if k.startswith(prefix + 'transformer.resblocks.')}
  if blocks:
    pos = state_dict.get(prefix + 'positional_embedding')
    px = ''
    if pos is not None and np.ndim(pos) == 2:
      px = f', {int(round((pos.shape[0] - 1) ** 0.5)) * conv.shape[2]} px'
    return VisionTransformer, (f'an OpenCLIP ViT (width {conv.shape[0]}, {len(blocks)} layers, '
                               f'patch {conv.shape[2]}{px})')
  if conv.shape[2:] == (7, 7):
    layer3 = {k[len(prefix):].split('.')[1] for k in state_dict
              if k.startswith((prefix + 'layer3.', prefix + '6.'))}
    return ResNet, f'a torchvision ResNet ({len(layer3)} blocks in layer3)'
  if conv.shape[2:] == (3, 3):
    return ModifiedResNet, 'a CLIP ModifiedResNet (RN50 layout)'
  return None, ''


_FAMILY_HINT = {VisionTransformer: 'configs/levir.py:backbone=ViT-B-32 (or set '
                                   'config.model.backbone and the vit_* fields)',
                ResNet: 'configs/levir.py:backbone=resnet50 (or resnet101)',
                ModifiedResNet: 'configs/levir.py:backbone=RN50'}
_FAMILY_NAME = {VisionTransformer: 'an OpenCLIP ViT', ResNet: 'a torchvision ResNet',
                ModifiedResNet: 'a CLIP ModifiedResNet'}


def _check_tower_family(state_dict: Mapping[str, Array], prefix: str, expected: type,
                        name: str = '') -> None:
  """A ViT checkpoint for an RN50 config (or any other mix) is named as such, not as 200 keys;
  `name`: the config.model.backbone that built `expected`, when known."""
  found, what = _tower(state_dict, prefix)
  if found is not None and found is not expected:
    field = f'config.model.backbone={name!r}' if name else 'config.model.backbone'
    raise CheckpointError(f'the checkpoint\'s image tower is {what}, but {field} builds '
                          f'{_FAMILY_NAME[expected]}; use {_FAMILY_HINT[found]}')


def torch_naming(backbone: str = 'RN50') -> dict:
  """`to_torch_state_dict` arguments for an RSICRC with this config.model.backbone."""
  convs = _TORCH_CONV_PREFIXES[1:] if _is_vit(backbone) else _TORCH_CONV_PREFIXES
  return dict(key_fn=lambda p: rsicrc_torch_key(p, backbone), conv_prefixes=convs)


# ----------------------------------------------------------------------------- conversion

def _to_jax_layout(t: Array, target_shape: tuple[int, ...], leaf: str, slot: int | None) -> Array:
  if slot is not None:  # packed q/k/v: rows [slot*D, (slot+1)*D)
    d = t.shape[0] // 3
    t = t[slot * d:(slot + 1) * d]
  if leaf == 'kernel':
    if t.ndim == 4 and len(target_shape) == 4:  # conv OIHW -> HWIO
      return t.transpose(2, 3, 1, 0)
    if t.ndim == 4 and t.shape[2:] == (1, 1):  # 1x1 conv (O, I, 1, 1) -> dense (I, O)
      return t[:, :, 0, 0].T
    if t.ndim == 2:  # Linear (out, in) -> (in, out)
      return t.T
  return t


def _path_str(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def convert_state(state_dict: Mapping[str, Array], abstract_state: nnx.State,
                  key_fn: Callable[[tuple[str, ...]], tuple[str, int | None]],
                  ignore: Callable[[str], bool] = lambda k: False) -> nnx.State:
  """Builds a concrete copy of `abstract_state` from PyTorch tensors.

  Fails on the first missing key, on every shape mismatch (all listed), and on keys of the
  checkpoint that nothing consumed (unless `ignore(key)`).
  """
  used, errors = set(), []
  flat = nnx.to_flat_state(abstract_state)
  out = []
  for path, var in flat:
    p = _path_str(path)
    key, slot = key_fn(p)
    if key not in state_dict:
      raise CheckpointError(f'missing key {key!r} (for model leaf {"/".join(p)}, expected shape '
                            f'{_torch_shape(var.shape, p[-1], slot)})')
    src = np.asarray(state_dict[key])
    if slot is not None and (src.ndim == 0 or src.shape[0] % 3):
      errors.append(f'{key}: expected a packed q/k/v tensor with 3*{var.shape[-1]} rows, found '
                    f'shape {src.shape}')
      continue
    val = _to_jax_layout(src, tuple(var.shape), p[-1], slot)
    if tuple(val.shape) != tuple(var.shape):
      errors.append(f'{key}: expected shape {_torch_shape(var.shape, p[-1], slot)}, found '
                    f'{tuple(src.shape)}')
      continue
    used.add(key)
    # jnp.array copies: the model must never alias (and later mutate) the caller's arrays.
    out.append((path, var.replace(jnp.array(val, dtype=var.dtype))))
  if errors:
    raise CheckpointError('shape mismatch:\n  ' + '\n  '.join(errors))
  unexpected = sorted(k for k in state_dict if k not in used and not ignore(k))
  if unexpected:
    shown = ', '.join(f'{k!r} {tuple(np.shape(state_dict[k]))}' for k in unexpected[:10])
    more = f' (+{len(unexpected) - 10} more)' if len(unexpected) > 10 else ''
    raise CheckpointError(f'unexpected keys in the checkpoint: {shown}{more}')
  return nnx.from_flat_state(out)


def _torch_shape(jax_shape, leaf: str, slot) -> tuple[int, ...]:
  """The PyTorch-side shape a JAX leaf expects, for error messages."""
  s = tuple(jax_shape)
  if leaf == 'kernel':
    s = (s[3], s[2], s[0], s[1]) if len(s) == 4 else (s[1], s[0])
  if slot is not None:
    s = (3 * s[0],) + s[1:]
  return s


def _model_state_filter():
  return nnx.Any(nnx.Param, nnx.BatchStat)


_PE_ATOL = 1e-5  # float32 sin/cos of the same formula differ by ~1e-7 across libraries


def import_rsicrc(model: nnx.Module, state_dict: Mapping[str, Array], *,
                  tie_atol: float = 0.0) -> None:
  """Loads a reference RSICRC `state_dict` into `model` (an `RSICRC`) in place.

  Reference tensors with no counterpart are checked, then dropped: `num_batches_tracked`; the
  sinusoidal `pe` buffer (must equal our table); the encoder's never-used `to_v` weights when
  `value_from_key` (shape-checked); `lm_head.weight` when embeddings are tied (must equal
  `tokens_embed.weight`).
  """
  _check_tower_family(state_dict, 'encoder.encoder.net.', backbones.family(model.backbone_name),
                      model.backbone_name)
  vit = _is_vit(model.backbone_name)
  cfg_tied = model.decoder.tie_embeddings
  value_from_key = all(layer.shared.att.to_v is None for layer in model.encoder.attentive.layers)
  state_dict = dict(state_dict)

  pe = state_dict.get('decoder.position_encoding.pe')
  if pe is not None and model.decoder.pos_embed is None:
    want = sinusoidal_positions(model.decoder.max_len, pe.shape[-1])[None]
    if pe.shape != want.shape:
      raise CheckpointError(f'decoder.position_encoding.pe: expected the sinusoidal table of shape '
                            f'{want.shape} (max_len={model.decoder.max_len}), found {pe.shape}')
    diff = np.abs(np.asarray(pe, np.float64) - want)
    if not diff.max() <= _PE_ATOL:  # also catches NaN
      row, col = np.unravel_index(np.nanargmax(np.where(np.isnan(diff), np.inf, diff)),
                                  diff.shape[1:])
      raise CheckpointError(
          f'decoder.position_encoding.pe: the shape {pe.shape} is right but the values are not the '
          f'sinusoidal table: max |difference| {np.nanmax(diff):.3g} (tolerance {_PE_ATOL}) at '
          f'position {row}, dimension {col}: found {float(pe[0, row, col]):.6g}, expected '
          f'{float(want[0, row, col]):.6g}; {int((diff > _PE_ATOL).sum())} of {diff.size} '
          'values differ')
  if cfg_tied and 'decoder.lm_head.weight' in state_dict:
    head, emb = state_dict['decoder.lm_head.weight'], state_dict.get('decoder.tokens_embed.weight')
    if emb is None or head.shape != emb.shape or not np.allclose(head, emb, atol=tie_atol):
      raise CheckpointError('decoder.lm_head.weight differs from decoder.tokens_embed.weight, '
                            'but config.model.tie_embeddings=True; set it to False for this '
                            'checkpoint')

  def ignore(key: str) -> bool:
    if key.endswith('num_batches_tracked') or key == 'decoder.position_encoding.pe':
      return True
    if vit and key == 'encoder.encoder.net.proj':  # the ViT's own projection: unused (SPEC 10)
      width = model.encoder.backbone.out_channels
      if np.ndim(state_dict[key]) != 2 or state_dict[key].shape[0] != width:
        raise CheckpointError(f'{key}: expected shape ({width}, output_dim), found '
                              f'{np.shape(state_dict[key])}')
      return True
    if cfg_tied and key == 'decoder.lm_head.weight':
      return True
    if value_from_key and re.fullmatch(r'encoder\.encoder_trans\.selftrans\.\d+\.\d\.att\.to_v\.'
                                       r'weight', key):
      k = state_dict[key].shape
      q = state_dict[key.replace('to_v', 'to_k')].shape
      if k != q:
        raise CheckpointError(f'{key}: expected shape {q} (as to_k), found {k}')
      return True
    return False

  abstract = nnx.state(model, _model_state_filter())
  key_fn = lambda p: rsicrc_torch_key(p, model.backbone_name)
  nnx.update(model, convert_state(state_dict, abstract, key_fn, ignore))


def import_openclip_backbone(backbone: nnx.Module, state_dict: Mapping[str, Array]) -> None:
  """Loads the image tower of an OpenCLIP state_dict (RemoteCLIP-RN50.pt, RemoteCLIP-ViT-B-32.pt,
  a whole CLIP file) into a `ModifiedResNet` or `VisionTransformer` in place. The text tower,
  the RN50 attention-pool head and the ViT's `proj` are dropped."""
  if not any(k.startswith('visual.') for k in state_dict):
    raise CheckpointError('no "visual.*" tensors: not an OpenCLIP state_dict')
  vit = isinstance(backbone, VisionTransformer)
  _check_tower_family(state_dict, 'visual.', type(backbone))
  if isinstance(backbone, ResNet):
    raise CheckpointError('config.model.backbone builds a torchvision ResNet, whose weights are a '
                          'torchvision file: convert torchvision, not remoteclip')
  dropped = ('visual.proj',) if vit else ()
  ignore = lambda k: (not k.startswith('visual.') or k.startswith('visual.attnpool.')
                      or k in dropped or k.endswith('num_batches_tracked'))
  abstract = nnx.state(backbone, _model_state_filter())
  key_fn = openclip_vit_key if vit else openclip_backbone_key
  nnx.update(backbone, convert_state(state_dict, abstract, key_fn, ignore))


def import_torchvision_backbone(backbone: nnx.Module, state_dict: Mapping[str, Array]) -> None:
  """Loads a torchvision ResNet state_dict (resnet50 / resnet101 ImageNet weights, e.g.
  resnet50-0676ba61.pth) into a `ResNet` in place. The classifier `fc` is dropped."""
  _check_tower_family(state_dict, '', type(backbone))
  if not isinstance(backbone, ResNet):
    raise CheckpointError(f'config.model.backbone builds {_FAMILY_NAME[type(backbone)]}, whose '
                          'weights are an OpenCLIP file: convert remoteclip, not torchvision')
  ignore = lambda k: k.startswith('fc.') or k.endswith('num_batches_tracked')
  abstract = nnx.state(backbone, _model_state_filter())
  nnx.update(backbone, convert_state(state_dict, abstract, torchvision_backbone_key, ignore))


def import_backbone(backbone: nnx.Module, state_dict: Mapping[str, Array]) -> None:
  """A pretrained image tower, whichever family `backbone` is: OpenCLIP files for
  ModifiedResNet and ViT towers, torchvision files for ResNets."""
  if isinstance(backbone, ResNet):
    import_torchvision_backbone(backbone, state_dict)
  else:
    import_openclip_backbone(backbone, state_dict)


def flat_arrays(module: nnx.Module) -> dict[str, Array]:
  """Params and BatchNorm statistics as {'a/b/c': array} (the .npz layout we write)."""
  flat = nnx.to_flat_state(nnx.state(module, _model_state_filter()))
  return {_path_name(p): np.asarray(jax.device_get(v[...])) for p, v in flat}


def load_flat_arrays(module: nnx.Module, arrays: Mapping[str, Array], source: str) -> None:
  """Inverse of `flat_arrays`, strict about names and shapes."""
  flat = nnx.to_flat_state(nnx.state(module, _model_state_filter()))
  expected = {_path_name(p): (p, v) for p, v in flat}
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  if missing or unexpected:
    raise CheckpointError(f'{source}: arrays do not match the model: missing {missing[:5]}, '
                          f'unexpected {unexpected[:5]}')
  out = []
  for name, (p, v) in expected.items():
    a = np.asarray(arrays[name])
    if a.shape != tuple(v.shape):
      raise CheckpointError(f'{source}: {name}: expected shape {tuple(v.shape)}, found {a.shape}')
    out.append((p, v.replace(jnp.array(a, dtype=v.dtype))))
  nnx.update(module, nnx.from_flat_state(out))


# ----------------------------------------------------------------------------- export

_TORCH_CONV_PREFIXES = (('encoder', 'backbone'), ('encoder', 'proj'), ('encoder', 'fuse'),
                        ('encoder', 'resblock'))


def to_torch_state_dict(state: nnx.State, key_fn=rsicrc_torch_key,
                        conv_prefixes=_TORCH_CONV_PREFIXES) -> dict[str, Array]:
  """The inverse renaming: any state shaped like the model's (parameters, statistics, or their
  gradients) -> {PyTorch key: array in PyTorch layout}. Packed q/k/v slots are re-concatenated.
  Use `key_fn=openclip_backbone_key, conv_prefixes=((),)` for a bare backbone."""
  out: dict[str, Array] = {}
  slots: dict[str, dict[int, Array]] = {}
  for path, var in nnx.to_flat_state(state):
    p = _path_str(path)
    key, slot = key_fn(p)
    a = np.asarray(jax.device_get(var[...] if hasattr(var, '__getitem__') else var))
    if p[-1] == 'kernel':
      if a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)
      elif any(p[:len(c)] == c for c in conv_prefixes):
        a = a.T[:, :, None, None]
      else:
        a = a.T
    if slot is None:
      out[key] = a
    else:
      slots.setdefault(key, {})[slot] = a
  for key, parts in slots.items():
    out[key] = np.concatenate([parts[i] for i in range(3)], axis=0)
  return out
