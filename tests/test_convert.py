"""Weight conversion: the CLI end to end, and every kind of bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs import levir, reference_tiny
from rsicrc_jax import convert, model_io, predict, weights
from rsicrc_jax.models.modified_resnet import ModifiedResNet

from conftest import FIXTURES, assert_close, nhwc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'rsicrc_jax.convert', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture
def state_npz(tmp_path, reference_state):
  path = tmp_path / 'model_best.npz'
  np.savez(path, **reference_state)
  return str(path)


def test_cli_rsicrc_end_to_end(tmp_path, state_npz, reference):
  out = tmp_path / 'converted'
  res = _cli('rsicrc', state_npz, '--config', 'configs/reference_tiny.py', '--out', str(out))
  assert res.returncode == 0, res.stderr
  model = model_io.load_model(str(out))
  vis_emb, _ = nnx.jit(lambda m, a, b: m.encode_images(a, b))(
      model, nhwc(reference['input/img_before']), nhwc(reference['input/img_after']))
  assert_close(vis_emb, reference['eval/vis_emb'], name='vis_emb after convert + load')
  assert sorted(os.listdir(tmp_path)) == ['converted', 'model_best.npz']  # no temp leftovers


def test_vocab_is_stored_with_the_weights_for_predict(tmp_path, state_npz):
  config = reference_tiny.get_config()
  vocab = {w: i for i, w in enumerate(['PAD', 'START', 'UNK', 'END'] + [
      f'w{i}' for i in range(config.model.vocab_size - 4)])}
  path = tmp_path / 'vocab.json'
  path.write_text(json.dumps(vocab))
  convert.convert_rsicrc(state_npz, config, str(tmp_path / 'm'), vocab_path=str(path))
  assert predict.find_vocabulary(str(tmp_path / 'm')) == (vocab, str(tmp_path / 'm' / 'vocab.json'))
  short = tmp_path / 'short.json'
  short.write_text(json.dumps(dict(list(vocab.items())[:5])))
  with pytest.raises(ValueError, match=f'has 5 words but config.model.vocab_size is '
                     f'{config.model.vocab_size}'):
    convert.convert_rsicrc(state_npz, config, str(tmp_path / 'n'), vocab_path=str(short))
  assert not os.path.exists(tmp_path / 'n')


def test_cli_reports_errors_and_writes_nothing(tmp_path, reference_state):
  bad = dict(reference_state)
  del bad['encoder.att_pool.in_proj_bias']
  np.savez(tmp_path / 'bad.npz', **bad)
  out = tmp_path / 'out'
  res = _cli('rsicrc', str(tmp_path / 'bad.npz'), '--config', 'configs/reference_tiny.py',
             '--out', str(out))
  assert res.returncode == 1
  assert "missing key 'encoder.att_pool.in_proj_bias'" in res.stderr
  assert not out.exists() and os.listdir(tmp_path) == ['bad.npz']


def _convert_error(tmp_path, state, config=None):
  path = tmp_path / 'ckpt.npz'
  np.savez(path, **state)
  out = tmp_path / 'out'
  with pytest.raises(weights.CheckpointError) as e:
    convert.convert_rsicrc(str(path), config or reference_tiny.get_config(), str(out))
  assert not out.exists()
  assert [p for p in os.listdir(tmp_path) if p != 'ckpt.npz'] == []
  return str(e.value)


def test_unexpected_key(tmp_path, reference_state):
  state = dict(reference_state, **{'encoder.extra.weight': np.zeros((2, 3), np.float32)})
  msg = _convert_error(tmp_path, state)
  assert "unexpected keys in the checkpoint: 'encoder.extra.weight' (2, 3)" in msg


def test_shape_mismatch_names_key_expected_and_found(tmp_path, reference_state):
  state = dict(reference_state)
  state['decoder.uni_decoder.0.ff_linear1.weight'] = np.zeros((128, 64), np.float32)
  msg = _convert_error(tmp_path, state)
  assert 'decoder.uni_decoder.0.ff_linear1.weight: expected shape (256, 64), found (128, 64)' in msg


def test_wrong_config_is_a_shape_mismatch(tmp_path, reference_state):
  config = reference_tiny.get_config()
  config.model.vocab_size = 31
  msg = _convert_error(tmp_path, reference_state, config)
  assert 'decoder.tokens_embed.weight: expected shape (31, 64), found (30, 64)' in msg


def test_position_table_with_other_values_says_what_differs(tmp_path, reference_state):
  """The reference's `pe` buffer has the right shape but not the sinusoidal values: the error says
  so, with the largest difference, where it is, and the tolerance (not 'expected shape S, found
  shape S')."""
  state = dict(reference_state)
  pe = np.array(state['decoder.position_encoding.pe'])
  pe[0, 3, 5] += 0.25
  pe[0, 7, 1] += 1e-3
  state['decoder.position_encoding.pe'] = pe
  msg = _convert_error(tmp_path, state)
  assert f'the shape {pe.shape} is right but the values are not the sinusoidal table' in msg
  assert 'max |difference| 0.25 (tolerance 1e-05) at position 3, dimension 5' in msg
  assert '2 of' in msg and 'values differ' in msg
  state['decoder.position_encoding.pe'] = pe[:, :5]
  msg = _convert_error(tmp_path, state)
  assert 'expected the sinusoidal table of shape' in msg and f'found {pe[:, :5].shape}' in msg


def test_untied_head_with_tied_config(tmp_path, reference_state):
  state = dict(reference_state)
  state['decoder.lm_head.weight'] = state['decoder.lm_head.weight'] + 1.0
  assert 'tie_embeddings' in _convert_error(tmp_path, state)


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all', 'truncated'])
def test_unreadable_files(tmp_path, state_npz, content):
  if content == 'truncated':
    with open(state_npz, 'rb') as f:
      content = f.read()[:5000]
  path = tmp_path / 'broken.npz'
  path.write_bytes(content)
  with pytest.raises(weights.CheckpointError, match='broken.npz: not a readable .npz'):
    weights.load_torch_state_dict(str(path))
  with pytest.raises(weights.CheckpointError, match='no such file'):
    weights.load_torch_state_dict(str(tmp_path / 'absent.pt'))


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch not installed')
def test_pt_files(tmp_path, reference_state):
  import torch  # pylint: disable=import-outside-toplevel
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in reference_state.items()},
             tmp_path / 'model_best.pt')
  loaded = weights.load_torch_state_dict(str(tmp_path / 'model_best.pt'))
  assert set(loaded) == set(reference_state)
  np.testing.assert_array_equal(loaded['encoder.img_queries'],
                                reference_state['encoder.img_queries'])
  (tmp_path / 'cut.pt').write_bytes((tmp_path / 'model_best.pt').read_bytes()[:3000])
  with pytest.raises(weights.CheckpointError, match='cut.pt: not a readable PyTorch checkpoint'):
    weights.load_torch_state_dict(str(tmp_path / 'cut.pt'))


