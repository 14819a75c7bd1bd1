"""What every command does around its work, in this process: flag errors and stray arguments
as one `Error:` line and exit status 1, and the stop request that signals set. (The real
processes, their stderr and their deaths by signal: test_main.py.)"""

import logging
import os
import signal
import sys
import threading

import pytest
from absl import flags
from absl.testing import flagsaver

from randygpt import flags as randygpt_flags  # noqa: F401  defines the flags parsed here
from randygpt.errors import UserError
from randygpt.runtime import cli


@pytest.fixture
def exits(capsys, monkeypatch):
  """Calls `fn(*args)`, expects the CLI's exit (status 1, one `Error:` line on stderr) and
  returns that line. What the exit silences for the rest of a process is restored after."""
  monkeypatch.setattr(sys, "stderr", sys.stderr)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  monkeypatch.setattr(threading, "excepthook", threading.excepthook)
  asyncio_logger = logging.getLogger("asyncio")
  asyncio_level = asyncio_logger.level

  def call(fn, *args):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as info:
      try:
        fn(*args)
      finally:
        flags.FLAGS.unparse_flags()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    return err
  yield call
  asyncio_logger.setLevel(asyncio_level)


def write(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content)
  return path


@pytest.mark.parametrize("make_args, message", [
    (lambda p: [f"--flagfile={write(p, 't.cfg', '--n_embed=64')}"],
     "Error: Unknown command line flag 'n_embed'. Did you mean: n_embd ? (--helpshort "
     "lists the flags.)"),
    (lambda p: ["--n_head=5"], "--n_embd must be divisible by --n_head"),
    (lambda p: ["--top_p=2"], "--top_p must be in (0, 1]"),
    (lambda p: ["--iters=0"], "Error: flag --iters=0: "),
    (lambda p: ["--n_embed=64"], "Unknown command line flag 'n_embed'"),
    (lambda p: ["--flagfile=nope.cfg"],
     "Error: Could not read a --flagfile ([Errno 2] No such file or directory: 'nope.cfg')"),
    (lambda p: ["--num_cpu_devices=100000", "--batch_size=100000"],
     "--num_cpu_devices=100000: 100000 is not an integer in the range"),
], ids=["typo-in-a-flag-file", "n_head", "top_p", "iters", "unknown-flag", "missing-flag-file",
        "cpu-devices-past-xla"])
def test_flag_errors_are_one_line(exits, tmp_path, monkeypatch, make_args, message):
  monkeypatch.chdir(tmp_path)
  err = exits(cli.parse_flags, ["randygpt", *make_args(tmp_path)])
  assert message in err, err


def test_stray_arguments_are_refused_before_any_work(exits):
  work = []
  err = exits(cli.entry_point(lambda: work.append(1)), ["randygpt", "stray"])
  assert err == "Error: Unexpected arguments: stray (flags are written --name=value).\n"
  assert not work


@pytest.fixture
def sighup_handled():
  """SIGHUP not ignored, as outside nohup: under it StopRequest leaves SIGHUP ignored."""
  previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGHUP, previous)


def test_stop_request_takes_the_first_signal_and_restores_the_handlers(capsys, sighup_handled):
  previous = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}
  stop = cli.StopRequest()
  with stop.installed():
    assert all(signal.getsignal(s) not in (previous[s], signal.SIG_IGN) for s in previous)
    stop(signal.SIGTERM, None)
    stop(signal.SIGINT, None)  # A second signal while stopping changes nothing.
  assert stop.signum == signal.SIGTERM
  assert capsys.readouterr().out == "\nSIGTERM received: stopping after this step.\n"
  assert {s: signal.getsignal(s) for s in previous} == previous


def test_a_signal_reaches_the_stop_request_while_the_main_thread_waits():
  """Through the wakeup fd and the thread: no Python code runs in the main thread meanwhile
  (it waits on a lock, as in native code)."""
  stop = cli.StopRequest()
  with stop.installed():
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    threading.Event().wait(0.5)
    assert stop.signum == signal.SIGTERM


def test_a_write_the_closed_terminal_refuses_does_not_raise(monkeypatch):
  """Between a hangup and its handler, the terminal answers writes with EIO: the standard
  streams the CLI wraps let the write pass (test_faults.py closes a real one); other write
  errors still raise."""
  import errno
  import io

  class Refusing(io.StringIO):
    def __init__(self, code: int):
      super().__init__()
      self.code, self.refusals = code, 1

    def write(self, text):
      if self.refusals:
        self.refusals -= 1
        raise OSError(self.code, os.strerror(self.code))
      return super().write(text)

  left = []  # Not this process's own terminal: record leaving it instead.
  monkeypatch.setattr(cli, "_leave_the_terminal", lambda: left.append(True))
  hung_up = Refusing(errno.EIO)
  print("iter    4", file=cli._HangupSafe(hung_up), flush=True)
  assert left == [True] and hung_up.getvalue() == "iter    4\n"
  with pytest.raises(OSError, match="No space left"):
    print("iter    4", file=cli._HangupSafe(Refusing(errno.ENOSPC)), flush=True)


@pytest.mark.parametrize("mode, shared, refused", [
    (0o700, "", False), (0o755, "", False), (0o777, "", True),
    (0o777, "1", False)])
def test_a_cache_others_can_write_is_refused_unless_shared(tmp_path, monkeypatch, mode, shared,
                                                            refused):
  root = tmp_path / "cache"
  root.mkdir()
  root.chmod(mode)
  monkeypatch.setenv("RANDYGPT_CACHE", str(root))
  monkeypatch.setenv("RANDYGPT_SHARED_CACHE", shared)
  if not refused:
    assert cli.cache_dir("jax") == root / "jax"
    return
  with pytest.raises(UserError) as info:
    cli.cache_dir("jax")
  assert str(info.value) == (
      f"The cache {root}/jax can be written by other users ({root} is writable by every "
      "user), and randygpt loads code and data from it. Set RANDYGPT_CACHE to a directory "
      "only you can write, or RANDYGPT_SHARED_CACHE=1 to trust a shared team cache.")


def test_a_cache_below_a_directory_others_can_write_is_refused(tmp_path, monkeypatch):
  """Whoever can write the directory above can rename the cache and put theirs there; a
  sticky directory above (/tmp) keeps them from it."""
  above = tmp_path / "above"
  (above / "cache").mkdir(parents=True)
  above.chmod(0o777)
  monkeypatch.setenv("RANDYGPT_CACHE", str(above / "cache"))
  monkeypatch.delenv("RANDYGPT_SHARED_CACHE", raising=False)
  with pytest.raises(UserError, match=f"\\({above} is writable by every user\\)"):
    cli.cache_dir("tokens")
  above.chmod(0o1777)
  assert cli.cache_dir("tokens") == above / "cache" / "tokens"


def test_a_failed_multi_process_step_waits_then_says_one_line_or_shows_a_bug(monkeypatch, exits):
  """What the launcher or the watch did not end within the grace: a failed collective is
  one line; any other error is a bug and keeps its traceback."""
  import jax
  from randygpt.runtime import cli
  slept = []
  monkeypatch.setattr(cli.time, "sleep", slept.append)
  with pytest.raises(AssertionError, match="not the same on each process"):
    cli._peer_lost(AssertionError("not the same on each process"))
  line = exits(cli._peer_lost, jax.errors.JaxRuntimeError("UNAVAILABLE: Connection reset"))
  assert "one of them has ended" in line and slept == [cli.PEER_GRACE_S] * 2
