import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import data, generate, model
from randygpt.config import ModelConfig, SampleConfig
from randygpt.errors import UserError

import reference
from conftest import unjitted

CONFIG = ModelConfig(vocab_size=13, n_embd=16, n_head=2, n_layer=2, block_size=8)


@pytest.fixture(scope="module")
def params():
  return jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), CONFIG)


def random_logits(seed=0, batch=64, vocab=50):
  return jax.random.normal(jax.random.key(seed), (batch, vocab)) * 3.0


def kept(logits):
  return np.isfinite(np.asarray(logits))


def test_top_k_keeps_exactly_the_k_largest():
  logits = random_logits()
  filtered = generate.filter_logits(logits, 1.0, 5, 1.0)
  assert (kept(filtered).sum(axis=-1) == 5).all()
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  assert np.take_along_axis(kept(filtered), top5, axis=-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = random_logits(1)
  top_p = 0.7
  filtered = generate.filter_logits(logits, 1.0, 0, top_p)
  probs = np.asarray(jax.nn.softmax(logits))
  for p_row, keep_row in zip(probs, kept(filtered)):
    order = np.argsort(-p_row)
    n_keep = keep_row.sum()
    assert keep_row[order[:n_keep]].all()  # The kept set is a prefix of the sorted tokens...
    assert p_row[order[:n_keep]].sum() >= top_p - 1e-6  # ...that reaches top_p...
    assert p_row[order[:n_keep - 1]].sum() < top_p  # ...and is the smallest such prefix.


def test_top_p_never_drops_the_most_likely_token():
  logits = jnp.array([[10.0, 0.0, 0.0]])
  filtered = generate.filter_logits(logits, 1.0, 0, 0.01)
  np.testing.assert_array_equal(kept(filtered), [[True, False, False]])


def test_sampling_never_draws_an_excluded_token():
  logits = random_logits(2, batch=4)
  filtered = generate.filter_logits(logits, 0.8, 10, 0.5)
  draws = jax.random.categorical(jax.random.key(3), filtered[:, None, :], shape=(4, 2000))
  allowed = kept(filtered)
  for row in range(4):
    assert allowed[row, np.asarray(draws[row])].all()


def test_temperature_scales_logits():
  logits = random_logits(4)
  np.testing.assert_allclose(generate.filter_logits(logits, 0.5), logits * 2.0, rtol=1e-6)


def test_zero_temperature_is_greedy():
  logits = random_logits(5, batch=8)
  tokens = generate._draw(logits, jax.random.key(0), SampleConfig(temperature=0.0))
  np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))


# Trained models give decisive logits; scaled-up random weights stand in for one.
@pytest.fixture(scope="module")
def decisive_params(params):
  return jax.tree.map(lambda w: 8.0 * w, params)


LOGITS_TOL = 1e-4  # float32 agreement between the cached and the full forward.
# The reference the cached path is checked against, compiled once per window length (an
# eager call would compile its layer loop again at every call).
full_forward = jax.jit(model.forward, static_argnames=("config",))


def test_cached_forward_matches_the_full_forward_at_every_step(decisive_params):
  # The full forward here is the float64 reference's (tests/reference.py), which
  # test_levers.py and test_reference.py check randygpt's full forward against.
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, CONFIG.block_size), 0,
                                  CONFIG.vocab_size)
  full_BxTxV = reference.forward(decisive_params, tokens_BxT, CONFIG)[0]
  forward_cached = jax.jit(model.forward_cached, static_argnums=(4,))
  prefill = 3
  cache = model.init_cache(CONFIG, batch=2)
  logits_BxPxV, cache = forward_cached(decisive_params, tokens_BxT[:, :prefill], cache, 0,
                                       CONFIG)
  np.testing.assert_allclose(logits_BxPxV, full_BxTxV[:, :prefill], atol=LOGITS_TOL)
  for pos in range(prefill, CONFIG.block_size):  # Teacher-forced, one position at a time.
    logits_Bx1xV, cache = forward_cached(decisive_params, tokens_BxT[:, pos:pos + 1], cache,
                                         pos, CONFIG)
    np.testing.assert_allclose(logits_Bx1xV[:, 0], full_BxTxV[:, pos], atol=LOGITS_TOL)


def test_generation_jitted_matches_unjitted_smoke(decisive_params):
  # conftest.unjitted runs the sampler's scan and loop in Python, op by op: a smoke test of
  # tracing differences, as short as covers both paths (a prompt of 7 in a window of 8: two
  # tokens from the cache, prefill and one decoding step, then one that re-runs the window)
  # and sampling with top-k and top-p. The draws are compared exactly: the closest call
  # between two tokens here (top-two logits, plus the Gumbel noise) is far above the ~1e-6
  # that jitted and unjitted logits differ by. That the cache computes what the full forward
  # does, and the draws what the filters allow, is checked jitted above and below.
  sample_config = SampleConfig(max_new_tokens=3, temperature=0.8, top_k=5, top_p=0.9)
  prompt_BxP = np.asarray(jax.random.randint(jax.random.key(5), (3, CONFIG.block_size - 1), 0,
                                             CONFIG.vocab_size))
  got_BxN, want_BxN = (fn(decisive_params, prompt_BxP, jax.random.key(6), CONFIG,
                          sample_config)
                       for fn in (generate.generate, unjitted(generate.generate)))
  np.testing.assert_array_equal(got_BxN, want_BxN)
  assert got_BxN.shape == (3, 3) and len(np.unique(np.asarray(got_BxN))) > 1