def test_remoteclip_conversion(tmp_path):
  with np.load(os.path.join(FIXTURES, 'openclip_modified_resnet_tiny.npz')) as d:
    state = {k[6:]: d[k] for k in d.files if k.startswith('state/')}
    layers, width = tuple(d['layers'].tolist()), int(d['width'])
  state['transformer.resblocks.0.attn.in_proj_weight'] = np.zeros((6, 2), np.float32)  # text tower
  np.savez(tmp_path / 'clip.npz', **state)
  config = levir.get_config()
  config.model.backbone_layers, config.model.backbone_width = layers, width
  arrays = convert.convert_remoteclip(str(tmp_path / 'clip.npz'), config, str(tmp_path / 'rn.npz'))
  net = ModifiedResNet(layers, width, rngs=nnx.Rngs(1))
  with np.load(tmp_path / 'rn.npz') as f:
    weights.load_flat_arrays(net, dict(f), 'rn.npz')
  np.testing.assert_array_equal(np.asarray(net.layer2[0].conv2.kernel[...]),
                                state['visual.layer2.0.conv2.weight'].transpose(2, 3, 1, 0))
  assert len(arrays) == len([k for k in state if k.startswith('visual.') and 'attnpool' not in k
                             and 'num_batches' not in k])
  # A non-CLIP file, and the wrong architecture, fail without writing.
  np.savez(tmp_path / 'other.npz', foo=np.zeros(1))
  with pytest.raises(weights.CheckpointError, match='other.npz: no "visual.' + '\\*"'):
    convert.convert_remoteclip(str(tmp_path / 'other.npz'), config, str(tmp_path / 'x.npz'))
  assert not (tmp_path / 'x.npz').exists()
  with pytest.raises(weights.CheckpointError, match='expected shape'):
    convert.convert_remoteclip(str(tmp_path / 'clip.npz'), levir.get_config(),
                               str(tmp_path / 'rn50.npz'))
  assert not (tmp_path / 'rn50.npz').exists()


def test_load_model_with_mismatched_config_fails_clearly(tmp_path, state_npz):
  config = reference_tiny.get_config()
  convert.convert_rsicrc(state_npz, config, str(tmp_path / 'm'))
  with pytest.raises(FileExistsError, match='already exists'):
    convert.convert_rsicrc(state_npz, config, str(tmp_path / 'm'))
  config.model.vocab_size = 31
  with pytest.raises(ValueError, match='do not match config.model'):
    model_io.load_model(str(tmp_path / 'm'), config.model)
  with pytest.raises(FileNotFoundError, match='not a model directory'):
    model_io.load_model(str(tmp_path))
