import json
import re
import signal
import subprocess
import sys

import pytest

from randygpt.runtime import rundir
from randygpt.errors import UserError

from conftest import REPO, raises_user_error, run_training, tiny, write_corpus

HOLD = ("import sys, time; from pathlib import Path; from randygpt.runtime import rundir\n"
        "with rundir.claim(Path(sys.argv[1])):\n  print('held', flush=True); time.sleep(60)")


def hold_in_subprocess(workdir):
  """A live process that holds `workdir`, as a running training would."""
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "held\n"
  return process


def test_claim_creates_the_workdir_and_refuses_a_second_claim(tmp_path):
  workdir = tmp_path / "sweep" / "a"
  with rundir.claim(workdir):
    assert workdir.is_dir() and rundir.is_held(workdir)
    with pytest.raises(UserError, match=r"is in use by another run \(process \d+\)"):
      with rundir.claim(workdir):
        pass
  assert not rundir.is_held(workdir)
  with rundir.claim(workdir):  # Released: the next run may start.
    pass


def test_claim_without_lock_shares_the_workdir(tmp_path):
  with rundir.claim(tmp_path / "a"):
    with rundir.claim(tmp_path / "a", lock=False):
      assert rundir.is_held(tmp_path / "a")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = hold_in_subprocess(tmp_path / "a")
  assert rundir.is_held(tmp_path / "a")
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert not rundir.is_held(tmp_path / "a")
  with rundir.claim(tmp_path / "a"):
    pass


def test_claim_refuses_a_file(tmp_path):
  (tmp_path / "afile").write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    with rundir.claim(tmp_path / "afile"):
      pass
  assert (tmp_path / "afile").read_text() == "x"


def test_is_held_is_false_for_a_workdir_never_claimed(tmp_path):
  assert not rundir.is_held(tmp_path)


def test_record_start_keeps_resumes_and_restarts_fresh(tmp_path):
  rundir.record_start(tmp_path, 0, new_history=True)
  rundir.record_start(tmp_path, 40, new_history=False)
  starts = json.loads((tmp_path / "run.json").read_text())["starts"]
  assert [s["iter"] for s in starts] == [0, 40]
  for key in ("jax", "jaxlib", "optax", "orbax-checkpoint"):
    assert re.match(r"\d+\.\d+", starts[0]["packages"][key]), key
  assert re.match(r"\d+\.\d+", starts[0]["python"])
  rundir.record_start(tmp_path, 0, new_history=True)
  assert len(json.loads((tmp_path / "run.json").read_text())["starts"]) == 1


def test_flags_cfg_keeps_its_note_while_the_history_goes_on(tmp_path):
  from randygpt.config import RunConfig
  from randygpt.data import CharTokenizer
  config, tokenizer = RunConfig(), CharTokenizer.from_text("ab")
  rundir.initialise(tmp_path, config, tokenizer, 0, note="chose --iters=7")
  noted = (tmp_path / "flags.cfg").read_text()
  assert noted == "# chose --iters=7\n" + config.flagfile()
  rundir.initialise(tmp_path, config, tokenizer, 5)  # A resume: the note stays.
  assert (tmp_path / "flags.cfg").read_text() == noted
  rundir.initialise(tmp_path, config, tokenizer, 0)  # A new history: it goes.
  assert (tmp_path / "flags.cfg").read_text() == config.flagfile()


def test_environment_records_the_command_as_typed(monkeypatch):
  """`python -m randygpt.main --flags...` is what run.json says ran the run."""
  monkeypatch.setattr(sys, "argv", ["/x/randygpt/main.py", "--learning_rate=1e-3",
                                    "--workdir=runs/s/lr 1e-3"])
  main = type(sys)("__main__")
  main.__spec__ = type("Spec", (), {"name": "randygpt.main"})()
  monkeypatch.setitem(sys.modules, "__main__", main)
  assert rundir.environment()["command"] == (
      f"{sys.executable} -m randygpt.main --learning_rate=1e-3 '--workdir=runs/s/lr 1e-3'")


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_code_version_is_the_checkouts_commit():
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
  version = rundir.code_version()
  assert version["commit"] == head and isinstance(version["dirty"], bool)


def test_code_version_is_unknown_without_git(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # No git on the PATH.
  assert rundir.code_version() == {"commit": "unknown", "dirty": "unknown"}


def test_code_version_is_unknown_outside_a_repository(monkeypatch, tmp_path):
  monkeypatch.setattr(rundir, "CODE_DIR", tmp_path)
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
  assert rundir.code_version() == {"commit": "unknown", "dirty": "unknown"}


def test_next_steps_resume_only_an_unfinished_run(tmp_path):
  assert rundir.next_steps(tmp_path, "completed", 100) == [
      f"Sample: python -m randygpt.sample --workdir={tmp_path}"]
  assert rundir.next_steps(tmp_path, "interrupted", 100)[0] == (
      f"Resume: python -m randygpt.main --resume --workdir={tmp_path} --iters=100")


def test_training_refuses_a_workdir_a_live_run_holds(tmp_path):
  holder = hold_in_subprocess(tmp_path / "busy")
  try:
    with raises_user_error(f"--workdir={tmp_path / 'busy'} is in use by another run (process "
                           f"{holder.pid}). Wait for it to end, or choose another --workdir."):
      run_training(tmp_path / "busy", **tiny(data=write_corpus(tmp_path / "c.txt"), iters=2))
  finally:
    holder.kill()
    holder.wait()
  assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["run.lock"]


def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
  target = tmp_path / "precious.txt"
  target.write_text("keep me\n")
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / rundir.LOCK_NAME).symlink_to(target)
  with raises_user_error(f"{workdir / rundir.LOCK_NAME} is a symbolic link, which a run never "
                         "makes: remove it (rm it), then run again."):
    with rundir.claim(workdir):
      pass
  assert target.read_text() == "keep me\n" and not rundir.is_held(workdir)


def test_a_temporary_file_that_is_a_link_is_not_written_through(tmp_path):
  from randygpt import metrics
  target = tmp_path / "precious.txt"
  target.write_text("keep me\n")
  (tmp_path / "summary.json.tmp").symlink_to(target)
  metrics.write_text(tmp_path / "summary.json", "{}\n")
  assert target.read_text() == "keep me\n"
  assert (tmp_path / "summary.json").read_text() == "{}\n"
  assert not (tmp_path / "summary.json.tmp").exists()
