"""Train RSICRC.

  python launch.py --config configs/demo.py [--workdir runs/demo] [--config.batch_size=64 ...]

Relaunching the same command resumes from the workdir's last checkpoint. Ctrl-C (SIGINT) or
SIGTERM saves a checkpoint at the current step and stops (exit status 130 or 143); checkpoints
are also saved every config.checkpoint.every_minutes. Logs show warnings only; --verbosity=0
brings back INFO. Multi-host: start one process per host with the JAX coordinator settings
(--coordinator_address, --num_processes, --process_id), or none on a cluster that JAX detects by
itself.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from rsicrc_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config (a get_config() file).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the best model go here '
                               '(default: runs/<config file name>).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for '
                                   'multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-process run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  import jax  # pylint: disable=import-outside-toplevel
  if _COORDINATOR.value:
    if jax.config.jax_platforms in (None, '', 'cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU cross-process
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from rsicrc_jax import train  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0])
  if jax.process_index() == 0:
    print(f'workdir {workdir}: {jax.device_count()} devices over {jax.process_count()} '
          'processes', flush=True)
  from rsicrc_jax import preemption  # pylint: disable=import-outside-toplevel
  try:
    result = train.train_and_evaluate(config, workdir)
  except preemption.Preempted as stop:
    if jax.process_index() == 0:
      print(stop, flush=True)
    sys.exit(stop.exit_code)
  if jax.process_index() == 0:
    best = 'none' if result.best_value is None else f'{result.best_value:.4f}'
    print(f'done: step {result.final_step}, best {result.best_metric} {best}; '
          f'best model in {os.path.join(workdir, "best")}', flush=True)
    if config.final_eval:  # the paper's metrics for the best checkpoint (config.eval.split)
      from rsicrc_jax import eval as rsicrc_eval  # pylint: disable=import-outside-toplevel
      rsicrc_eval.evaluate(config, os.path.join(workdir, 'best'),
                           out_dir=os.path.join(workdir, f'eval_{config.eval.split}'))


if __name__ == '__main__':
  cli.use_transparent_huge_pages()
  cli.run(main)
