"""An independent float64 NumPy reference of what randygpt computes: the forward pass, the
loss, its gradient with respect to every parameter (a backward pass derived by hand), the
learning-rate schedule, and AdamW's and Muon's updates. Written from the definitions (the
papers, and optax's documented formulas where randygpt uses optax), not from randygpt: it
imports nothing of it, so a wrong mask, layer, sign or formula there shows up as a
difference here. Tests compare randygpt's float32 results with it (tests/test_reference.py,
tests/test_train.py) and check its backward pass against finite differences of its forward.

Parameters are nested dicts of arrays laid out as randygpt's: wte (V, D), wpe (block_size, D)
(absent with rotary positions), lm_head (D, V), and blocks/attn/{wqkv (L, D, 3D), wo (L, D,
D)}, blocks/mlp/{w1 (L, D, 4D), w2 (L, 4D, D)}, each block's matrices stacked along L. A
`config` is anything with randygpt's ModelConfig fields (n_embd, n_head, n_layer, block_size,
vocab_size, dropout, position, qk_norm, final_norm, logit_softcap).
"""

import math

import numpy as np

RMS_EPS = 1e-5  # Inside the square root: x / sqrt(mean(x^2) + eps).
ROPE_BASE = 10000.0  # RoFormer's (Su et al. 2021) base of the rotary frequencies.
ADAM_EPS = 1e-8  # Adam's (Kingma & Ba 2015) epsilon, outside the square root.
# Muon's quintic Newton-Schulz coefficients (Keller Jordan's, optax.contrib's default), five
# iterations, on the momentum scaled to unit Frobenius norm (plus eps = 1e-8).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-8
MUON_BETA = 0.95  # Muon's momentum (randygpt's, and Keller Jordan's).
NO_DECAY = ("wte", "wpe")  # Embeddings are not decayed.


def float64(tree):
  """A copy of a nested dict of arrays as float64 NumPy arrays."""
  if isinstance(tree, dict):
    return {k: float64(v) for k, v in tree.items()}
  return np.array(tree, np.float64)


def tree_map(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def tree_map_with_path(fn, *trees, path=()):
  """fn(keys to the leaf, its leaf in each tree), for each leaf of the first tree."""
  if isinstance(trees[0], dict):
    return {k: tree_map_with_path(fn, *(t[k] for t in trees), path=path + (k,))
            for k in trees[0]}
  return fn(path, *trees)


def leaves(tree) -> list:
  if isinstance(tree, dict):
    return [leaf for k in sorted(tree) for leaf in leaves(tree[k])]
  return [tree]


def global_norm(tree) -> float:
  return math.sqrt(sum(float(np.sum(x * x)) for x in leaves(tree)))


# The forward pass and its backward pass.

def rms_norm(x):
  """Gain-free RMSNorm over the last axis: (x r, r), r = 1 / sqrt(mean(x^2) + eps)."""
  r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)
  return x * r, r


def rms_norm_backward(x, r, dy):
  """d(x r)/dx: y_i = x_i r, dr/dx_j = -r^3 x_j / D, so dx = r dy - r^3 x mean(dy x)."""
  return r * dy - r ** 3 * x * np.mean(dy * x, axis=-1, keepdims=True)


