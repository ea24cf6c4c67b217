"""The command lines as a person meets them: --help, typos, bad values, wrong files."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import demo, levir
from rsicrc_jax import config_check
from rsicrc_jax.cli import ConfigError
from rsicrc_jax.metric_writer import MetricWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize('command', [['launch.py'], ['-m', 'rsicrc_jax.eval'],
                                     ['-m', 'rsicrc_jax.convert']])
def test_help_exits_zero_and_shows_usage(command):
  out = run(*command, '--help')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'usage' in out.stdout.lower() or 'python ' in out.stdout
  assert '--config' in out.stdout


@pytest.mark.parametrize('flag, message', [
    ('--config.nonexistent=1', "--config.nonexistent=1: no such config field 'nonexistent'"),
    ('--config.model.dropot=0.2', "--config.model.dropot=0.2: no such config field 'dropot'"),
    ('--config.batch_size=abc', "--config.batch_size=abc: invalid literal for int()"),
])
def test_config_typos_give_one_line_and_exit_2(tmp_path, flag, message):
  out = run('launch.py', '--config=configs/demo.py', f'--workdir={tmp_path}/w', flag)
  assert out.returncode == 2
  assert out.stderr.startswith('error: ') and message in out.stderr, out.stderr
  assert 'Traceback' not in out.stderr and len(out.stderr.splitlines()) == 2
  assert not os.path.exists(tmp_path / 'w')


def test_a_bad_value_is_refused_before_anything_is_written(tmp_path):
  out = run('launch.py', '--config=configs/demo.py', f'--workdir={tmp_path}/w',
            '--config.batch_size=-3', '--config.lr_schedule=cos',
            '--config.data.caption_pad_multiple=-8')
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == ("error: config.batch_size=-3: expected a positive integer; "
                                "config.lr_schedule='cos': expected 'constant' or 'cosine'; "
                                "config.data.caption_pad_multiple=-8: expected an integer >= 0 "
                                "(0 = pad captions to max_len)")
  assert not os.path.exists(tmp_path / 'w')


def test_a_missing_config_file_is_one_line():
  out = run('launch.py', '--config=configs/no_such_config.py')
  assert out.returncode == 2
  assert "No such file or directory: 'configs/no_such_config.py'" in out.stderr
  assert 'Traceback' not in out.stderr


def test_convert_says_when_a_file_is_not_a_checkpoint(tmp_path):
  page = tmp_path / 'RemoteCLIP-RN50.pt'
  page.write_text('<!DOCTYPE html><html><body>Repository not found</body></html>')
  out = run('-m', 'rsicrc_jax.convert', 'remoteclip', str(page), f'--out={tmp_path}/rn50.npz')
  assert out.returncode == 1
  assert out.stderr.strip() == (
      f"error: {page}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; "
      "it starts with text: '<!DOCTYPE html><html><body>Repository no')")
  assert not os.path.exists(tmp_path / 'rn50.npz')


def test_every_rule_names_a_field_the_configs_have():
  """A misspelt rule would silently check nothing."""
  c = levir.get_config()
  for field, _, _ in config_check.RULES:
    config_check._get(c, field)  # pylint: disable=protected-access
  for get_config in (levir.get_config, demo.get_config):
    config_check.validate(get_config())


def test_validate_names_every_bad_field():
  c = demo.get_config()
  c.model.dropout = 1.5
  c.loss.top_k = 0
  c.data.name = 'levir'
  c.data.cache_mb = -1
  c.model.a_dim = 190  # not a multiple of 4 heads: only reported once the rest is right
  with pytest.raises(ConfigError) as err:
    config_check.validate(c)
  assert str(err.value) == (
      "config.model.dropout=1.5: expected a number in [0, 1); config.loss.top_k=0: expected -1 "
      "(all) or a positive integer; config.data.cache_mb=-1: expected a number of MB >= 0 (0 "
      "= no cache); config.data.name='levir': unknown dataset 'levir', expected "
      "one of ['levir_cc', 'levir_mci', 'whu_cdc', 'dubai_cc', 'second_cc', 'change_captions', "
      "'synthetic_cc'], or several as \"levir_cc:3,whu_cdc:1\"")
  c.model.dropout, c.loss.top_k, c.data.name, c.data.cache_mb = 0.1, -1, 'synthetic_cc', 0
  with pytest.raises(ConfigError, match=r'config.model.a_dim=190: expected a multiple of '
                     r'config.model.num_heads=4'):
    config_check.validate(c)
  c.model.a_dim = 192
  c.evals.val_caption.beam_size = 0
  with pytest.raises(ConfigError, match=r'config.evals.val_caption.beam_size: expected >= 1'):
    config_check.validate(c)


def test_config_variants_set_the_papers_ablations():
  c = levir.get_config('backbone=ViT-L-14,fna_off,topk=8')
  m = c.model
  assert (m.backbone, m.vit_width, m.vit_layers, m.vit_heads, m.vit_patch_size) == (
      'ViT-L-14', 1024, 24, 16, 14)
  assert m.pos_table_size == 16 and m.image_size == 224  # the 16x16 feature map
  assert (c.loss.fne, c.loss.fna, c.loss.top_k, c.loss.lamb) == (True, False, 8, 0.5)
  c = levir.get_config('no_fne, caption_only')
  assert (c.loss.fne, c.loss.fna, c.loss.lamb, c.model.backbone) == (False, False, 0.0, 'RN50')
  for variant in levir.VARIANTS:  # every documented variant parses and passes the checks
    config_check.validate(levir.get_config(variant.replace('=NAME', '=ViT-B-32')
                                           .replace('=K', '=4').replace('=N', '=2')))
  assert levir.get_config('hd=2,topk=4').hard_negatives == 2
  for bad in ('backbone=ViT-L-15', 'topk=0', 'fna_off=1', 'hd', 'hd=-1'):
    with pytest.raises(ValueError, match=f'config variant {bad!r}: expected backbone=NAME'):
      levir.get_config(bad)


def test_a_bad_config_variant_is_one_line(tmp_path):
  out = run('launch.py', '--config=configs/levir.py:backbone=ViT-L-15', f'--workdir={tmp_path}/w')
  assert out.returncode == 2
  assert "config variant 'backbone=ViT-L-15': expected backbone=NAME" in out.stderr
  assert 'Traceback' not in out.stderr and len(out.stderr.splitlines()) == 2
  assert not os.path.exists(tmp_path / 'w')


def test_vit_fields_are_checked():
  c = levir.get_config('backbone=ViT-B-32')
  c.model.image_size = 200
  c.model.vit_heads = 5
  with pytest.raises(ConfigError) as err:
    config_check.validate(c)
  assert str(err.value) == (
      'config.model.image_size=200: expected a multiple of config.model.vit_patch_size=32; '
      'config.model.vit_width=768: expected a multiple of config.model.vit_heads=5')
  c = levir.get_config('backbone=ViT-L-14')
  c.model.pos_table_size = 7
  with pytest.raises(ConfigError, match=r'pos_table_size=7: expected >= 16, the ViT feature-map'):
    config_check.validate(c)
  c.model.backbone = 'ViT-G-99'
  with pytest.raises(ConfigError, match=r"config.model.backbone='ViT-G-99': expected one of RN50"):
    config_check.validate(c)


def test_a_workdir_from_before_the_backbone_field_resumes_as_rn50():
  """Runs saved before config.model.backbone, vit_* and the builder config's stored_size and raw
  existed stay resumable; the backbone size fields only count for the family in use."""
  from rsicrc_jax import checkpointing  # pylint: disable=import-outside-toplevel
  new = levir.get_config()
  old = new.to_dict()
  for k in ('backbone', 'vit_width', 'vit_layers', 'vit_heads', 'vit_patch_size',
            'vit_quick_gelu'):
    del old['model'][k]
  del old['data']['builder_config']['stored_size'], old['data']['builder_config']['raw']
  fingerprint = checkpointing.resume_fingerprint
  assert fingerprint(ml_collections.ConfigDict(old)) == fingerprint(new)
  vit = levir.get_config('backbone=ViT-B-32')
  assert fingerprint(vit) != fingerprint(new)
  changed = levir.get_config('backbone=ViT-B-32')
  changed.model.backbone_width = 32  # not the ViT's: no difference
  assert fingerprint(changed) == fingerprint(vit)
  changed.model.vit_layers = 6
  assert fingerprint(changed) != fingerprint(vit)


def test_metric_writer_drops_rows_after_the_resumed_step(tmp_path):
  """Rows written after the checkpoint a run resumes from (and a row cut short by a kill) go;
  the rest stay byte for byte."""
  rows = [{'step': s, 'split': 'train', 'loss': 1.0 / s} for s in (1, 2, 3, 4)]
  text = ''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 5, "spl'
  (tmp_path / 'metrics.jsonl').write_text(text)
  writer = MetricWriter(str(tmp_path), console=False, resume_step=2)
  writer._jsonl.write(json.dumps({'step': 3, 'split': 'train', 'loss': 0.5}) + '\n')  # pylint: disable=protected-access
  writer._jsonl.close()  # pylint: disable=protected-access
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert lines[:2] == text.splitlines()[:2]
  assert [json.loads(l)['step'] for l in lines] == [1, 2, 3]


def test_figures_draw_no_change_pairs_too():
  import numpy as np
  from rsicrc_jax.eval import figure_pairs
  changed = np.array([True] * 10 + [False] * 3 + [True] * 5)
  assert figure_pairs(changed, 8) == [0, 1, 2, 3, 4, 5, 10, 11]  # 2 of 8 no-change
  assert figure_pairs(changed, 2) == [0, 10]
  assert figure_pairs(changed, 1) == [0]
  assert figure_pairs(np.ones(4, bool), 3) == [0, 1, 2]
  assert figure_pairs(np.zeros(4, bool), 3) == [0, 1, 2]  # only no-change pairs: all drawn
  assert figure_pairs(changed, 40) == list(range(18))


def test_label_maps_resize_to_class_ids_and_outline_on_figures():
  """Change masks follow the images' resize and crop by nearest neighbour (class ids stay class
  ids), and eval's figures outline each class."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.eval import draw_change_mask  # pylint: disable=import-outside-toplevel
  mask = np.zeros((256, 320, 1), np.uint8)
  mask[64:128, 96:160] = 1  # road
  mask[160:224, 200:300] = 2  # building
  out = pipeline.resize_center_crop(mask, 224, nearest=True)
  assert out.shape == (224, 224, 1) and set(np.unique(out)) == {0, 1, 2}
  # 256 -> 224 rows (x 0.875), 320 -> 280 columns, then 28 columns cropped from the left.
  rows, cols = np.nonzero(out[..., 0] == 1)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (56, 111, 56, 111)
  fig, ax = plt.subplots()
  draw_change_mask(ax, out)
  assert len(ax.collections) == 2  # one outline per class
  plt.close(fig)


