"""Train a character-level GPT: `python -m randygpt.main --flagfile=experiments/shakespeare.cfg`."""

from absl import app
from absl import flags

from randygpt.runtime import cli
from randygpt import flags as randygpt_flags

flags.adopt_module_key_flags(randygpt_flags)  # --help lists randygpt's flags, not absl's.


def train():
  from randygpt import trainer  # After flag parsing: --help stays fast.
  return trainer.run(randygpt_flags.run_config())


if __name__ == "__main__":
  app.run(cli.entry_point(train), flags_parser=cli.parse_flags)
