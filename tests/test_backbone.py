"""Each image tower (CLIP ModifiedResNet, OpenCLIP ViT, torchvision ResNet) against its own
library's code, and the model's size with each."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import levir
from rsicrc_jax import weights
from rsicrc_jax.models import RSICRC, count_params, trainable_filter
from rsicrc_jax.models.modified_resnet import ModifiedResNet
from rsicrc_jax.models.resnet import ResNet
from rsicrc_jax.models.vit import VisionTransformer

from conftest import FIXTURES, assert_close


@pytest.fixture(scope='module')
def openclip_tiny():
  with np.load(os.path.join(FIXTURES, 'openclip_modified_resnet_tiny.npz')) as d:
    return {k: d[k] for k in d.files}


def _tiny_backbone(fx):
  net = ModifiedResNet(tuple(fx['layers'].tolist()), int(fx['width']), rngs=nnx.Rngs(0))
  weights.import_openclip_backbone(net, {k[6:]: v for k, v in fx.items() if k.startswith('state/')})
  return net


def test_matches_openclip_eval_and_train(openclip_tiny):
  fx = openclip_tiny
  net = _tiny_backbone(fx)
  _check_eval_train_and_statistics(net, fx, weights.openclip_backbone_key)


def _check_eval_train_and_statistics(net, fx, key_fn):
  """A tower against a fixture of its library's code: the feature map in eval mode, after a
  train-mode forward, and the BN running statistics after that forward."""
  x = jnp.asarray(fx['input'].transpose(0, 2, 3, 1))
  run = nnx.jit(lambda m, x: m(x))
  assert_close(run(net, x), fx['eval_features'].transpose(0, 2, 3, 1), name='eval features')
  net.train()
  assert_close(run(net, x), fx['train_features'].transpose(0, 2, 3, 1), name='train features')
  stats = weights.to_torch_state_dict(nnx.state(net, nnx.BatchStat), key_fn=key_fn,
                                      conv_prefixes=((),))
  expected = {k[len('bn_after/'):]: v for k, v in fx.items() if k.startswith('bn_after/')}
  assert set(stats) == set(expected)
  for k, v in expected.items():
    assert_close(stats[k], v, name=k)


def test_openclip_export_round_trip(openclip_tiny):
  net = _tiny_backbone(openclip_tiny)
  exported = weights.to_torch_state_dict(nnx.state(net, nnx.Any(nnx.Param, nnx.BatchStat)),
                                         key_fn=weights.openclip_backbone_key,
                                         conv_prefixes=((),))
  source = {k[6:]: v for k, v in openclip_tiny.items()
            if k.startswith('state/visual.') and 'attnpool' not in k and 'num_batches' not in k}
  assert set(exported) == set(source)
  for k, v in source.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_rn50_parameter_count():
  net = nnx.eval_shape(lambda: ModifiedResNet((3, 4, 6, 3), 64, rngs=nnx.Rngs(0)))
  assert count_params(net) == 23_527_264  # SPEC section 3, attention pool excluded
  later = sum(x.size for name in ('layer2', 'layer3', 'layer4')
              for x in jax.tree.leaves(nnx.state(getattr(net, name), nnx.Param)))
  assert later == 23_282_688
  assert net.out_channels == 2048


def test_levir_config_parameter_count():
  """The reference has 350,815,072 parameters, 37,748,736 of them the encoder's never-used value
  projections (3 layers x (2048^2 + 4096 x 2048)), which this model does not hold."""
  config = levir.get_config()
  model = nnx.eval_shape(lambda: RSICRC(config.model, rngs=nnx.Rngs(0)))
  unused_values = 3 * (2048 * 2048 + 4096 * 2048)
  assert count_params(model) == 350_815_072 - unused_values == 313_066_336
  assert count_params(model, trainable_filter(True)) == 350_570_496 - unused_values
  config.model.value_from_key = False  # the clean variant holds (and uses) them
  clean = nnx.eval_shape(lambda: RSICRC(config.model, rngs=nnx.Rngs(0)))
  assert count_params(clean) == 350_815_072


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('open_clip') is None, reason='open_clip not installed')
def test_full_rn50_matches_openclip():
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = open_clip.model.ModifiedResNet([3, 4, 6, 3], output_dim=1024, heads=32, width=64).eval()
  x = torch.randn(2, 3, 224, 224)
  with torch.no_grad():
    feat = ref.stem(x)
    for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
      feat = layer(feat)
  net = ModifiedResNet((3, 4, 6, 3), 64, rngs=nnx.Rngs(0))
  weights.import_openclip_backbone(
      net, {f'visual.{k}': v.numpy() for k, v in ref.state_dict().items()})
  out = nnx.jit(lambda m, x: m(x))(net, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert out.shape == (2, 7, 7, 2048)
  assert_close(out, feat.numpy().transpose(0, 2, 3, 1), rtol=1e-4, name='RN50 features')


def _openclip_vit_params(width, layers, patch, grid, output_dim):
  """OpenCLIP VisionTransformer's parameter count, term by term from its modules: conv1 (no
  bias), class_embedding, positional_embedding, ln_pre, `layers` blocks (ln_1, in_proj 3w^2+3w,
  out_proj w^2+w, ln_2, c_fc 4w^2+4w, c_proj 4w^2+w), ln_post, proj."""
  w = width
  block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)
  return (3 * patch * patch * w + w + (grid * grid + 1) * w + 2 * w + layers * block + 2 * w
          + w * output_dim)


@pytest.mark.parametrize('name,tower,proj,reference_total,reference_trainable', [
    # open_clip 3.3.0's create_model(name).visual parameter counts, counted there.
    ('ViT-B-32', 87_849_216, 768 * 512, 416_711_936, 413_918_720),
    ('ViT-L-14', 303_966_208, 1024 * 768, 633_371_648, 631_716_864),
])
def test_vit_parameter_counts(name, tower, proj, reference_total, reference_trainable):
  """The reference's counts at the levir config with a ViT backbone: its RSICRC holds the tower
  with `proj` (unused, frozen) and the encoder's never-used value projections (trainable); this
  model holds neither. Trainable: everything outside the tower, its transformer and ln_post."""
  config = levir.get_config(f'backbone={name}')
  m = config.model
  grid = m.image_size // m.vit_patch_size
  assert grid == m.pos_table_size == {'ViT-B-32': 7, 'ViT-L-14': 16}[name]
  assert _openclip_vit_params(m.vit_width, m.vit_layers, m.vit_patch_size, grid,
                              proj // m.vit_width) == tower
  model = nnx.eval_shape(lambda: RSICRC(m, rngs=nnx.Rngs(0)))
  assert count_params(model.encoder.backbone) == tower - proj
  unused_values = 3 * (2048 * 2048 + 4096 * 2048)
  assert count_params(model) == reference_total - unused_values - proj
  assert count_params(model, trainable_filter(True, name)) == reference_trainable - unused_values
  # Frozen: the patch embedding, class token, positions and ln_pre.
  w = m.vit_width
  frozen = 3 * m.vit_patch_size ** 2 * w + w + (grid * grid + 1) * w + 2 * w
  assert count_params(model) - count_params(model, trainable_filter(True, name)) == frozen
  assert count_params(model, trainable_filter(False, name)) == (
      count_params(model) - count_params(model.encoder.backbone))


@pytest.fixture(scope='module')
def vit_reference():
  with np.load(os.path.join(FIXTURES, 'rsicrc_reference_tiny_vit.npz')) as d:
    return {k: d[k] for k in d.files}


def _tiny_vit():
  from configs import reference_tiny_vit  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.models import backbone  # pylint: disable=import-outside-toplevel
  return backbone.build(reference_tiny_vit.get_config().model, rngs=nnx.Rngs(0))


def test_vit_tower_from_openclip_names_equals_the_rsicrc_import(vit_reference):
  """An OpenCLIP file (visual.*, with the text tower and proj beside it) loads into the same
  tower as the RSICRC checkpoint's encoder.encoder.net.*, and exports back to those names."""
  prefix = 'state/encoder.encoder.net.'
  visual = {'visual.' + k[len(prefix):]: v for k, v in vit_reference.items()
            if k.startswith(prefix)}
  clip_file = dict(visual, **{'token_embedding.weight': np.zeros((10, 4), np.float32),
                              'logit_scale': np.float32(1.0)})
  net = _tiny_vit()
  weights.import_openclip_backbone(net, clip_file)
  x = jnp.asarray(vit_reference['input/img_before'].transpose(0, 2, 3, 1))
  feat = nnx.jit(lambda m, x: m(x))(net, x)
  assert feat.shape == (4, 4, 4, 32)
  # The reference's projected map is proj(tower(x)): apply the checkpoint's 1x1 conv by hand.
  w = vit_reference['state/encoder.encoder.proj.weight'][:, :, 0, 0]
  b = vit_reference['state/encoder.encoder.proj.bias']
  assert_close(np.asarray(feat) @ w.T + b,
               vit_reference['eval/backbone_proj_feat1'].transpose(0, 2, 3, 1), name='tower+proj')
  exported = weights.to_torch_state_dict(nnx.state(net, nnx.Param),
                                         key_fn=weights.openclip_vit_key, conv_prefixes=())
  assert set(exported) == set(visual) - {'visual.proj'}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, visual[k], err_msg=k)


