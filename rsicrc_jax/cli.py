"""What every rsicrc_jax command shares: --help exits 0; a bad flag or config value is one line
naming it (exit 2); a known failure is one line (exit 1), not a traceback; logs are quiet unless
--verbosity asks for more.

  cli.run(main)   # in place of absl's app.run(main)
"""

from __future__ import annotations

import logging as std_logging
import os
import platform
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--helpxml')

# Exit statuses: 2 = the command line or the config is wrong (as argparse does); 1 = a failure
# the message explains (data, checkpoint, workdir).
USAGE_ERROR, FAILURE = 2, 1


class ConfigError(ValueError):
  """A config field has a value the code cannot use; the message names the field."""


def _known_failures() -> tuple[type[BaseException], ...]:
  # Imported here: the command's own imports decide when JAX and friends load.
  from rsicrc_jax import checkpointing, weights  # pylint: disable=import-outside-toplevel
  from rsicrc_jax.data import captions  # pylint: disable=import-outside-toplevel
  return (checkpointing.TrainingError, captions.DataError, weights.CheckpointError,
          FileNotFoundError, FileExistsError, ValueError)


def quiet_third_party_logs() -> None:
  """TensorFlow's C++ notices (oneDNN, CUDA probing) and OpenCV's plugin lines; must run before
  they are imported. An explicit setting in the environment wins."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # TensorFlow only reads records and writes TensorBoard here; its oneDNN kernels would only
  # announce themselves (on stderr, before any log level applies).
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  os.environ.setdefault('OPENCV_LOG_LEVEL', 'ERROR')
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')


HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def huge_pages_on(environ: dict[str, str] | None = None) -> bool:
  """Whether glibc's malloc in this process (or under `environ`) asks for huge pages."""
  environ = os.environ if environ is None else environ
  return HUGE_PAGES_TUNABLE in environ.get('GLIBC_TUNABLES', '').split(':')


def huge_pages_environment(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with so that glibc's malloc asks for transparent huge pages,
  or None where that is already set, opted out of, or unavailable (not Linux, glibc older than
  2.35, THP disabled)."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if sys.platform != 'linux' or 'glibc.malloc.hugetlb' in tunables:
    return None
  lib, version = platform.libc_ver()
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='ascii') as f:
      thp = f.read()
    new_enough = lib == 'glibc' and tuple(map(int, version.split('.')[:2])) >= (2, 35)
  except (OSError, ValueError):
    return None
  if not new_enough or '[never]' in thp:
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))


