"""The imported checkpoint's vocabulary, rebuilt as randyGPT built it."""

from pathlib import Path

from randygpt import data
from randygpt.config import ModelConfig
from randygpt.errors import UserError
from randygpt.runtime import cli, cores


def read_vocabulary(config, path: Path, model_config: ModelConfig) -> data.Corpus:
  """The text randyGPT trained on, as it read it, and its vocabulary (checked against the
  checkpoint's size)."""
  corpus = data.load_corpus(config.data.data, cli.cache_dir("tokens"),
                            encoding=config.data.data_encoding, tokenizer="randygpt",
                            sample_fallback=False, hash_threads=cores.usable().cpus)
  tokenizer = corpus.tokenizer
  if tokenizer.vocab_size != model_config.vocab_size:
    raise UserError(
        f"Checkpoint vocab_size {model_config.vocab_size} != vocab_size "
        f"{tokenizer.vocab_size} of --data={config.data.data} ('<', '>' and its "
        f"{tokenizer.vocab_size - 2} distinct characters): {path} was trained on other text. "
        "Pass the train.txt randyGPT trained it on.")
  return corpus