def rotary(x_BxTxHxK, sign=1.0):
  """RoFormer's rotary embedding: feature pairs (i, i + K/2) of each head, as the complex
  number z_i, multiplied by exp(i t theta_i), theta_i = base^(-2i/K), t the position. A
  rotation: its transpose (the backward pass) is the rotation by -t theta_i (sign=-1)."""
  t, half = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1] // 2
  theta_I = ROPE_BASE ** (-2.0 * np.arange(half) / (2 * half))
  turn_TxI = np.exp(sign * 1j * np.arange(t)[:, None] * theta_I)
  z = (x_BxTxHxK[..., :half] + 1j * x_BxTxHxK[..., half:]) * turn_TxI[None, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _layer(params, layer):
  blocks = params["blocks"]
  return {name: w[layer] for part in ("attn", "mlp") for name, w in blocks[part].items()}


def forward(params, tokens_BxT, config, keep_Lx2xNxD=None):
  """Logits (B, T, V) and the activations the backward pass needs. `keep_Lx2xNxD`: dropout's
  keep-masks (inverted dropout: kept values scaled by 1 / (1 - rate)) of each layer's
  attention and MLP outputs, before they join the residual stream; None: no dropout.

  Each block (pre-norm): x += Drop(Attn(RMSNorm(x))); x += Drop(MLP(RMSNorm(x))). Attn: q,
  k, v from x Wqkv (in that order, each D wide, H heads of K = D/H), q and k RMS-normalised
  per head (qk_norm), rotated (rotary positions), causal softmax(q k^T / sqrt(K)) v, heads
  concatenated, times Wo. MLP: relu(x W1)^2 W2. Then RMSNorm (final_norm), lm_head, and
  cap·tanh(logits / cap) (logit_softcap, when not 0)."""
  p = float64(params)
  tokens_BxT = np.asarray(tokens_BxT)
  b, t = tokens_BxT.shape
  d, h = config.n_embd, config.n_head
  k = d // h
  n = b * t
  scale = 1.0 / (1.0 - config.dropout) if keep_Lx2xNxD is not None else 1.0
  x_BxTxD = p["wte"][tokens_BxT]
  if config.position == "learned":
    x_BxTxD = x_BxTxD + p["wpe"][:t]
  x = x_BxTxD.reshape(n, d)
  causal_TxS = np.tril(np.ones((t, t), bool))
  acts = {"tokens": tokens_BxT, "layers": [], "scale": scale}
  for layer in range(config.n_layer):
    w = _layer(p, layer)
    drop_attn, drop_mlp = ((np.ones((n, d)), np.ones((n, d))) if keep_Lx2xNxD is None else
                           (np.asarray(keep_Lx2xNxD[layer, 0]) * scale,
                            np.asarray(keep_Lx2xNxD[layer, 1]) * scale))
    a = {"x": x, "drop_attn": drop_attn, "drop_mlp": drop_mlp}
    a["n1"], a["r1"] = rms_norm(x)
    qkv = a["n1"] @ w["wqkv"]
    q, kk, v = (qkv[:, i * d:(i + 1) * d].reshape(b, t, h, k) for i in range(3))
    a["q0"], a["k0"] = q, kk
    if config.qk_norm:
      (q, a["rq"]), (kk, a["rk"]) = rms_norm(q), rms_norm(kk)
    if config.position == "rope":
      q, kk = rotary(q), rotary(kk)
    scores = np.einsum("bthk,bshk->bhts", q, kk) / math.sqrt(k)
    probs = softmax(np.where(causal_TxS, scores, -np.inf))
    out = np.einsum("bhts,bshk->bthk", probs, v).reshape(n, d)
    a.update(q=q, k=kk, v=v, probs=probs, out=out)
    x1 = x + (out @ w["wo"]) * drop_attn
    a["x1"] = x1
    a["n2"], a["r2"] = rms_norm(x1)
    a["pre"] = a["n2"] @ w["w1"]
    a["hidden"] = np.maximum(a["pre"], 0.0) ** 2
    x = x1 + (a["hidden"] @ w["w2"]) * drop_mlp
    acts["layers"].append(a)
  acts["x_last"] = x
  if config.final_norm:
    x, acts["r_final"] = rms_norm(x)
  acts["x_head"] = x
  logits = x @ p["lm_head"]
  if config.logit_softcap:
    logits = config.logit_softcap * np.tanh(logits / config.logit_softcap)
  return logits.reshape(b, t, config.vocab_size), acts


def cross_entropy(logits_BxTxV, targets_BxT):
  """The mean over positions of -log softmax(logits)[target]."""
  logits = logits_BxTxV.reshape(-1, logits_BxTxV.shape[-1])
  top = logits.max(axis=-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
  return float(np.mean(log_z - logits[np.arange(len(logits)), np.ravel(targets_BxT)]))


def loss(params, batch, config, keep_Lx2xNxD=None) -> float:
  inputs_BxT, targets_BxT = batch
  return cross_entropy(forward(params, inputs_BxT, config, keep_Lx2xNxD)[0], targets_BxT)


def loss_and_grads(params, batch, config, keep_Lx2xNxD=None):
  """The mean cross-entropy and its gradient with respect to every parameter (a dict laid
  out as `params`), by the chain rule through `forward`, layer by layer in reverse."""
  p = float64(params)
  inputs_BxT, targets_BxT = map(np.asarray, batch)
  logits_BxTxV, acts = forward(p, inputs_BxT, config, keep_Lx2xNxD)
  b, t = inputs_BxT.shape
  d, h = config.n_embd, config.n_head
  k, n = d // h, b * t
  logits = logits_BxTxV.reshape(n, -1)
  value = cross_entropy(logits_BxTxV, targets_BxT)

  # d mean(CE) / d logits = (softmax - onehot) / N.
  dlogits = softmax(logits)
  dlogits[np.arange(n), targets_BxT.ravel()] -= 1.0
  dlogits /= n
  if config.logit_softcap:  # d cap·tanh(u / cap) / du = 1 - tanh², tanh = logits / cap.
    dlogits *= 1.0 - (logits / config.logit_softcap) ** 2
  grads = {"lm_head": acts["x_head"].T @ dlogits}
  dx = dlogits @ p["lm_head"].T
  if config.final_norm:
    dx = rms_norm_backward(acts["x_last"], acts["r_final"], dx)

  names = {"attn": ("wqkv", "wo"), "mlp": ("w1", "w2")}
  layer_grads = {part: {name: [None] * config.n_layer for name in names[part]}
                 for part in names}
  causal = np.tril(np.ones((t, t), bool))
  for layer in reversed(range(config.n_layer)):
    w, a = _layer(p, layer), acts["layers"][layer]
    # x2 = x1 + Drop(relu(n2 W1)^2 W2), n2 = RMSNorm(x1).
    dmlp = dx * a["drop_mlp"]
    layer_grads["mlp"]["w2"][layer] = a["hidden"].T @ dmlp
    dpre = (dmlp @ w["w2"].T) * 2.0 * np.maximum(a["pre"], 0.0)
    layer_grads["mlp"]["w1"][layer] = a["n2"].T @ dpre
    dx1 = dx + rms_norm_backward(a["x1"], a["r2"], dpre @ w["w1"].T)
    # x1 = x + Drop(Attn(n1) Wo), n1 = RMSNorm(x).
    dattn = dx1 * a["drop_attn"]
    layer_grads["attn"]["wo"][layer] = a["out"].T @ dattn
    dout = (dattn @ w["wo"].T).reshape(b, t, h, k)
    dprobs = np.einsum("bthk,bshk->bhts", dout, a["v"])
    dv = np.einsum("bhts,bthk->bshk", a["probs"], dout)
    # Softmax: ds = p (dp - sum(p dp)); masked positions have p = 0.
    dscores = a["probs"] * (dprobs - np.sum(a["probs"] * dprobs, axis=-1, keepdims=True))
    dscores = np.where(causal, dscores, 0.0) / math.sqrt(k)
    dq = np.einsum("bhts,bshk->bthk", dscores, a["k"])
    dk = np.einsum("bhts,bthk->bshk", dscores, a["q"])
    if config.position == "rope":
      dq, dk = rotary(dq, sign=-1.0), rotary(dk, sign=-1.0)
    if config.qk_norm:
      dq = rms_norm_backward(a["q0"], a["rq"], dq)
      dk = rms_norm_backward(a["k0"], a["rk"], dk)
    dqkv = np.concatenate([g.reshape(n, d) for g in (dq, dk, dv)], axis=1)
    layer_grads["attn"]["wqkv"][layer] = a["n1"].T @ dqkv
    dx = dx1 + rms_norm_backward(a["x"], a["r1"], dqkv @ w["wqkv"].T)

  grads["blocks"] = {part: {name: np.stack(g) for name, g in by_name.items()}
                     for part, by_name in layer_grads.items()}
  dx_BxTxD = dx.reshape(b, t, d)
  grads["wte"] = np.zeros_like(p["wte"])
  np.add.at(grads["wte"], inputs_BxT.ravel(), dx.reshape(n, d))
  if "wpe" in p:
    grads["wpe"] = np.zeros_like(p["wpe"])
    if config.position == "learned":
      grads["wpe"][:t] = dx_BxTxD.sum(axis=0)
  return value, grads


def finite_difference(params, batch, config, path, index, keep_Lx2xNxD=None, step=1e-6):
  """The central difference (L(w + s) - L(w - s)) / 2s of the loss in one parameter
  coordinate: `path` the keys to its array, `index` its position there."""
  def loss_with(delta):
    changed = float64(params)
    leaf = changed
    for key in path:
      leaf = leaf[key]
    leaf[index] += delta
    return loss(changed, batch, config, keep_Lx2xNxD)
  return (loss_with(step) - loss_with(-step)) / (2 * step)


# The optimizer.

def warmup_cosine(step: int, peak: float, end: float, warmup: int, horizon: int) -> float:
  """The learning rate of update `step` (0 for the first): linear from 0 to `peak` over
  `warmup` updates, then cosine from `peak` down to `end` at update `horizon` (SGDR,
  Loshchilov & Hutter 2017, without restarts), flat after it."""
  if step < warmup:
    return peak * step / warmup
  progress = min(step - warmup, horizon - warmup) / (horizon - warmup)
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, peak: float, end: float, warmup: int, decay_start: int,
                        horizon: int) -> float:
  """The learning rate of update `step`: linear from 0 to `peak` over `warmup` updates, held
  at `peak` until update `decay_start`, then linear down to `end` at update `horizon` (Hu et
  al. 2024, MiniCPM), flat after it."""
  if step < warmup:
    return peak * step / warmup
  if step < decay_start:
    return peak
  progress = min(step - decay_start, horizon - decay_start) / (horizon - decay_start)
  return peak + (end - peak) * progress


def learning_rate(step: int, tc) -> float:
  """The run's learning rate at update `step` (`tc`: a TrainConfig): warmup_cosine (or, for
  lr_schedule "wsd", warmup_stable_decay with a decay of tc.decay_fraction of the horizon,
  rounded, at least one update, after the warmup) to the horizon tc.lr_decay_iters, or
  tc.iters where that is 0; a warmup longer than the horizon is cut to it, and the decay
  then lasts one update."""
  horizon = tc.lr_decay_iters or tc.iters
  warmup = min(tc.warmup_iters, horizon)
  if tc.lr_schedule == "wsd":
    start = max(warmup, horizon - max(1, round(tc.decay_fraction * horizon)))
    return warmup_stable_decay(step, tc.learning_rate, tc.min_lr, warmup, start,
                               max(horizon, start + 1))
  return warmup_cosine(step, tc.learning_rate, tc.min_lr, warmup, max(horizon, warmup + 1))


def clip_by_global_norm(grads, max_norm):
  """Gradients scaled to a global norm of at most `max_norm` (Pascanu et al. 2013)."""
  norm = global_norm(grads)
  if not max_norm or norm < max_norm:
    return grads
  return tree_map(lambda g: g * (max_norm / norm), grads)


def adam_direction(g, state, b1, b2):
  """Adam's (Kingma & Ba 2015) bias-corrected direction m_hat / (sqrt(v_hat) + eps), and
  the new moments. `state`: (m, v, t), t the updates done before this one."""
  m, v, t = state
  m = b1 * m + (1.0 - b1) * g
  v = b2 * v + (1.0 - b2) * g * g
  t += 1
  m_hat, v_hat = m / (1.0 - b1 ** t), v / (1.0 - b2 ** t)
  return m_hat / (np.sqrt(v_hat) + ADAM_EPS), (m, v, t)


def newton_schulz(g):
  """Muon's approximate orthogonalisation of a matrix (the U V^T of its SVD, singular values
  roughly in [0.7, 1.2]): scaled to unit Frobenius norm, then X <- a X + (b A + c A^2) X
  with A = X X^T, five times, on the wide orientation (transposed if it has more rows than
  columns, and back)."""
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + NS_EPS)
  a, b, c = NS_COEFFS
  for _ in range(NS_STEPS):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def muon_direction(g, state, beta, rms):
  """Muon's direction for one matrix (in, out): Nesterov momentum in optax's bias-corrected
  form (NAdam's, Dozat 2016), m_hat = beta m_t / (1 - beta^(t+1)) + (1 - beta) g /
  (1 - beta^t), orthogonalised (`newton_schulz`), scaled by rms * sqrt(max(in, out)) to an
  RMS of about `rms` (Liu et al. 2025). `state`: (m, t)."""
  m, t = state
  m = beta * m + (1.0 - beta) * g
  t += 1
  m_hat = beta * m / (1.0 - beta ** (t + 1)) + (1.0 - beta) * g / (1.0 - beta ** t)
  return newton_schulz(m_hat) * rms * math.sqrt(max(g.shape)), (m, t)


