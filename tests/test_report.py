"""`python -m randygpt.report`: its functions on hand-made workdirs, then the command in this
process on a sweep trained here."""

import csv
import dataclasses
import io
import json
import sys

import pytest

from randygpt import report
from randygpt.runtime import rundir
from randygpt.errors import UserError

from conftest import parsed_flags, raises_user_error, run_training, tiny, write_corpus


def make_run(workdir, lr="0.001", val=(2.5, 2.0), status="completed", starts=(0,),
             walls=(1.0, 2.0, 3.0, 4.0), full_val=None):
  """A workdir as training leaves it: flags.cfg, run.json, metrics.jsonl (4 records,
  evaluations at 20 and 40) and, unless `status` is None, summary.json."""
  workdir.mkdir(parents=True)
  (workdir / "flags.cfg").write_text(f"--batch_size=8\n--learning_rate={lr}\n"
                                     "--prompt=A:\n--prompt=B:\n")
  (workdir / "run.json").write_text(json.dumps({"starts": [{"iter": s} for s in starts]}))
  records = [{"iter": i, "train_loss": 3.0 - i / 100, "tokens_per_sec": 1000.0 * i,
              "wall_s": w} for i, w in zip((10, 20, 30, 40), walls)]
  records[1]["val_loss"], records[3]["val_loss"] = val
  records[1]["val_bpc"], records[3]["val_bpc"] = (v * 1.5 for v in val)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if status:
    (workdir / "summary.json").write_text(json.dumps({"status": status,
                                                      "final_val_full": full_val}))
  return workdir


@pytest.fixture
def sweep(tmp_path):
  make_run(tmp_path / "sweep" / "lr1e-3", lr="0.001", val=(2.5, 2.0), full_val=2.1)
  make_run(tmp_path / "sweep" / "lr3e-3", lr="0.003", val=(2.2, 2.4))
  return tmp_path / "sweep"


def table_for(paths, sort="name"):
  runs = [report.load(p, p.name) for p in report.find_runs(list(map(str, paths)))]
  return report.rows(runs, sort)


def test_rows_show_the_differing_flags_and_the_results(sweep):
  columns, table = table_for([sweep])
  assert columns == ["name", "status", "learning_rate", "iter", "best_val", "best_bpc",
                     "best_iter", "final_val", "full_val", "tokens_per_sec", "wall"]
  assert table == [
      {"name": "lr1e-3", "status": "completed", "learning_rate": "0.001", "iter": 40,
       "best_val": 2.0, "best_bpc": 3.0, "best_iter": 40, "final_val": 2.0, "full_val": 2.1,
       "tokens_per_sec": 25000.0, "wall": 4.0},
      {"name": "lr3e-3", "status": "completed", "learning_rate": "0.003", "iter": 40,
       "best_val": 2.2, "best_bpc": 2.2 * 1.5, "best_iter": 20, "final_val": 2.4,
       "full_val": None, "tokens_per_sec": 25000.0, "wall": 4.0}]


def test_rows_keep_the_iters_flag_apart_from_the_last_iteration(sweep):
  with open(sweep / "lr1e-3" / "flags.cfg", "a") as f:
    f.write("--iters=100\n")
  columns, table = table_for([sweep])
  assert columns[2:5] == ["learning_rate", "iters", "iter"]
  assert [(row["iters"], row["iter"]) for row in table] == [("100", 40), (None, 40)]


def test_read_flags_joins_a_repeated_flag(sweep):
  assert report.read_flags(sweep / "lr1e-3")["prompt"] == "A:,B:"


@pytest.mark.parametrize("sort, names", [
    ("best_val", ["lr1e-3", "lr3e-3", "none"]),
    ("-best_val", ["lr3e-3", "lr1e-3", "none"]),
    ("-learning_rate", ["none", "lr3e-3", "lr1e-3"]),
])
def test_rows_sort_by_a_column_missing_values_last(sweep, sort, names):
  none = make_run(sweep / "none", lr="0.01", status=None)
  (none / "metrics.jsonl").write_text("")
  _, table = table_for([sweep], sort)
  assert [row["name"] for row in table] == names