def test_commands_rerun_themselves_with_huge_pages(tmp_path):
  """`cli.use_transparent_huge_pages()` re-executes the same command line (`-m module`,
  interpreter options and arguments kept) with glibc's hugetlb tunable added to any already set;
  an explicit setting, including the opt-out, is left alone."""
  from rsicrc_jax import cli  # pylint: disable=import-outside-toplevel
  if cli.huge_pages_environment({}) is None:
    pytest.skip('no glibc >= 2.35 with transparent huge pages here')
  (tmp_path / 'thp_probe.py').write_text(
      'import json, os, sys\n'
      'from rsicrc_jax import cli\n'
      'cli.use_transparent_huge_pages()\n'
      'print(json.dumps([os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], sys.flags.utf8_mode]))\n')

  def probe(tunables):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    env.pop('GLIBC_TUNABLES', None)
    if tunables is not None:
      env['GLIBC_TUNABLES'] = tunables
    out = subprocess.run([sys.executable, '-X', 'utf8', '-m', 'thp_probe', 'a', '--b=c'],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

  assert probe(None) == ['glibc.malloc.hugetlb=1', ['a', '--b=c'], 1]
  assert probe('glibc.malloc.arena_max=2') == [
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', ['a', '--b=c'], 1]
  assert probe('glibc.malloc.hugetlb=0') == ['glibc.malloc.hugetlb=0', ['a', '--b=c'], 1]
