"""Stop requests (SIGTERM, SIGINT) that every process of a run agrees on, so the run saves once and exits.

Why a class of its own:
- Ctrl-C used to raise KeyboardInterrupt at an arbitrary point (inside a prefetch thread's join, an orbax
  write, a collective), which aborted the process with `terminate called without an active exception` and no
  checkpoint. Here both signals only set a flag; the loop polls it once per step, at a point where saving is safe.
- A signal may reach only some processes of a multi-process run (a scheduler signalling one host, Ctrl-C in one
  terminal), or reach them at different steps. The checkpoint save is collective, so a process that stops alone
  would leave the others waiting in their next step's collective forever. `should_stop(step)` therefore gathers
  every process's request (one int each) and answers the same for all of them, at the same step.
- A second signal while the checkpoint is being written is ignored (with a note on stderr): interrupting orbax
  mid-write is what leaves a half-written step behind.

Exit codes (see `exit_code`): SIGTERM -> 0, which is what preemptible schedulers expect after a clean save;
SIGINT -> 130 (128 + 2, the shell's code for "interrupted"), so `vidlm train ... && vidlm eval ...` does not go on
to evaluate a run the user interrupted. The checkpoint is saved in both cases.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Install SIGTERM/SIGINT handlers for a `with` block; `should_stop(step)` is agreed across processes.

    with StopRequest() as stop:
      for step in ...:
        ...                       # one training step
        if stop.should_stop(step):  # every process must call this at every step (it is a collective if >1 process)
          save(step); break
    stop.exit_code                # 0 (SIGTERM), 130 (SIGINT) or None (no stop)

  With one process the check reads a flag and costs nothing. With several it is one `process_allgather` of one
  int32 per step; the training loop already syncs with the host every step (it reads the loss), so this adds a tiny
  collective and no extra pipeline stall.
  """

  def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, *, sync: bool | None = None):
    self.signals = tuple(signals)
    # None: gather across processes only when there is more than one
    self.sync = jax.process_count() > 1 if sync is None else sync
    self.local_signal: int | None = None  # first signal this process received
    self.signal: int | None = None  # the agreed signal, once should_stop has returned True
    self.signal_process: int | None = None  # the lowest process index that received it
    self.stop_step: int | None = None
    self._previous: dict[int, object] = {}
    self._stopping = False

  # -- handlers ------------------------------------------------------------------------------------

  def __enter__(self) -> StopRequest:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()

  def install(self) -> StopRequest:
    """Route the stop signals to this object (the previous handlers are kept for `restore`)."""
    if threading.current_thread() is not threading.main_thread():
      # signal.signal only works in the main thread; a run driven from another thread keeps the default handlers
      # (the other processes are still asked every step, so a signal received by them still stops this one)
      log.warning("stop handlers not installed: training is not running in the main thread")
      return self
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    """Put back the handlers that were installed before `install`."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if self.local_signal is None:
      self.local_signal = signum
      # os.write, not print: a handler may run while the main thread is inside a print to the same stream
      os.write(2, f"{name} received: saving a checkpoint at the end of this step, then exiting\n".encode())
    else:
      what = "the checkpoint is being saved" if self._stopping else "a checkpoint will be saved at the end of this step"
      os.write(2, f"{name} received again: ignored, {what} (kill -9 aborts without saving)\n".encode())

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Ask for a stop as if `signum` had arrived (for notebooks and tests)."""
    if self.local_signal is None:
      self.local_signal = signum

  # -- the agreed decision ---------------------------------------------------------------------------

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any process has been asked to stop.

    Call it at the same point of every step on every process: with several processes it is a collective.
    """
    if self._stopping:
      return True
    local = np.int32(self.local_signal or 0)
    if self.sync:
      flags = np.asarray(multihost_utils.process_allgather(local)).reshape(-1)  # [num_processes]
    else:
      flags = local.reshape(1)
    asked = np.flatnonzero(flags)
    if not asked.size:
      return False
    # every process sees the same gathered flags, so every process picks the same signal and step
    self.signal_process = int(asked[0])
    self.signal = int(flags[asked[0]])
    self.stop_step = step
    self._stopping = True
    return True

  @property
  def signal_name(self) -> str | None:
    return None if self.signal is None else signal.Signals(self.signal).name

  @property
  def exit_code(self) -> int | None:
    """0 after SIGTERM (a clean preemption), 130 after SIGINT (the user interrupted), None when not stopped."""
    if self.signal is None:
      return None
    return 130 if self.signal == signal.SIGINT else 0

  def describe(self) -> str:
    """One line naming the signal, who received it and the step, e.g. for the log and stdout."""
    who = f" (by process {self.signal_process})" if self.sync else ""
    return f"{self.signal_name} received{who}: checkpoint saved at step {self.stop_step}"
