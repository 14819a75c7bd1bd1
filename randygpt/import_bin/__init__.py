"""Bring a randyGPT (Rust) checkpoint along:
`python -m randygpt.import_bin checkpoint.bin --data=train.txt --workdir=runs/imported`.

Reads randyGPT's RGPT0001 (v0.5), RGPT0002 (v0.8.0: no Adam moments) and RGPT0003 (v0.8.5
on) files (weights, Adam moments, iteration and Adam step), with a character vocabulary
rebuilt from --data or randyGPT's BPE vocabulary (--bpe_vocab), and writes a randygpt
checkpoint that `--resume` continues and `randygpt.sample` samples from.
The file does not store the model shape: it comes from --n_embd, --n_layer, --n_head and
--block_size (randyGPT's defaults are randygpt's), and the file size must add up to it.

One idea a module: `formats` (the file), `vocab` (its vocabulary), `state` (the train state
and the new run), `command` (the import), `__main__` (the command line).
"""

from randygpt.import_bin.command import USAGE, import_bin
from randygpt.import_bin.formats import (FORMATS, HEADER_BYTES, MAGIC, REFUSED, Format,
                                         check_size, file_format, read_header, read_tensors,
                                         shapes_that_fit, tensor_shapes, to_params)
from randygpt.import_bin.state import RANDYGPT_BETAS, train_state, write_run
from randygpt.import_bin.vocab import (describe, import_data_config, read_vocabulary,
                                       recorded_data_config)