def muon_matrices(name, w_LxIxO):
  """The matrices Muon orthogonalises in a stacked block weight: each layer's, and for the
  fused wqkv each layer's q, k and v (D x D each) separately. Index tuples into the leaf."""
  layers, _, width = w_LxIxO.shape
  if name == "wqkv":
    d = width // 3
    return [(layer, slice(None), slice(i * d, (i + 1) * d))
            for layer in range(layers) for i in range(3)]
  return [(layer, slice(None), slice(None)) for layer in range(layers)]


def init_state(params):
  """The optimizer state before the first update: zero moments, no updates done."""
  zeros = tree_map(lambda x: np.zeros(np.shape(x)), params)
  return {"m": zeros, "v": tree_map(np.copy, zeros), "t": 0}


def optimizer_step(params, grads, state, tc):
  """One update of randygpt's optimizer (`tc`: a TrainConfig), in float64: the gradients
  clipped to a global norm of tc.grad_clip; for each weight Adam's direction, or with
  tc.optimizer == "muon" Muon's for the blocks' matrices; plus decoupled weight decay
  (Loshchilov & Hutter 2019) tc.weight_decay * w for all but the embeddings; the sum times
  the schedule's learning rate subtracted. Returns the new params, state and that rate."""
  p, g = float64(params), clip_by_global_norm(float64(grads), tc.grad_clip)
  t = state["t"]
  lr = learning_rate(t, tc)

  def update(path, w, grad, m, v):
    if tc.optimizer == "muon" and path[0] == "blocks":
      direction, m = np.zeros_like(w), m.copy()
      for index in muon_matrices(path[-1], w):
        direction[index], (m[index], _) = muon_direction(grad[index], (m[index], t),
                                                         MUON_BETA, tc.muon_rms)
    else:
      direction, (m, v, _) = adam_direction(grad, (m, v, t), tc.beta1, tc.beta2)
    decay = 0.0 if path[0] in NO_DECAY else tc.weight_decay
    return w - lr * (direction + decay * w), m, v

  new = tree_map_with_path(update, p, g, state["m"], state["v"])
  return (tree_map(lambda n: n[0], new),
          {"m": tree_map(lambda n: n[1], new), "v": tree_map(lambda n: n[2], new), "t": t + 1},
          lr)
