"""What every randygpt command does around its work: quiet logs, the compilation cache,
short errors instead of tracebacks, and ending by the signal that stopped it."""

import contextlib
import errno
import io
import logging as pylogging
import os
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from absl import flags
from absl import logging

from randygpt.runtime import memory
from randygpt.errors import UserError


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PATIENCE_S = 3.0  # A second signal this long after the first leaves at once.
# How long a process whose collective failed waits for the launcher or its watch to end it
# (they do within seconds: docs/measurements.md, "Multi-process faults").
PEER_GRACE_S = 10.0


def _say(text: str) -> None:
  """Prints, unless the terminal is gone."""
  with contextlib.suppress(OSError, ValueError):
    print(text, flush=True)


def _leave_the_terminal() -> None:
  """After a hangup the terminal is gone and writing to it fails (EIO): output to a
  character device (a terminal) goes to /dev/null instead, a log file keeps it."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  for fd in (1, 2):
    with contextlib.suppress(OSError):
      if stat.S_ISCHR(os.fstat(fd).st_mode):
        os.dup2(devnull, fd)
  os.close(devnull)


class _HangupSafe:
  """A standard stream that outlives its terminal: a write that the closed terminal refuses
  (EIO, before the SIGHUP handler has run) sends it and all later output to /dev/null."""

  def __init__(self, stream):
    self._stream = stream

  def __getattr__(self, name):
    return getattr(self._stream, name)

  def write(self, text):
    return self._safely(self._stream.write, text)

  def flush(self):
    return self._safely(self._stream.flush)

  def _safely(self, fn, *args):
    try:
      return fn(*args)
    except OSError as e:
      if e.errno != errno.EIO:
        raise
      _leave_the_terminal()
      return fn(*args)


class StopRequest:
  """Turns SIGINT, SIGTERM and SIGHUP (unless ignored when the run began: nohup) into a
  request that the training loop (or the sampler) honours after the current step. A second
  signal at least PATIENCE_S after the first leaves at once (a save or a device that hangs),
  saying `on_abandon()`'s sentence. A thread takes the signals (through Python's wakeup
  fd): it runs while the main thread waits in native code, where handlers cannot."""

  def __init__(self, on_abandon: Callable[[], str] = lambda: ""):
    self.signum, self.since, self.on_abandon = None, 0.0, on_abandon

  def __call__(self, signum, frame=None):
    del frame
    now = time.monotonic()
    if self.signum is None:
      self.signum, self.since = signum, now
      if signum == signal.SIGHUP:
        _leave_the_terminal()
      _say(f"\n{signal.Signals(signum).name} received: stopping after this step.")
    elif now - self.since >= PATIENCE_S:  # Sooner, it is the same keypress repeated.
      _say(f"\nInterrupted again: leaving now. {self.on_abandon()}".rstrip())
      os._exit(128 + signum)

  def _watch(self, reader: socket.socket, signals: set) -> None:
    while (received := reader.recv(1)) and received != b"\0":
      if received[0] in signals:
        self(received[0])

  @contextlib.contextmanager
  def installed(self):
    signals = [s for s in STOP_SIGNALS
               if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN]
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    thread = threading.Thread(target=self._watch, args=(reader, set(signals)), daemon=True,
                              name="randygpt-signals")
    thread.start()
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # A Python handler makes CPython write each signal to the wakeup fd; the thread acts.
    previous = {s: signal.signal(s, _wake_the_thread) for s in signals}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
      signal.set_wakeup_fd(previous_fd)
      writer.send(b"\0")
      thread.join()
      reader.close()
      writer.close()


def _wake_the_thread(signum, frame) -> None:
  del signum, frame


def cache_dir(kind: str) -> Path:
  """Where caches of `kind` ("jax" compilations, "tokens" of texts) outlive runs: under
  $RANDYGPT_CACHE, else $XDG_CACHE_HOME/randygpt (~/.cache/randygpt). Deleting it is safe.
  Refused when another user could write to it (data/trust.py)."""
  from randygpt.data import trust  # pylint: disable=import-outside-toplevel  # Keeps --help fast.
  root = os.environ.get("RANDYGPT_CACHE") or Path(
      os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "randygpt"
  path = Path(root) / kind
  if (why := trust.untrusted_directory(path)):
    raise UserError(f"The cache {path} can be written by other users ({why}), and randygpt "
                    "loads code and data from it. Set RANDYGPT_CACHE to a directory only you "
                    f"can write, or {trust.SHARED_ENV}=1 to trust a shared team cache.")
  return path


def _exit_with_error(message: str) -> None:
  """Prints the one-line error and exits 1. Work abandoned in background threads (e.g. the
  reads of a corrupt checkpoint) may still report late, with tracebacks: they go nowhere."""
  print(f"Error: {message}", file=sys.stderr, flush=True)
  sys.stderr = io.StringIO()
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`), its errors in
  randygpt's one-line form."""
  try:
    return flags.FLAGS(argv)
  except flags.CantOpenFlagFileError as e:
    reason = str(e).partition("Unable to open flagfile: ")[2]
    _exit_with_error(f"Could not read a --flagfile ({reason}). Check its path; "
                     "experiments/ holds the presets.")
  except flags.Error as e:
    _exit_with_error(f"{e} (--helpshort lists the flags.)")


