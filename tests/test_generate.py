import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randygpt import generate, model
from randygpt.config import ModelConfig, SampleConfig

CONFIG = ModelConfig(vocab_size=13, n_embd=16, n_head=2, n_layer=2, block_size=8)


@pytest.fixture(scope="module")
def params():
  return model.init_params(jax.random.key(0), CONFIG)


def random_logits(seed=0, batch=64, vocab=50):
  return jax.random.normal(jax.random.key(seed), (batch, vocab)) * 3.0


def kept(logits):
  return np.isfinite(np.asarray(logits))


def test_top_k_keeps_exactly_the_k_largest(maybe_jit):
  logits = random_logits()
  filtered = maybe_jit(generate.filter_logits, static_argnums=(1, 2, 3))(logits, 1.0, 5, 1.0)
  assert (kept(filtered).sum(axis=-1) == 5).all()
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  assert np.take_along_axis(kept(filtered), top5, axis=-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p(maybe_jit):
  logits = random_logits(1)
  top_p = 0.7
  filtered = maybe_jit(generate.filter_logits, static_argnums=(1, 2, 3))(logits, 1.0, 0, top_p)
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


def test_generate_goes_past_the_context_window(params):
  cfg = SampleConfig(max_new_tokens=3 * CONFIG.block_size, temperature=1.0, top_p=1.0)
  out = generate.generate(params, jnp.array([1, 2, 3]), jax.random.key(0), CONFIG, cfg)
  assert out.shape == (3 * CONFIG.block_size,)
  assert int(out.min()) >= 0 and int(out.max()) < CONFIG.vocab_size


def test_generate_is_deterministic_for_a_key(params):
  cfg = SampleConfig(max_new_tokens=20, temperature=1.0, top_p=1.0)
  prompt = jnp.array([4, 5])
  a = generate.generate(params, prompt, jax.random.key(7), CONFIG, cfg)
  b = generate.generate(params, prompt, jax.random.key(7), CONFIG, cfg)
  c = generate.generate(params, prompt, jax.random.key(8), CONFIG, cfg)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_greedy_generation_matches_argmax_of_a_cropped_forward(params):
  cfg = SampleConfig(max_new_tokens=20, temperature=1.0, top_k=1)
  prompt = [3, 1, 4, 1, 5]
  out = generate.generate(params, jnp.array(prompt), jax.random.key(0), CONFIG, cfg)
  seq = list(prompt)
  for _ in range(cfg.max_new_tokens):
    context = jnp.array(seq[-CONFIG.block_size:])[None]
    seq.append(int(jnp.argmax(model.forward(params, context, CONFIG)[0, -1])))
  assert np.asarray(out).tolist() == seq[len(prompt):]


def test_generate_with_a_prompt_longer_than_the_window(params):
  cfg = SampleConfig(max_new_tokens=5, temperature=1.0, top_k=1)
  prompt = list(range(CONFIG.vocab_size)) * 2  # 26 tokens > block_size 8.
  out = generate.generate(params, jnp.array(prompt), jax.random.key(0), CONFIG, cfg)
  context = jnp.array(prompt[-CONFIG.block_size:])[None]
  assert int(out[0]) == int(jnp.argmax(model.forward(params, context, CONFIG)[0, -1]))
