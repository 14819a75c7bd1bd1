"""The real `python -m randygpt.main` process, where the process is what is tested: stopped
by Ctrl-C, resumed and sampled from by the real commands; exit statuses; one `Error:` line
on stderr. What a run does is tested in this process (test_trainer.py, test_cli.py)."""

import json
import signal

from randygpt import checkpoint

from conftest import (as_args, assert_clean_error, tiny, tree_bytes, truncate_data_files,
                      wait_for, write_corpus)


def test_ctrl_c_then_resume_to_the_target_then_sample(run_cli, start_cli, tmp_path):
  write_corpus(tmp_path / "c.txt")
  workdir = tmp_path / "w"
  proc = start_cli("--data=c.txt", *as_args(tiny(iters=100000, log_interval=1, eval_interval=5,
                                                 prompt="ANNA:")), "--workdir=w")
  wait_for(proc, "\niter    6")  # After an evaluation, so there is a best checkpoint too.
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGINT, stderr  # Ended by the signal: a shell sees 130.
  assert "Traceback" not in stderr, stderr
  assert "SIGINT received: stopping after this step." in stdout
  assert "Interrupted at iteration" in stdout
  assert "Saved latest checkpoint: w/checkpoints/latest/" in stdout
  assert "Best checkpoint: w/checkpoints/best/" in stdout
  assert "Resume: python -m randygpt.main --resume --workdir=w --iters=100000" in stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["status"] == "interrupted"
  stopped_at = summary["iters"]
  assert checkpoint.Checkpoints(workdir).path("latest").name == str(stopped_at)

  resumed = run_cli(f"--iters={stopped_at + 3}", "--resume", "--workdir=w")
  assert resumed.returncode == 0, resumed.stderr
  assert (f"Resumed from w/checkpoints/latest/{stopped_at} at iteration {stopped_at}"
          in resumed.stdout)
  assert json.loads((workdir / "summary.json").read_text())["status"] == "completed"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["iter"] for r in records] == list(range(1, stopped_at + 4))
  starts = json.loads((workdir / "run.json").read_text())["starts"]
  assert [s["iter"] for s in starts] == [0, stopped_at]
  assert "-m randygpt.main --data=c.txt" in starts[0]["command"]
  assert "-m randygpt.main --iters=" in starts[1]["command"] and "--resume" in starts[1]["command"]

  sampled = run_cli("--workdir=w", "--checkpoint=latest", "--prompt=ANNA:",
                    "--max_new_tokens=20", module="randygpt.sample")
  assert sampled.returncode == 0, sampled.stderr
  assert f"checkpoint: w/checkpoints/latest/{stopped_at + 3} (iteration {stopped_at + 3}" in (
      sampled.stdout)
  sample = (workdir / "samples.txt").read_text(encoding="utf-8").split("\n\n")[0]
  assert sample.startswith("ANNA:") and f"\n{sample}\n" in sampled.stdout


def test_a_refusal_is_one_error_line_and_exit_status_1(run_cli, trained):
  """Here while Orbax's reads of a broken checkpoint fail in background threads."""
  truncate_data_files(checkpoint.Checkpoints(trained).path("latest"))
  before = tree_bytes(trained)
  result = run_cli("--iters=30", "--resume", "--workdir=w")
  assert_clean_error(result, "Error: Checkpoint w/checkpoints/latest/20 is corrupt or incomplete")
  assert tree_bytes(trained) == before


def test_a_flag_error_is_one_error_line_and_exit_status_1(run_cli):
  assert_clean_error(run_cli("--n_embed=64"), "Error: Unknown command line flag 'n_embed'. Did "
                     "you mean: n_embd ? (--helpshort lists the flags.)")