def test_rows_refuse_an_unknown_sort_column(sweep):
  with pytest.raises(UserError, match="--sort=loss: no such column; choose one of name, "):
    table_for([sweep], "loss")


def test_status_tells_running_crashed_and_finished_runs_apart(tmp_path):
  make_run(tmp_path / "done", status="interrupted")
  make_run(tmp_path / "killed", status="running")  # Its process died without a word.
  make_run(tmp_path / "no_summary", status=None)
  make_run(tmp_path / "live", status="running")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "run.lock").write_text("")
  with rundir.claim(tmp_path / "live"):
    statuses = {row["name"]: row["status"] for row in table_for([tmp_path])[1]}
  assert statuses == {"done": "interrupted", "killed": "crashed", "no_summary": "crashed",
                      "live": "running", "empty": "not started"}


def test_wall_times_add_up_over_resumes(tmp_path):
  run = report.load(make_run(tmp_path / "a", starts=(0, 20), walls=(1.0, 2.0, 1.5, 2.5)),
                    "a")
  assert report.wall_times(run) == [1.0, 2.0, 3.5, 4.5]


def test_find_runs_takes_workdirs_and_folders_once(sweep, tmp_path):
  found = report.find_runs([str(sweep / "lr3e-3"), str(sweep)])
  assert found == [sweep / "lr3e-3", sweep / "lr1e-3"]
  (tmp_path / "nothing").mkdir()
  with pytest.raises(UserError, match="holds no runs"):
    report.find_runs([str(tmp_path / "nothing")])
  with pytest.raises(UserError, match="missing does not exist"):
    report.find_runs([str(tmp_path / "missing")])


def test_format_table_aligns_columns():
  text = report.format_table(["name", "best_val", "wall"],
                             [{"name": "a-long-name", "best_val": 1.23456, "wall": 75.0},
                              {"name": "b", "best_val": None, "wall": None}])
  assert text.splitlines() == ["name         best_val  wall",
                               "a-long-name  1.2346    1m15s",
                               "b            -         -"]


