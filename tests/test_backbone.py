"""The ModifiedResNet tower against OpenCLIP's own implementation, and the model's size."""

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
from rsicrc_jax.models.backbone import ModifiedResNet

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
  x = jnp.asarray(fx['input'].transpose(0, 2, 3, 1))
  run = nnx.jit(lambda m, x: m(x))
  assert_close(run(net, x), fx['eval_features'].transpose(0, 2, 3, 1), name='eval features')
  net.train()
  assert_close(run(net, x), fx['train_features'].transpose(0, 2, 3, 1), name='train features')
  stats = weights.to_torch_state_dict(nnx.state(net, nnx.BatchStat),
                                      key_fn=weights.openclip_backbone_key, conv_prefixes=((),))
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
