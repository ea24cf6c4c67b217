"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (what clusters and clouds send before
they preempt a job) become a request the training loop sees after the step in flight; it saves a
checkpoint at that step and raises `Preempted`, so relaunching the same command resumes there.
A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import signal
import threading

import numpy as np

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signum: int, checkpoint_dir: str):
    self.step, self.signum, self.checkpoint_dir = step, signum, checkpoint_dir
    super().__init__(f'stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved '
                     f'in {checkpoint_dir}. Run the same command again to resume from it.')

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # the shell's convention for "ended by this signal"


class StopSignals:
  """While active, SIGINT and SIGTERM set `received` (the signal number) instead of killing the
  process. Handlers can only be installed from the main thread; elsewhere this does nothing."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is not None and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.received = signum
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(f'{signal.Signals(signum).name} received: saving a checkpoint after this step, '
               'then stopping (Ctrl-C again to stop without saving)')

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      for s in STOP_SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()


def agree(*flags: bool) -> tuple[bool, ...]:
  """Each flag OR-ed over all processes, so that every process takes the same decision (to
  save, to stop) at the same step. Collective: every process must call it at the same step."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))
