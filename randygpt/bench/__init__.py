"""The benchmark, `python -m randygpt.bench` (its flags and command in __main__.py), one
idea a module: steps (the jitted train step, MFU, the loss estimate, generation and
prepare_step), checkpoints (save timing), runs (the training program's start-up and memory,
text sizes, the loop's ms/iteration), peers (torch_reference, nanoGPT's train.py), shapes
(--shapes), tables (the printed report) and timing (the clock).

Importing the package defines no flags: only the command does."""

from randygpt.bench.checkpoints import measure_checkpoints
from randygpt.bench.peers import check_torch_comparable, nanogpt_ms, prepare_nanogpt
from randygpt.bench.runs import loop_ms, measure_text_sizes, measure_training_runs
from randygpt.bench.shapes import SHAPES, measure_shapes, parse_shape, shape_config, shapes_table
from randygpt.bench.steps import (measure, measure_eval_and_generation, measure_generation,
                                  measure_peak_gflops, measure_steps, prepare_step)
from randygpt.bench.tables import table_rows, text_size_table
from randygpt.errors import UserError