def reference_logits(params, prompt_BxP, out_BxN):
  """Full-forward logits behind each generated token, on the generated text itself."""
  seq_BxL = np.concatenate([prompt_BxP, np.asarray(out_BxN)], axis=1)
  n_prompt = prompt_BxP.shape[1]
  steps = []
  for i in range(out_BxN.shape[1]):
    context = seq_BxL[:, max(0, n_prompt + i - CONFIG.block_size):n_prompt + i]
    steps.append(np.asarray(full_forward(params, jnp.asarray(context), CONFIG)[:, -1]))
  return np.stack(steps, axis=1)  # B x N x V


@pytest.mark.parametrize("n_prompt", [1, 3, CONFIG.block_size, 2 * CONFIG.block_size + 1])
def test_greedy_tokens_are_the_argmax_of_the_full_forward(decisive_params, n_prompt):
  cfg = SampleConfig(max_new_tokens=3 * CONFIG.block_size, temperature=0.0)
  prompt_BxP = np.asarray(jax.random.randint(jax.random.key(n_prompt), (3, n_prompt), 0,
                                             CONFIG.vocab_size))
  out_BxN = generate.generate(decisive_params, prompt_BxP, jax.random.key(0), CONFIG, cfg)
  logits_BxNxV = reference_logits(decisive_params, prompt_BxP, out_BxN)
  top2_BxNx2 = np.sort(logits_BxNxV, axis=-1)[..., -2:]
  decisive_BxN = top2_BxNx2[..., 1] - top2_BxNx2[..., 0] > LOGITS_TOL
  assert decisive_BxN.mean() > 0.9  # Nearly every step is checked.
  np.testing.assert_array_equal(np.asarray(out_BxN)[decisive_BxN],
                                logits_BxNxV.argmax(axis=-1)[decisive_BxN])


def test_cached_and_uncached_generation_give_the_same_tokens(decisive_params):
  cfg = SampleConfig(max_new_tokens=3 * CONFIG.block_size, temperature=1.0, top_p=0.95)
  prompt_BxP = np.array([[1, 2, 3]] * 4)
  cached, uncached = (generate.generate(decisive_params, prompt_BxP, jax.random.key(3),
                                        CONFIG, cfg, use_cache=use_cache)
                      for use_cache in (True, False))
  np.testing.assert_array_equal(cached, uncached)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (4, 0.8)])
def test_generation_never_draws_a_token_outside_top_k_or_top_p(params, top_k, top_p):
  cfg = SampleConfig(max_new_tokens=2 * CONFIG.block_size, temperature=1.0, top_k=top_k,
                     top_p=top_p)
  prompt_BxP = np.array([[5, 6]] * 16)
  out_BxN = np.asarray(generate.generate(params, prompt_BxP, jax.random.key(11), CONFIG, cfg))
  logits_BxNxV = reference_logits(params, prompt_BxP, out_BxN)
  order_BxNxV = np.argsort(-logits_BxNxV, axis=-1)
  rank_BxN = (order_BxNxV == out_BxN[..., None]).argmax(axis=-1)
  if top_k:
    assert (rank_BxN < top_k).all()
  probs_BxNxV = np.take_along_axis(np.asarray(jax.nn.softmax(logits_BxNxV)), order_BxNxV, -1)
  mass_before_BxN = np.take_along_axis(np.cumsum(probs_BxNxV, -1) - probs_BxNxV,
                                       rank_BxN[..., None], -1)[..., 0]
  assert (mass_before_BxN < top_p + 1e-6).all()
  assert len(np.unique(out_BxN)) > 1  # Sampling happened: not a degenerate greedy run.


def test_generation_is_deterministic_for_a_key_and_streams_differ(params):
  cfg = SampleConfig(max_new_tokens=20, temperature=1.0, top_p=1.0)
  prompt_BxP = np.array([[4, 5]] * 2)
  a = generate.generate(params, prompt_BxP, jax.random.key(7), CONFIG, cfg)
  b = generate.generate(params, prompt_BxP, jax.random.key(7), CONFIG, cfg)
  c = generate.generate(params, prompt_BxP, jax.random.key(8), CONFIG, cfg)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])


def test_zero_new_tokens(params):
  cfg = SampleConfig(max_new_tokens=0)
  assert generate.generate(params, np.array([[1]]), jax.random.key(0), CONFIG, cfg).shape == (1, 0)


def test_complete_draws_num_samples_continuations(params):
  tokenizer = data.CharTokenizer(tuple("abcdefghijklm"))
  cfg = SampleConfig(max_new_tokens=12, num_samples=3, temperature=1.0)
  texts = generate.complete(params, tokenizer, "abc", jax.random.key(0), CONFIG, cfg)
  assert len(texts) == 3 and all(len(t) == 12 for t in texts)
  assert len(set(texts)) > 1


TOKENIZER = data.CharTokenizer.from_text("hello world\nHELLO:")
DEFAULT = ("ROMEO:",)


def test_default_prompt_without_newline_in_vocabulary_starts_from_first_character():
  assert generate.check_prompts(DEFAULT, data.CharTokenizer.from_text("abc")) == ("a",)


def test_user_prompt_outside_vocabulary_is_an_error():
  with pytest.raises(UserError, match="'Z'"):
    generate.check_prompts(("hello", "Zed"), TOKENIZER)


def test_default_prompt_outside_vocabulary_falls_back_to_newline(capsys):
  assert generate.check_prompts(DEFAULT, TOKENIZER) == ("\n",)
  assert "default prompt" in capsys.readouterr().out


def test_prompts_that_fit_are_kept():
  assert generate.check_prompts(("HELLO:", "world"), TOKENIZER) == ("HELLO:", "world")
