import functools
import hashlib
import http.server
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import data
from randygpt.errors import UserError

from conftest import SHAKESPEARE, make_corpus, needs_shakespeare, unjitted


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


def test_split_is_90_10_and_in_order():
  tokens = np.arange(1000, dtype=np.int32)
  train, val = data.split(tokens, block_size=8)
  assert len(train) == 900 and len(val) == 100
  np.testing.assert_array_equal(np.concatenate([train, val]), tokens)


def test_split_refuses_text_too_short_for_a_val_window():
  block = 16
  data.split(np.zeros(data.min_text_length(block), np.int32), block)
  with pytest.raises(UserError, match="too short"):
    data.split(np.zeros(data.min_text_length(block) - 1, np.int32), block)


def test_get_batch_targets_are_inputs_shifted_by_one():
  tokens = jnp.arange(500, dtype=jnp.int32)
  x, y = jax.jit(data.get_batch, static_argnums=(2, 3))(tokens, jax.random.key(0), 8, 16)
  assert x.shape == y.shape == (8, 16)
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  np.testing.assert_array_equal(x[:, 1:] - x[:, :-1], 1)  # Contiguous windows.
  assert int(y.max()) < 500
  want = unjitted(data.get_batch)(tokens, jax.random.key(0), 8, 16)
  np.testing.assert_array_equal(x, want[0])  # The same windows as without jit.


def test_get_batch_reaches_the_last_window():
  tokens = jnp.arange(20, dtype=jnp.int32)
  _, y = data.get_batch(tokens, jax.random.key(0), 512, 4)
  assert int(y.max()) == 19


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"  \n\t \n", "only whitespace"),
    (bytes(range(256)) * 4, "binary"),
    ("café au lait".encode("latin-1"), "not valid utf-8"),
])
def test_read_text_refuses_bad_files(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  with pytest.raises(UserError, match=message):
    data.read_text(path)


def test_read_text_accepts_another_encoding(tmp_path):
  path = tmp_path / "latin.txt"
  path.write_bytes("café au lait".encode("latin-1"))
  assert data.read_text(path, "latin-1") == "café au lait"


def test_read_text_refuses_a_directory(tmp_path):
  with pytest.raises(UserError, match="directory"):
    data.read_text(tmp_path)


def test_missing_explicit_file_is_an_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    data.load_text(str(tmp_path / "nope.txt"))


def test_missing_default_file_falls_back_to_builtin_sample(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  text, source = data.load_text(data.DEFAULT_DATA)
  assert text == data.fallback_text() and source == "built-in sample"
  assert "built-in sample" in capsys.readouterr().out
  assert len(text) >= data.min_text_length(64)


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
  text, source = data.load_text(str(dest), url=f"{url}/input.txt")
  assert text.encode() == known_corpus and dest.read_bytes() == known_corpus
  assert source == str(dest)
  assert list(dest.parent.iterdir()) == [dest]  # No temporary file left behind.


def test_download_with_wrong_checksum_saves_nothing(tmp_path, http_server, known_corpus):
  www, url = http_server
  (www / "input.txt").write_bytes(known_corpus[:-1] + b"!")
  dest = tmp_path / "data" / "known.txt"
  with pytest.raises(UserError, match="does not match"):
    data.load_text(str(dest), url=f"{url}/input.txt")
  assert not dest.parent.exists() or not any(dest.parent.iterdir())


def test_download_failure_says_where_to_put_the_file(tmp_path, http_server, known_corpus):
  _, url = http_server
  dest = tmp_path / "known.txt"
  with pytest.raises(UserError, match=f"Put the file at {dest}"):
    data.load_text(str(dest), url=f"{url}/missing.txt")
  assert not dest.exists()


def test_tinyshakespeare_is_a_known_dataset():
  known = data.KNOWN_DATASETS["tinyshakespeare.txt"]
  assert known.size == 1_115_394
  assert known.sha256.startswith("86c4e6aa") and known.sha256.endswith("65ed")


@needs_shakespeare
def test_tinyshakespeare_download_verifies_the_real_file(tmp_path, http_server):
  www, url = http_server
  (www / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
  dest = tmp_path / "data" / "tinyshakespeare.txt"
  text, _ = data.load_text(str(dest), url=f"{url}/input.txt")
  assert len(text) == 1_115_394 and dest.exists()
