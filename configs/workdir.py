"""The config a training run saved in its workdir, as a config file:

  --config=configs/workdir.py:runs/demo     (what `python -m rsicrc_jax.eval --workdir` uses)

so `--config.eval.beam_size=3` and other overrides apply to it. Fields that the run's version of
the code did not save yet (`config.eval`) get today's defaults.
"""

import json
import os

import ml_collections

from configs import levir


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir?')
  with open(path, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  settings = levir.get_eval_config()
  settings.update(config.get('eval', {}))
  config.eval = settings
  return config