def test_a_tower_of_the_other_family_is_named(vit_reference, openclip_tiny):
  visual = {'visual.' + k[len('state/encoder.encoder.net.'):]: v for k, v in vit_reference.items()
            if k.startswith('state/encoder.encoder.net.')}
  with pytest.raises(weights.CheckpointError,
                     match=r"OpenCLIP ViT \(width 32, 2 layers, patch 16, 64 px\), but "
                           r"config.model.backbone builds a CLIP ModifiedResNet; use "
                           r"configs/levir.py:backbone=ViT-B-32"):
    weights.import_openclip_backbone(ModifiedResNet((1, 1, 1, 1), 8, rngs=nnx.Rngs(0)), visual)
  resnet = {k[6:]: v for k, v in openclip_tiny.items() if k.startswith('state/')}
  with pytest.raises(weights.CheckpointError, match=r'is a CLIP ModifiedResNet \(RN50 layout\), '
                     r'but config.model.backbone builds an OpenCLIP ViT; use '
                     r'configs/levir.py:backbone=RN50'):
    weights.import_openclip_backbone(_tiny_vit(), resnet)


@pytest.fixture(scope='module')
def openclip_vit_tiny():
  with np.load(os.path.join(FIXTURES, 'openclip_vit_tiny.npz')) as d:
    return {k: d[k] for k in d.files}