def _quiet_logs() -> None:
  """Warnings only, unless --verbosity says otherwise: libraries' INFO lines are noise."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _from_checkpointing(tb) -> bool:
  return any(part in frame.filename for frame in traceback.extract_tb(tb)
             for part in ("orbax", "asyncio"))


def _quiet_background_failures() -> None:
  """A failed background save makes Orbax's threads log and raise tracebacks; randygpt
  reports it as one `Error:` line instead (checkpoint.py). --verbosity shows them."""
  if flags.FLAGS["verbosity"].present:
    return
  pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
  pylogging.getLogger("absl").addFilter(
      lambda record: record.levelno < pylogging.ERROR or "orbax" not in record.pathname)
  unraisable, thread_hook = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda args: (
      None if _from_checkpointing(args.exc_traceback) else unraisable(args))
  threading.excepthook = lambda args: (
      None if _from_checkpointing(args.exc_traceback) else thread_hook(args))


def _keep_device_count(saved: int) -> None:
  """A resume trains on the device count its run recorded, if --batch_size allows it."""
  batch_size = flags.FLAGS.batch_size
  if saved > batch_size:
    _exit_with_error(f"--workdir={flags.FLAGS.workdir} trained on {saved} CPU devices (its "
                     f"flags.cfg), more than --batch_size={batch_size}: pass a --batch_size "
                     f"of at least {saved}, or --num_cpu_devices={batch_size} or fewer.")
  flags.FLAGS.num_cpu_devices = saved


def entry_point(work):
  """An absl `main` that runs `work()`; `work` may return {"signal": signum} to end by it."""
  def main(argv):
    if len(argv) > 1:
      _exit_with_error(f"Unexpected arguments: {' '.join(argv[1:])} "
                       "(flags are written --name=value).")
    _quiet_logs()  # E.g. JAX's lines about absent backends.
    _quiet_background_failures()
    sys.stdout, sys.stderr = _HangupSafe(sys.stdout), _HangupSafe(sys.stderr)
    memory.configure_malloc()  # Before JAX starts its threads.
    import jax  # After flag parsing: --help and flag errors stay fast.
    from randygpt.runtime import cores, devices, exported, placement, platforms, watch
    try:
      jax.config.update("jax_compilation_cache_dir", str(cache_dir("jax")))
      exported.configure(cache_dir("lowered"))
    except UserError as e:
      _exit_with_error(str(e))
    # Every compilation, not only those over 1 s: a run's ~25 small ones cost ~1.5 s of
    # start-up compiled afresh (docs/measurements.md, "Start-up").
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if flags.FLAGS.resume and not flags.FLAGS.num_cpu_devices:  # The run's own device count.
      _keep_device_count(devices.saved_device_count(flags.FLAGS.workdir))
    devices.set_cpu_device_count(placement.cpu_device_count(
        flags.FLAGS.num_cpu_devices, flags.FLAGS.batch_size, flags.FLAGS.num_processes,
        block_size=flags.FLAGS.block_size, n_cores=cores.usable().cores))
    try:
      devices.join_cluster(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                           flags.FLAGS.process_id, flags.FLAGS.distributed_timeout)
    except UserError as e:
      _exit_with_error(str(e))
    platforms.start_backends()  # Before any JAX work: it drops backends that cannot start.
    if not devices.is_main_process():
      sys.stdout = open(os.devnull, "w")  # One log stream: process 0 speaks for the run.
    try:
      if jax.process_count() > 1:  # A dead process ends the others at once (watch.py).
        watch.start(flags.FLAGS.workdir, jax.process_index(), jax.process_count(),
                    flags.FLAGS.distributed_timeout)
      result = work() or {}
    except UserError as e:
      watch.finished(completed=False)
      _exit_with_error(str(e))
    except KeyboardInterrupt:
      sys.exit(128 + signal.SIGINT)
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_count() == 1:
        raise
      _peer_lost(e)
    watch.finished(completed=True)
    if "signal" in result:
      # End by the signal itself, so that a shell loop running a sweep stops too.
      signal.signal(result["signal"], signal.SIG_DFL)
      os.kill(os.getpid(), result["signal"])
  return main


def _peer_lost(error: Exception) -> None:
  """A multi-process run failed, most often because another process has ended: a collective
  failed (Gloo saw its connection close), or another error came from a step while it died
  (under CI load, one from device_put's cross-process check of the batch). The launcher, or
  this process's watch (watch.py), ends this one within seconds with the line that names
  the dead one; should neither, a failed collective says so in one line, and anything else
  is a bug, with its traceback."""
  import jax
  from randygpt.runtime import platforms
  time.sleep(PEER_GRACE_S)
  if not isinstance(error, jax.errors.JaxRuntimeError):
    raise error
  _exit_with_error(f"A collective with the run's other processes failed "
                   f"({platforms.error_line(error)}): one of them has ended. No save was made "
                   "(a save needs every process); resume the run with --resume.")


def light_entry_point(work):
  """An absl `main` for commands that need no JAX (report): `work(argv[1:])`, its
  UserErrors as one-line messages."""
  def main(argv):
    _quiet_logs()  # E.g. matplotlib's font cache.
    try:
      work(argv[1:])
    except UserError as e:
      _exit_with_error(str(e))
  return main
