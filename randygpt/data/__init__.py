"""Text in, token windows out: the sources named by --data, the tokenizer, the token cache,
the 90/10 split, and the windows of a (seed, step).

A text of any size is read in chunks, encoded with NumPy into the smallest unsigned type
that holds its vocabulary and written once to a token cache keyed by its content; runs
read each step's windows from that file, so memory does not grow with the text
(docs/data.md; docs/measurements.md, "Data").

One idea a module: `sources` (what --data names: downloads, files, decoded text),
`tokenizers`, `bpe` and `windowing` (the research core: tokens, the split, the windows),
`token_file` and `cache` (the token cache), `randygpt_text` (randyGPT's reading of a text),
`randygpt_bpe` (randyGPT's byte-pair tokenizer).
The names below are the package's interface; settings such as `sources.CHUNK_BYTES` are
changed in their own module.
"""

from randygpt.data.bpe import BpeTokenizer
from randygpt.data.cache_header import CACHE_FORMAT
from randygpt.data.cache import (Corpus, build_cache, content_hash, load_corpus,
                                 open_cache)
from randygpt.data.randygpt_bpe import RandygptBpeTokenizer
from randygpt.data.randygpt_text import RANDYGPT_SLOTS, RandygptLines, as_randygpt_reads
from randygpt.data.sources import (BINARY_CONTROL_FRACTION, DEFAULT_DATA, KNOWN_DATASETS,
                                   TEXT_CONTROL_BYTES, KnownDataset, download, looks_binary,
                                   resolve_sources, text_chunks)
from randygpt.data.token_file import TokenFile
from randygpt.data.tokenizers import CharTokenizer, code_points
from randygpt.data.windowing import (VAL_FRACTION, WindowSampler, bits_per_character,
                                     get_batch, min_text_length, split, train_length,
                                     window_starts, windows)