@pytest.mark.parametrize('activation', ['gelu', 'quick_gelu'])
def test_vit_matches_openclip(openclip_vit_tiny, activation):
  """Random-weight towers from OpenCLIP's VisionTransformer (scripts/make_openclip_vit_fixture.py):
  our tower's feature map equals the patch tokens OpenCLIP returns with output_tokens=True."""
  fx = openclip_vit_tiny
  net = VisionTransformer(int(fx['image_size']), int(fx['patch_size']), int(fx['width']),
                          int(fx['layers']), int(fx['heads']),
                          quick_gelu=activation == 'quick_gelu', rngs=nnx.Rngs(0))
  prefix = f'{activation}/state/'
  weights.import_openclip_backbone(
      net, {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)})
  out = nnx.jit(lambda m, x: m(x))(net, jnp.asarray(fx['input'].transpose(0, 2, 3, 1)))
  tokens = fx[f'{activation}/tokens']
  b, n, w = tokens.shape
  g = int(round(n ** 0.5))
  assert out.shape == (b, g, g, w)
  assert_close(out.reshape(b, n, w), tokens, name=f'{activation} tokens')


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('open_clip') is None, reason='open_clip not installed')
@pytest.mark.parametrize('name', ['ViT-B-32', 'ViT-L-14'])
def test_full_vit_matches_openclip(name):
  """Full-size towers as open_clip.create_model(name) builds them (random weights): our PRESETS
  are its sizes and the feature maps agree."""
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.models import backbone  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = open_clip.create_model(name, pretrained=None).visual.eval()
  ref.output_tokens = True
  x = torch.randn(1, 3, 224, 224)
  with torch.no_grad():
    _, tokens = ref(x)
  config = levir.get_config(f'backbone={name}')
  net = backbone.build(config.model, rngs=nnx.Rngs(0))
  weights.import_openclip_backbone(
      net, {f'visual.{k}': v.float().numpy() for k, v in ref.state_dict().items()})
  out = nnx.jit(lambda m, x: m(x))(net, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  g = config.model.pos_table_size
  assert out.shape == (1, g, g, config.model.vit_width)
  assert_close(out.reshape(1, g * g, -1), tokens.numpy(), rtol=1e-4, name=f'{name} tokens')


@pytest.fixture(scope='module')
def torchvision_tiny():
  with np.load(os.path.join(FIXTURES, 'torchvision_resnet_tiny.npz')) as d:
    return {k: d[k] for k in d.files}


def test_resnet_matches_torchvision_eval_and_train(torchvision_tiny):
  """torchvision's ResNet code at 1/8 width (scripts/make_torchvision_resnet_fixture.py): the
  feature map in eval mode, after a train-mode forward, and the running statistics after it."""
  fx = torchvision_tiny
  net = ResNet(tuple(fx['layers'].tolist()), int(fx['width']), rngs=nnx.Rngs(0))
  state = {k[6:]: v for k, v in fx.items() if k.startswith('state/')}
  weights.import_torchvision_backbone(net, state)
  _check_eval_train_and_statistics(net, fx, weights.torchvision_backbone_key)
  exported = weights.to_torch_state_dict(nnx.state(net, nnx.Param),
                                         key_fn=weights.torchvision_backbone_key,
                                         conv_prefixes=((),))
  assert set(exported) == {k for k in state if not k.endswith(('running_mean', 'running_var',
                                                               'num_batches_tracked'))}


def test_a_torchvision_file_for_the_wrong_tower_is_named(torchvision_tiny, openclip_tiny):
  state = {k[6:]: v for k, v in torchvision_tiny.items() if k.startswith('state/')}
  with pytest.raises(weights.CheckpointError,
                     match=r'is a torchvision ResNet \(1 blocks in layer3\), but '
                           r'config.model.backbone builds a CLIP ModifiedResNet; use '
                           r'configs/levir.py:backbone=resnet50'):
    weights.import_openclip_backbone(ModifiedResNet((1, 1, 1, 1), 8, rngs=nnx.Rngs(0)),
                                     {f'visual.{k}': v for k, v in state.items()})
  resnet = {k[6:]: v for k, v in openclip_tiny.items() if k.startswith('state/visual.')}
  with pytest.raises(weights.CheckpointError, match=r'convert remoteclip, not torchvision'):
    weights.import_torchvision_backbone(ModifiedResNet((1, 1, 1, 1), 8, rngs=nnx.Rngs(0)),
                                        {k[7:]: v for k, v in resnet.items()})


@pytest.mark.parametrize('name,tower,reference_total,reference_trainable', [
    # torchvision's resnet50 / resnet101 without fc (2048 x 1000 + 1000).
    ('resnet50', 25_557_032 - 2_049_000, 350_797_888, 350_788_352),
    ('resnet101', 44_549_160 - 2_049_000, 369_790_016, 369_780_480),
])
def test_resnet_parameter_counts(name, tower, reference_total, reference_trainable):
  """The reference's counts at the levir config with a torchvision tower: the tower (8x8x2048,
  no projection at d_model 2048), 8-row position tables, and the encoder's unused value weights
  (trainable in the reference). Frozen: conv1 and bn1."""
  config = levir.get_config(f'backbone={name}')
  m = config.model
  assert (m.image_size, m.pos_table_size, m.normalization) == (256, 8, 'imagenet')
  model = nnx.eval_shape(lambda: RSICRC(m, rngs=nnx.Rngs(0)))
  assert count_params(model.encoder.backbone) == tower
  unused_values = 3 * (2048 * 2048 + 4096 * 2048)
  assert count_params(model) == reference_total - unused_values
  assert count_params(model, trainable_filter(True, name)) == reference_trainable - unused_values
  assert count_params(model) - count_params(model, trainable_filter(True, name)) == (
      64 * 3 * 7 * 7 + 2 * 64)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('torchvision') is None,
                    reason='torchvision not installed')