def test_plot_draws_every_run_into_a_png(sweep, tmp_path):
  pytest.importorskip("matplotlib")
  runs = [report.load(p, p.name) for p in report.find_runs([str(sweep)])]
  for run in runs:
    run.flags["data"] = "data/tinyshakespeare.txt"
  figure = report.plot(runs, str(tmp_path / "curves.png"))
  png = (tmp_path / "curves.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
  assert labels == ["learning_rate=0.001", "learning_rate=0.003"]  # What the runs compare.
  assert [axes.get_xlabel() for axes in figure.axes] == ["iteration", "wall time (s)"]
  assert figure.get_suptitle().startswith("tinyshakespeare.txt: train loss")
  figure = report.plot(runs, str(tmp_path / "curves.png"), with_wall_time=False)
  assert [axes.get_xlabel() for axes in figure.axes] == ["iteration"]


def test_runs_that_differ_only_in_their_seed_share_a_label(sweep):
  runs = [report.load(p, p.name) for p in report.find_runs([str(sweep)])]
  for run, seed in zip(runs, ("1", "2")):
    run.flags |= {"seed": seed, "learning_rate": "0.003", "qk_norm": ""}
  assert report.compared(runs) == ["lr1e-3", "lr3e-3"]  # Nothing else differs: the names.
  runs[1].flags |= {"noqk_norm": ""}
  del runs[1].flags["qk_norm"]
  assert report.compared(runs) == ["qk_norm", "noqk_norm"]
  for run, value in zip(runs, "xy"):  # Too much to read: the names.
    run.flags |= {f"flag_{i}": value for i in range(8)}
  assert report.compared(runs) == ["lr1e-3", "lr3e-3"]


def test_seeds_share_a_name_where_what_differs_is_too_long_to_read(sweep):
  [a, b] = [report.load(p, p.name) for p in report.find_runs([str(sweep)])]
  runs = [dataclasses.replace(run, name=f"{stem}-s{seed}", flags=run.flags | {"seed": seed})
          for run, stem in ((a, "base"), (b, "fast")) for seed in "12"]
  for run, value in zip(runs, "xxyy"):
    run.flags |= {f"flag_{i}": value for i in range(8)}
  assert report.compared(runs) == ["base", "base", "fast", "fast"]
  runs[3].name = "other"  # Nothing shared: each its own name.
  assert report.compared(runs) == ["base", "base", "fast-s1", "other"]
  for run, name in zip(runs, ("run-1", "run-2", "run-3", "run-4")):
    run.name = name  # Both settings' runs share "run": each its own name.
  assert report.compared(runs) == ["run-1", "run-2", "run-3", "run-4"]


def test_plot_without_matplotlib_says_so(sweep, tmp_path, monkeypatch):
  for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
    monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(UserError, match="--plot needs matplotlib, which is not installed"):
    report.plot([], str(tmp_path / "curves.png"))
  assert not (tmp_path / "curves.png").exists()


def run_report(*args):
  """`python -m randygpt.report args...` in this process: its flags parsed, its paths given."""
  with parsed_flags(*[a for a in args if a.startswith("--")]):
    report.report([a for a in args if not a.startswith("--")])


def test_command_prints_csv(sweep, capsys):
  run_report(str(sweep), "--csv", "--sort=-learning_rate")
  rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
  assert [(r["name"], r["learning_rate"], r["best_val"]) for r in rows] == [
      ("lr3e-3", "0.003", "2.2"), ("lr1e-3", "0.001", "2.0")]


# The command's one `Error:` line and exit status: test_launch.py (launch.sh report).
@pytest.mark.parametrize("args, message", [
    ([], "Name the runs to compare"),
    (["missing"], "missing does not exist."),
    (["sweep", "--sort=loss"], "--sort=loss: no such column"),
    (["sweep", "--plot=nodir/c.png"], "Cannot write --plot=nodir/c.png"),
])
def test_command_bad_input_gets_a_short_clear_error(sweep, monkeypatch, args, message):
  monkeypatch.chdir(sweep.parent)
  with raises_user_error(message) as info:
    run_report(*args)
  assert str(info.value).startswith(message)


@pytest.mark.slow
def test_a_sweep_from_a_shell_loop_is_reported_plotted_and_resumed(tmp_path, monkeypatch,
                                                                    capsys):
  pytest.importorskip("matplotlib")
  monkeypatch.chdir(tmp_path)
  write_corpus(tmp_path / "c.txt")
  loop = tiny(data="c.txt", iters=20, eval_interval=10, resume=True)
  for lr in ("1e-3", "3e-3"):
    workdir = f"runs/s/lr{lr}"
    assert run_training(workdir, **loop, learning_rate=float(lr))["status"] == "completed"
    assert f"Sample: python -m randygpt.sample --workdir={workdir}" in capsys.readouterr().out
  again = run_training("runs/s/lr1e-3", **loop, learning_rate=1e-3)
  assert again == {"status": "nothing to train"}  # A re-run sweep skips finished runs.
  assert "Already at iteration 20" in capsys.readouterr().out

  run_report("runs/s", "--plot=curves.png")
  header, *lines = capsys.readouterr().out.splitlines()
  assert header.split()[:3] == ["name", "status", "learning_rate"]
  assert [line.split()[:3] for line in lines] == [["lr1e-3", "completed", "0.001"],
                                                  ["lr3e-3", "completed", "0.003"]]
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
  starts = json.loads((tmp_path / "runs/s/lr1e-3/run.json").read_text())["starts"]
  assert [s["iter"] for s in starts] == [0]  # (What it records of the command: test_rundir.py.)
