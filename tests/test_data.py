import functools
import hashlib
import http.server
import os
import random
import resource
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import data
from randygpt.errors import UserError

from conftest import (REPO, SHAKESPEARE, find_shakespeare, make_corpus, needs_shakespeare,
                      raises_user_error)


def load(path, tmp_path, **kwargs) -> data.Corpus:
  return data.load_corpus(str(path), tmp_path / "cache", **kwargs)


def test_tokenizer_round_trips_unicode(tmp_path):
  text = "Grüße, 世界! naïve café — ünd 🙂\nnew line"
  tok = data.CharTokenizer.from_text(text)
  assert tok.chars == tuple(sorted(set(text)))
  assert tok.decode(tok.encode(text)) == text
  tok.save(tmp_path / "vocab.json")
  assert data.CharTokenizer.load(tmp_path / "vocab.json") == tok


def test_tokenizer_names_missing_characters():
  tok = data.CharTokenizer.from_text("abc")
  assert tok.missing("cabbage!") == ["g", "e", "!"]


@pytest.mark.parametrize("vocab_size, dtype", [
    (1, np.uint8), (256, np.uint8), (257, np.uint16), (65_536, np.uint16), (65_537, np.uint32)])
def test_tokens_take_the_smallest_unsigned_type_that_holds_the_vocabulary(vocab_size, dtype):
  chars = tuple(chr(c) for c in range(0x20, 0x20 + vocab_size + 2048)
                if not 0xD800 <= c < 0xE000)[:vocab_size]
  tok = data.CharTokenizer(chars)
  assert tok.dtype == dtype
  last = chars[-min(3, vocab_size):]
  ids = tok.encode("".join(last))
  assert ids.dtype == dtype and ids.tolist() == list(range(vocab_size - len(last), vocab_size))


@pytest.mark.parametrize("extra, dtype", [("", np.uint8), ("".join(map(chr, range(0x4E00, 0x4F00))),
                                                          np.uint16)])
def test_the_cache_stores_the_vocabularys_dtype(tmp_path, extra, dtype):
  (tmp_path / "t.txt").write_text(make_corpus(3000) + extra, encoding="utf-8")
  corpus = load(tmp_path / "t.txt", tmp_path)
  assert corpus.tokens.dtype == dtype and isinstance(corpus.tokens, data.TokenFile)
  text = (tmp_path / "t.txt").read_text(encoding="utf-8")
  assert corpus.tokenizer == data.CharTokenizer.from_text(text)
  assert corpus.tokenizer.decode(corpus.tokens) == text


@pytest.mark.parametrize("text", [
    "plain ascii\nlines\n",
    "Кириллица и немного ASCII.\n" * 50,
    "one emoji 🙂 among ascii text\n" * 20,
    "中文字符" * 300 + "\r\n" + "ü",
])
def test_chunked_encoding_equals_encoding_the_whole_text(tmp_path, monkeypatch, text):
  monkeypatch.setattr(data.sources, "CHUNK_BYTES", 7)  # Multi-byte characters across chunk edges.
  (tmp_path / "t.txt").write_text(text, encoding="utf-8")
  corpus = load(tmp_path / "t.txt", tmp_path)
  want = data.CharTokenizer.from_text(text)
  assert corpus.tokenizer == want
  np.testing.assert_array_equal(corpus.tokens, [want.chars.index(c) for c in text])


def randygpt_reads_reference(text: str) -> str:
  """randyGPT's line reading as the previous implementation wrote it: split at "\\n", a
  trailing "\\r" dropped, each line ending in "\\n"."""
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return "".join(line.removesuffix("\r") + "\n" for line in lines)


@pytest.mark.parametrize("seed", range(20))
def test_randygpt_line_reading_in_pieces_matches_the_whole(seed):
  rng = random.Random(seed)
  text = "".join(rng.choice(["a", "b", "\r", "\n", "\r\n", "é"]) for _ in range(rng.randint(1, 60)))
  cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), 5)))
  lines = data.RandygptLines()
  pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
  assert "".join(map(lines.feed, pieces)) + lines.end() == randygpt_reads_reference(text)