def use_transparent_huge_pages() -> None:
  """Re-executes this process once, the same command line, with glibc's malloc asking for
  transparent huge pages. Call it first thing in a command's `__main__` (never in a library).

  XLA:CPU allocates each step's temporaries afresh. With 4 KiB pages every step then costs ~59K
  minor page faults: a 23-minute demo run spent 500 s in the kernel on 195M of them. With
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, read only at process start) a step
  costs ~600 (the levir step at batch 4: ~2K instead of 439K, and 0.4-1.5 s of system time
  instead of ~2 s). The results are the same; to opt out, set GLIBC_TUNABLES=glibc.malloc.hugetlb=0.
  """
  env = huge_pages_environment(dict(os.environ))
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m module` and interpreter options, which sys.argv has lost.
    try:
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot re-execute (e.g. no sys.executable): run on with 4 KiB pages
      pass


# Warnings that say nothing to a user: TFDS announcing the builder config our pipeline passes it
# and probing a dataset folder before building it; Orbax looking for a step-level metadata file
# inside a model dir's state/ folder, and noting a one-second wait for its previous save.
_NOISE = ('Using custom data configuration', 'Variant folder', 'Metadata file does not exist',
          'Waiting for previous save to complete')


class _DropNoise(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE)


def drop_noise_warnings() -> None:
  """Drops the warnings above from absl's log (also for scripts that call a command's main)."""
  std_logging.getLogger('absl').addFilter(_DropNoise())


def ignore_closed_event_loop_errors() -> None:
  """After a failed Orbax restore (a damaged checkpoint), TensorStore reads still in flight
  finish on their own threads and try to wake Orbax's event loop, which is closed by then, and
  the sibling reads' coroutines are dropped with their own read errors. Each prints a traceback
  through sys.unraisablehook (thousands for one damaged file). The failure itself is reported
  in one line, so these go."""
  previous = sys.unraisablehook

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if ((isinstance(unraisable.exc_value, RuntimeError) and text == 'Event loop is closed')
        or 'Encountered error while reading array index' in text
        or _from_orbax_read(unraisable.exc_traceback)):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  # The same leftovers can also arrive as asyncio's 'exception was never retrieved' log records.
  std_logging.getLogger('asyncio').addFilter(_DropOrbaxReadErrors())


def _from_orbax_read(tb) -> bool:
  """Whether a traceback passes through Orbax's per-shard array read."""
  while tb is not None:
    if tb.tb_frame.f_code.co_name == '_read_array_index_and_device_put':
      return True
    tb = tb.tb_next
  return False


class _DropOrbaxReadErrors(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and (_from_orbax_read(exc.__traceback__) or
                                     'Encountered error while reading array index' in str(exc)))


def _flag_error(argv: Sequence[str], err: Exception) -> str:
  """One line for a flag that failed to parse: the argument at fault and why."""
  if isinstance(err, (AttributeError, KeyError)):
    while err.__context__ is not None and isinstance(err.__context__, (AttributeError, KeyError)):
      err = err.__context__  # ml_collections wraps its did-you-mean KeyError in AttributeError
    text = str(err).strip('"\'')
    key = text.split("'")[1] if "'" in text else text.split()[0]
    culprit = next((a for a in argv[1:] if a.startswith('--') and
                    a.split('=', 1)[0].endswith(f'.{key}')), None)
    hint = text.splitlines()[-1].strip() if 'Did you mean' in text else ''
    text = f'no such config field {key!r}' + (f' ({hint})' if hint else '')
    return f'{culprit}: {text}' if culprit else text
  text = str(err)
  if 'Traceback (most recent call last)' in text:  # get_config raised: its message, no frames
    head = text.split('Traceback (most recent call last)')[0]
    text = f'{head} {[l for l in text.splitlines() if l.strip()][-1]}'
  return ' '.join(text.split())


def _config_load_error(err: OSError) -> str:
  """ml_collections defers a config file that failed to load until its first use."""
  lines = [l.strip() for l in str(err).splitlines() if l.strip()]
  return f'the config file could not be loaded: {lines[-1] if lines else err}'


def _parse_flags(argv: list[str]) -> list[str]:
  if any(a in HELP_FLAGS for a in argv[1:]):
    app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True, exitcode=0)
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:
      getattr(flags.FLAGS[name].value, 'keys', None)  # a config that failed to load raises here
  except OSError as err:
    _usage_error(_config_load_error(err))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
    _usage_error(_flag_error(argv, err))
  return rest


def _usage_error(message: str) -> None:
  print(f'error: {message}\n(--help lists the flags)', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
  """absl's app.run with the behaviour above. Verbosity defaults to warnings; pass
  --verbosity=0 (or 1) for INFO (or DEBUG) logs."""
  quiet_third_party_logs()
  ignore_closed_event_loop_errors()
  argv = list(sys.argv if argv is None else argv)
  if not any(a.startswith(('--verbosity', '-v=', '--v=')) for a in argv[1:]):
    argv.insert(1, '--verbosity=-1')
    drop_noise_warnings()

  def wrapped(args):
    try:
      return main(args)
    except app.UsageError as err:
      _usage_error(str(err))
    except ConfigError as err:
      logging.info('config error', exc_info=True)
      print(f'error: {err}', file=sys.stderr)
      sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      sys.exit(128 + 2)  # as a shell reports SIGINT
    except _known_failures() as err:
      logging.info('failure', exc_info=True)  # the traceback, for --verbosity=0
      print(f'error: {err}', file=sys.stderr)
      sys.exit(FAILURE)

  app.run(wrapped, argv=argv, flags_parser=_parse_flags)


def run_plain(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """For argparse commands (`rsicrc_jax.predict`, whose subcommands each have their own
  --help): the same exit statuses and one-line failures as `run`."""
  quiet_third_party_logs()
  ignore_closed_event_loop_errors()
  drop_noise_warnings()
  try:
    main(list(sys.argv[1:] if argv is None else argv))
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(128 + 2)
  except _known_failures() as err:
    print(f'error: {err}', file=sys.stderr)
    sys.exit(FAILURE)
  sys.exit(0)