@pytest.mark.parametrize('name', ['resnet50', 'resnet101'])
def test_full_resnet_matches_torchvision(name):
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.models import backbone  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = getattr(torchvision.models, name)(weights=None).eval()
  x = torch.randn(1, 3, 256, 256)
  with torch.no_grad():
    feat = torch.nn.Sequential(*list(ref.children())[:-2])(x)
  config = levir.get_config(f'backbone={name}')
  net = backbone.build(config.model, rngs=nnx.Rngs(0))
  weights.import_torchvision_backbone(net, {k: v.numpy() for k, v in ref.state_dict().items()})
  out = nnx.jit(lambda m, x: m(x))(net, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert out.shape == (1, 8, 8, 2048)
  assert_close(out, feat.numpy().transpose(0, 2, 3, 1), rtol=1e-4, name=f'{name} features')


# BatchNorm inputs whose mean is 30 standard deviations from 0 (where float32 loses the most),
# three channels with their own spread, and per-channel affine parameters.
BN_SCALE, BN_BIAS = np.array([1.5, -0.7, 0.2]), np.array([0.1, 2.0, -3.0])


def _far_from_zero(seed, shape):
  rng = np.random.default_rng(seed)
  return rng, (30.0 + rng.standard_normal(shape) * np.array([1.0, 0.5, 2.0])).astype(np.float32)


def _bn_with(scale, bias, **kwargs):
  from rsicrc_jax.models.layers import BatchNorm
  bn = BatchNorm(3, **kwargs)
  bn.scale.set_value(jnp.asarray(scale, jnp.float32))
  bn.bias.set_value(jnp.asarray(bias, jnp.float32))
  return bn


def _normalise64(x, mean, var, scale=BN_SCALE, bias=BN_BIAS):
  """(rows, 3) float64: PyTorch's BatchNorm formula with the given statistics."""
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def test_batchnorm_against_float64_pytorch_semantics():
  """Train mode normalises by the biased batch variance and moves the running variance by the
  unbiased one (PyTorch's rule); eval mode uses the running statistics."""
  _, x = _far_from_zero(0, (4, 5, 5, 3))
  bn = _bn_with(BN_SCALE, BN_BIAS, use_running_average=False)
  y = np.asarray(bn(jnp.asarray(x)), np.float64)

  x64 = x.astype(np.float64).reshape(-1, 3)
  mean, var = x64.mean(0), x64.var(0)
  np.testing.assert_allclose(y, _normalise64(x64, mean, var).reshape(x.shape),
                             atol=4e-5)  # float32: ~1.3e-5 here
  running_mean, running_var = 0.1 * mean, 0.9 + 0.1 * x64.var(0, ddof=1)
  np.testing.assert_allclose(bn.mean[...], running_mean, rtol=1e-6)
  np.testing.assert_allclose(bn.var[...], running_var, rtol=1e-6)

  bn.use_running_average = True
  y = np.asarray(bn(jnp.asarray(x)), np.float64)
  expected = _normalise64(x64, running_mean, running_var)
  np.testing.assert_allclose(y, expected.reshape(x.shape), atol=4e-5)


def test_batchnorm_train_gradients_against_float64():
  """The train-mode backward on the same far-from-zero activations, against float64: the scale
  and bias gradients, and the input gradient (PyTorch's closed form in float64, itself checked
  by central differences of the forward). Computing y as x * a + b (a, b per channel, PyTorch's
  forward) and differentiating that misses these bounds ~8x: the scale's gradient becomes
  sum(dy * x) - mean * sum(dy)."""
  rng, x = _far_from_zero(1, (8, 4, 4, 3))
  w = rng.standard_normal(x.shape)  # dL/dy for L = sum(y * w)

  def loss(x, scale, bias):
    return jnp.sum(_bn_with(scale, bias, use_running_average=False)(x) * w.astype(np.float32))
  gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(
      jnp.asarray(x), jnp.asarray(BN_SCALE, jnp.float32), jnp.asarray(BN_BIAS, jnp.float32))

  x64, w64 = x.astype(np.float64).reshape(-1, 3), w.reshape(-1, 3)
  invstd = 1 / np.sqrt(x64.var(0) + 1e-5)
  xhat = (x64 - x64.mean(0)) * invstd
  dy = w64 * BN_SCALE
  want_x = (invstd * (dy - dy.mean(0) - xhat * (dy * xhat).mean(0))).reshape(x.shape)
  loss64 = lambda x: np.sum(_normalise64(x, x.mean(0), x.var(0)) * w64)
  for idx in [(0, 0), (37, 1), (127, 2), (90, 2)]:
    h = np.zeros_like(x64)
    h[idx] = 1e-5
    numeric = (loss64(x64 + h) - loss64(x64 - h)) / 2e-5
    np.testing.assert_allclose(want_x.reshape(-1, 3)[idx], numeric, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(gs, (xhat * w64).sum(0), atol=1.5e-4)  # float32 here: ~5e-5
  np.testing.assert_allclose(gb, w64.sum(0), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(gx, want_x, atol=6e-6)  # float32 here: ~2e-6