def test_randygpt_tokenizer_across_chunks_and_files(tmp_path, monkeypatch):
  monkeypatch.setattr(data.sources, "CHUNK_BYTES", 4)
  (tmp_path / "a.txt").write_bytes(b"ab\r\ncd\r")
  (tmp_path / "b.txt").write_bytes(b"\nef\r\n\r\ngh")
  corpus = load(tmp_path, tmp_path, tokenizer="randygpt")
  text = randygpt_reads_reference("ab\r\ncd\r\nef\r\n\r\ngh")
  assert corpus.tokenizer == data.CharTokenizer.randygpt(text)
  assert corpus.tokenizer.decode(corpus.tokens) == text


def test_cache_is_reused_and_a_content_change_rebuilds_it(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text(make_corpus(3000), encoding="utf-8")
  first = load(path, tmp_path)
  second = load(path, tmp_path)
  assert first.built_s is not None and second.built_s is None
  assert second.cache_path == first.cache_path
  stat = path.stat()
  edited = path.read_bytes().replace(b"river", b"rivet", 1)
  path.write_bytes(edited)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # Same size and time stamp.
  third = load(path, tmp_path)
  assert third.built_s is not None and third.cache_path != first.cache_path
  assert third.tokenizer.decode(third.tokens) == edited.decode()


def test_a_cache_file_cut_short_is_not_trusted(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text(make_corpus(3000), encoding="utf-8")
  cache = load(path, tmp_path).cache_path
  with open(cache, "r+b") as f:
    f.truncate(cache.stat().st_size - 10)
  again = load(path, tmp_path)
  assert again.built_s is not None and len(again.tokens) == 3000


@pytest.mark.parametrize("piece_bytes", [64 << 20, 700])  # One piece; several, hashed apart.
def test_flipped_bytes_in_the_token_cache_rebuild_it(tmp_path, capsys, monkeypatch,
                                                     piece_bytes):
  monkeypatch.setattr(data.cache, "PIECE_BYTES", piece_bytes)
  path = tmp_path / "t.txt"
  path.write_text(make_corpus(3000), encoding="utf-8")
  cache = load(path, tmp_path).cache_path
  assert load(path, tmp_path, hash_threads=2).built_s is None  # Its checksum holds.
  good = cache.read_bytes()
  with open(cache, "r+b") as f:  # One byte of the tokens, the size unchanged.
    f.seek(len(good) - 1000)
    f.write(bytes([good[-1000] ^ 0x01]))
  capsys.readouterr()
  again = load(path, tmp_path)
  assert again.built_s is not None and cache.read_bytes() == good
  assert (f"⚠ The token cache {cache} differs from its checksum (damaged on disk): "
          "rebuilding it.") in capsys.readouterr().out
  assert again.tokenizer.decode(again.tokens) == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("make", ["writable", "link"])
def test_a_cache_entry_another_user_could_write_is_not_loaded(tmp_path, make):
  path = tmp_path / "t.txt"
  path.write_text(make_corpus(3000), encoding="utf-8")
  cache = load(path, tmp_path).cache_path
  if make == "writable":
    cache.chmod(0o666)
  else:  # A link to a good cache elsewhere: still not this run's file.
    elsewhere = tmp_path / "elsewhere.tokens"
    cache.rename(elsewhere)
    cache.symlink_to(elsewhere)
  again = load(path, tmp_path)
  assert again.built_s is not None and not cache.is_symlink()
  assert cache.stat().st_mode & 0o777 == 0o600


# Each process builds the cache, then waits at its rename until the other has built it too
# (or 60 s: then the other did not build, and the test fails on what it prints).
BUILD_BOTH = """
import os, sys, time
from pathlib import Path
from randygpt import data
text, cache, arrived, me = sys.argv[1:]
rename = os.replace
def rename_once_both_built(source, target):
  (Path(arrived) / me).touch()
  deadline = time.monotonic() + 60
  while len(os.listdir(arrived)) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
  rename(source, target)
os.replace = rename_once_both_built
corpus = data.load_corpus(text, Path(cache))
print(corpus.built_s is not None, corpus.cache_path.name, corpus.tokenizer.decode(corpus.tokens) ==
      Path(text).read_text(encoding="utf-8"))
"""


def test_two_processes_building_the_same_cache_at_once_both_build_it(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text(make_corpus(200_000), encoding="utf-8")
  arrived = tmp_path / "arrived"
  arrived.mkdir()
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  procs = [subprocess.Popen([sys.executable, "-c", BUILD_BOTH, str(path), str(tmp_path / "cache"),
                             str(arrived), str(rank)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for rank in range(2)]
  outputs = [proc.communicate(timeout=300) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], outputs
  results = [out.strip().splitlines()[-1].split() for out, _ in outputs]
  name = results[0][1]
  assert results == [["True", name, "True"]] * 2, outputs  # Both built it, both read it whole.
  assert sorted(os.listdir(arrived)) == ["0", "1"]
  assert [p.name for p in (tmp_path / "cache").iterdir()] == [name]


def test_a_full_disk_while_writing_the_cache_leaves_nothing_half_written(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text(make_corpus(200_000), encoding="utf-8")
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # A write past the limit fails.
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
  try:
    with pytest.raises(UserError, match=r"^Could not write the token cache .*\(File too large\)"):
      load(path, tmp_path)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  assert list((tmp_path / "cache").iterdir()) == []
  assert load(path, tmp_path).built_s is not None  # Once there is room, it builds.


def test_a_directory_is_its_files_in_byte_order_joined(tmp_path):
  folder = tmp_path / "docs"
  folder.mkdir()
  for name, text in (("b.md", "bee\n"), ("B.md", "BIG\n"), ("a.md", "ay\n"), ("empty.md", "")):
    (folder / name).write_text(text * 100, encoding="utf-8")
  (folder / "sub").mkdir()
  (folder / "sub" / "z.md").write_text("not read\n", encoding="utf-8")
  corpus = load(folder, tmp_path)
  assert corpus.tokenizer.decode(corpus.tokens) == "BIG\n" * 100 + "ay\n" * 100 + "bee\n" * 100
  assert [os.path.basename(f["path"]) for f in corpus.files] == ["B.md", "a.md", "b.md",
                                                                  "empty.md"]
  assert corpus.description == f"{folder} (4 files)"


def test_a_glob_and_a_list_name_files_in_order(tmp_path):
  for name in ("x1.txt", "x2.txt", "y.txt"):
    (tmp_path / name).write_text(name * 100, encoding="utf-8")
  by_glob = load(tmp_path / "x*.txt", tmp_path)
  assert by_glob.tokenizer.decode(by_glob.tokens) == "x1.txt" * 100 + "x2.txt" * 100
  listed = load(f"{tmp_path / 'y.txt'},{tmp_path / 'x1.txt'}", tmp_path)
  assert listed.tokenizer.decode(listed.tokens) == "y.txt" * 100 + "x1.txt" * 100


@pytest.mark.parametrize("bad, message", [
    ("missing.txt", "missing.txt does not exist"),
    ("bin.dat", "bin.dat looks like a binary file"),
    ("latin.txt", "latin.txt is not valid utf-8 text \\(byte 0xe9 at offset 1006\\)"),
])
def test_a_bad_file_among_others_is_named(tmp_path, bad, message):
  (tmp_path / "good.txt").write_text(make_corpus(3000), encoding="utf-8")
  (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 4)
  (tmp_path / "latin.txt").write_bytes(b"x" * 1003 + "café".encode("latin-1"))
  with pytest.raises(UserError, match=message):
    load(f"{tmp_path / 'good.txt'},{tmp_path / bad}", tmp_path)
  assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\t \n", "only whitespace"),
    (bytes(range(256)) * 4, "binary"),
    ("café au lait".encode("latin-1"), "not valid utf-8"),
])
def test_bad_files_are_refused(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  with pytest.raises(UserError, match=message):
    load(path, tmp_path)


def test_another_encoding_is_read(tmp_path):
  path = tmp_path / "latin.txt"
  path.write_bytes("café au lait".encode("latin-1"))
  corpus = load(path, tmp_path, encoding="latin-1")
  assert corpus.tokenizer.decode(corpus.tokens) == "café au lait"
  with pytest.raises(UserError, match="Unknown --data_encoding=nope"):
    load(path, tmp_path, encoding="nope")


def test_an_empty_directory_and_an_unmatched_glob_are_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="is a directory with no files"):
    load(tmp_path / "empty", tmp_path)
  with pytest.raises(UserError, match="matches no files"):
    load(tmp_path / "*.nothing", tmp_path)


def test_missing_explicit_file_is_an_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load(tmp_path / "nope.txt", tmp_path)


def test_missing_default_file_falls_back_to_builtin_sample(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  corpus = load(data.DEFAULT_DATA, tmp_path)
  assert corpus.description == "built-in sample" and "built-in sample" in capsys.readouterr().out
  assert len(corpus.tokens) >= data.min_text_length(64)
  with pytest.raises(UserError, match="does not exist"):
    load(data.DEFAULT_DATA, tmp_path, sample_fallback=False)


def test_split_is_90_10_in_order_and_does_not_copy():
  tokens = np.arange(1000, dtype=np.int32)
  train, val = data.split(tokens, block_size=8)
  assert len(train) == 900 and len(val) == 100
  np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
  assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)


def test_split_refuses_text_too_short_for_a_val_window():
  block = 16
  data.split(np.zeros(data.min_text_length(block), np.int32), block)
  with pytest.raises(UserError, match="too short"):
    data.split(np.zeros(data.min_text_length(block) - 1, np.int32), block)


def previous_get_batch(tokens, key, batch_size, block_size):
  """The windows as the implementation before the token cache drew them, on the device."""
  tokens = jnp.asarray(tokens)
  starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - block_size)
  windows = tokens[starts[:, None] + jnp.arange(block_size + 1)]
  return windows[:, :-1], windows[:, 1:]


def test_windows_are_the_previous_implementations():
  tokens = np.random.default_rng(0).integers(0, 65, 50_000).astype(np.uint8)
  key = jax.random.fold_in(jax.random.key(1337), 1)
  sampler = data.WindowSampler(tokens, key, 32, 64, steps_ahead=8)
  for step in (1, 7, 8, 9, 1000):
    want = previous_get_batch(tokens, jax.random.fold_in(key, step), 32, 64)
    got = sampler(step)
    for w, g in zip(want, got):
      assert g.dtype == np.int32
      np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(data.get_batch(tokens, jax.random.fold_in(key, step), 32, 64)[0],
                                  want[0])


def test_targets_are_inputs_shifted_by_one_and_the_last_window_is_reached():
  tokens = np.arange(20, dtype=np.uint16)
  x, y = data.get_batch(tokens, jax.random.key(0), 512, 4)
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  np.testing.assert_array_equal(x[:, 1:] - x[:, :-1], 1)  # Contiguous windows.
  assert int(y.max()) == 19


def test_window_starts_cover_a_text_longer_than_int32():
  n_tokens, block = 2**33 + 12_345, 64
  starts = data.window_starts(jax.random.key(0), 4096, n_tokens, block)
  assert starts.dtype == np.int64
  assert starts.min() >= 0 and starts.max() < n_tokens - block
  assert (starts > 2**32).mean() > 0.4  # Uniform over 2^33: about half are above 2^32.
  assert abs(starts.mean() / (n_tokens - block) - 0.5) < 0.05
  sampler = data.WindowSampler(np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8),
                                                               (n_tokens,), (0,)),
                               jax.random.key(0), 8, block, steps_ahead=4)
  x, _ = sampler(5)  # Gathers windows far past 2^31 from a zero-strided stand-in.
  assert x.shape == (8, block)


@pytest.fixture
def http_server(tmp_path):
  """Serves tmp_path/www on 127.0.0.1; yields the base URL."""
  www = tmp_path / "www"
  www.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield www, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()


@pytest.fixture
def known_corpus(monkeypatch):
  """Registers a small known dataset, as tinyshakespeare.txt is registered."""
  content = make_corpus().encode()
  known = data.KnownDataset(url="unused", sha256=hashlib.sha256(content).hexdigest(),
                            size=len(content))
  monkeypatch.setitem(data.KNOWN_DATASETS, "known.txt", known)
  return content


def test_download_of_known_dataset_checks_and_saves(tmp_path, http_server, known_corpus):
  www, url = http_server
  (www / "input.txt").write_bytes(known_corpus)
  dest = tmp_path / "data" / "known.txt"
  corpus = data.load_corpus(str(dest), tmp_path / "cache", url=f"{url}/input.txt")
  assert corpus.tokenizer.decode(corpus.tokens).encode() == known_corpus
  assert dest.read_bytes() == known_corpus and corpus.description == str(dest)
  assert list(dest.parent.iterdir()) == [dest]  # No temporary file left behind.


def test_download_with_wrong_checksum_saves_nothing(tmp_path, http_server, known_corpus):
  www, url = http_server
  (www / "input.txt").write_bytes(known_corpus[:-1] + b"!")
  dest = tmp_path / "data" / "known.txt"
  with pytest.raises(UserError, match="does not match"):
    data.load_corpus(str(dest), tmp_path / "cache", url=f"{url}/input.txt")
  assert not dest.parent.exists() or not any(dest.parent.iterdir())


def test_a_download_longer_than_the_known_size_stops_there(tmp_path, known_corpus):
  """A server that sends without end (a wrong URL, a hostile server): the download stops
  one byte past the known size and saves nothing; the server sees the connection closed
  long before its 1 GiB is sent."""
  sent, ended = [], threading.Event()

  class Endless(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      self.send_response(200)
      self.end_headers()
      block, total = b"x" * (1 << 20), 0
      try:
        while total < 1 << 30:
          self.wfile.write(block)
          total += len(block)
      except OSError:
        pass
      sent.append(total)
      ended.set()

    def log_message(self, *args):
      pass
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  dest = tmp_path / "data" / "known.txt"
  url = f"http://127.0.0.1:{server.server_address[1]}/input.txt"
  try:
    with raises_user_error(f"Downloaded {url} is longer than the expected "
                           f"{len(known_corpus):,} bytes: stopped there. Nothing was saved; "
                           f"download it yourself to {dest} or pass --data=PATH."):
      data.load_corpus(str(dest), tmp_path / "cache", url=url)
    assert not any(dest.parent.iterdir())
    ended.wait(60)
  finally:
    server.shutdown()
  assert sent and sent[0] < 1 << 30


def test_download_failure_says_where_to_put_the_file(tmp_path, http_server, known_corpus):
  _, url = http_server
  dest = tmp_path / "known.txt"
  with pytest.raises(UserError, match=f"Put the file at {dest}"):
    data.load_corpus(str(dest), tmp_path / "cache", url=f"{url}/missing.txt")
  assert not dest.exists()


def test_tinyshakespeare_is_a_known_dataset():
  known = data.KNOWN_DATASETS["tinyshakespeare.txt"]
  assert known.size == 1_115_394
  assert known.sha256.startswith("86c4e6aa") and known.sha256.endswith("65ed")


@needs_shakespeare
def test_the_tests_find_tiny_shakespeare_where_the_quick_start_put_it(tmp_path):
  """The repository's data/ first, a copy elsewhere next; a file that is not it does not count
  (the tests that need it are skipped, saying where the quick start downloads it)."""
  wrong, right = tmp_path / "data" / "tinyshakespeare.txt", tmp_path / "shared.txt"
  wrong.parent.mkdir()
  wrong.write_bytes(SHAKESPEARE.read_bytes()[:-1] + b"?")
  right.write_bytes(SHAKESPEARE.read_bytes())
  assert find_shakespeare((wrong, right)) == (right, "")
  found, why = find_shakespeare((wrong, tmp_path / "absent.txt"))
  assert found == wrong and "./launch.sh experiments/shakespeare.cfg downloads it" in why
  right.rename(wrong)
  assert find_shakespeare((wrong, tmp_path / "absent.txt")) == (wrong, "")


@needs_shakespeare
def test_tinyshakespeare_download_verifies_the_real_file(tmp_path, http_server):
  www, url = http_server
  (www / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
  dest = tmp_path / "data" / "tinyshakespeare.txt"
  corpus = data.load_corpus(str(dest), tmp_path / "cache", url=f"{url}/input.txt")
  assert len(corpus.tokens) == 1_115_394 and dest.exists()


def test_windows_read_from_the_token_file_equal_the_arrays(tmp_path):
  cjk = "".join(map(chr, range(0x4E00, 0x4E00 + 300)))  # Over 256 symbols: uint16.
  (tmp_path / "t.txt").write_text(make_corpus(20_000) + cjk, encoding="utf-8")
  corpus = load(tmp_path / "t.txt", tmp_path)
  assert corpus.tokens.dtype == np.uint16
  train, val = data.split(corpus.tokens, 16)
  whole = np.asarray(corpus.tokens)
  starts = np.array([0, 5, len(val) - 17])
  for part, offset in ((train, 0), (val, len(train))):
    assert isinstance(part, data.TokenFile)
    got = data.windows(part, starts, 16)
    want = data.windows(whole[offset:], starts, 16)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
