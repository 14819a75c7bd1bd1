"""`python -m randygpt.import_bin checkpoint.bin --data=train.txt --workdir=runs/imported`."""

from absl import app
from absl import flags

from randygpt.import_bin.command import import_bin
from randygpt.runtime import cli

for _name in ("data", "data_encoding", "bpe_vocab", "workdir", "overwrite", "n_embd", "n_head",
              "n_layer", "block_size", "beta1", "beta2", "learning_rate"):
  flags.declare_key_flag(_name, flag_values=flags.FLAGS)


def main(argv):
  cli.entry_point(lambda: import_bin(argv[1:]))(argv[:1])


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
