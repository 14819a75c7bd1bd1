"""The imported checkpoint's vocabulary: randyGPT's characters rebuilt from --data, or its
byte-pair vocabulary from --bpe_vocab, and the text's tokens as randyGPT made them."""

import dataclasses
from pathlib import Path

from randygpt import data
from randygpt.config import DataConfig, ModelConfig
from randygpt.errors import UserError
from randygpt.runtime import cli, cores


def import_data_config(dc: DataConfig) -> DataConfig:
  """The run's data flags: randyGPT's characters, or with --bpe_vocab its byte-pair tokens."""
  return dataclasses.replace(dc, tokenizer="randygpt-bpe" if dc.bpe_vocab else "randygpt")


def recorded_data_config(dc: DataConfig) -> DataConfig:
  """The data flags the new run records: --bpe_vocab as an absolute path, for a --resume
  from any directory."""
  if not dc.bpe_vocab:
    return dc
  return dataclasses.replace(dc, bpe_vocab=str(Path(dc.bpe_vocab).expanduser().resolve()))


def read_vocabulary(dc: DataConfig, path: Path, model_config: ModelConfig) -> data.Corpus:
  """The text randyGPT trained on, as it read it, in the tokens of its vocabulary (checked
  against the checkpoint's before the text is encoded)."""
  if dc.bpe_vocab:
    vocab = data.RandygptBpeTokenizer.from_file(Path(dc.bpe_vocab))
    if vocab.vocab_size != model_config.vocab_size:
      raise UserError(
          f"Checkpoint vocab_size {model_config.vocab_size} != the {vocab.vocab_size} tokens "
          f"of --bpe_vocab={dc.bpe_vocab}: {path} was trained with another vocabulary. Pass "
          "the vocab.json randyGPT trained it with (or no --bpe_vocab for a character model).")
  corpus = data.load_corpus(dc.data, cli.cache_dir("tokens"), encoding=dc.data_encoding,
                            tokenizer=dc.tokenizer, bpe_vocab=dc.bpe_vocab,
                            sample_fallback=False, hash_threads=cores.usable().cpus)
  tokenizer = corpus.tokenizer
  if tokenizer.vocab_size != model_config.vocab_size:
    raise UserError(
        f"Checkpoint vocab_size {model_config.vocab_size} != vocab_size "
        f"{tokenizer.vocab_size} of --data={dc.data} ('<', '>' and its "
        f"{tokenizer.vocab_size - 2} distinct characters): {path} was trained on other text. "
        "Pass the train.txt randyGPT trained it on (and --bpe_vocab=vocab.json for a "
        "byte-pair model).")
  return corpus


def describe(dc: DataConfig, corpus: data.Corpus) -> str:
  """The text and its vocabulary, for the import's header."""
  size = corpus.tokenizer.vocab_size
  if dc.bpe_vocab:
    return (f"data: {dc.data} | {len(corpus.tokens):,} tokens | vocab {size} (randyGPT's "
            f"byte pairs, {dc.bpe_vocab})")
  return (f"data: {dc.data} | {len(corpus.tokens):,} characters | vocab {size} ('<', '>' and "
          f"{size - 2} characters)")
