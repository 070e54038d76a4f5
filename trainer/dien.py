"""DIEN-like ranker (Zhou et al. 2019, "Deep Interest Evolution Network").

The notebook's network, scoring one candidate item for a user:

  items:     item embedding + embedding of the item's category (DIEN's goods
             id + category), for the history and the candidate alike.
  extractor: a GRU over the left-padded history; its state at every position
             is the interest at that click.
  attention: MLP(80 relu, 40 relu, 1) over [q, h_t, q - h_t, q * h_t], the
             query q being the candidate projected to the GRU width (the
             notebook subtracted a [D] embedding from [H] states, which only
             works when D == H); softmax over the real positions.
  evolution: AIGRU (attention scales the input) or AUGRU (attention scales
             the update gate, the paper's best variant) over the extractor
             states; its last state is the evolved interest.
  head:      [user, candidate, evolved interest, standardised dense features]
             -> MLP(128, 64 relu, dropout) -> one logit.
  aux loss:  (paper eq. 6, optional) the extractor state h_t must tell the
             next click e_{t+1} from a uniformly sampled item.

The GRUs are written out as a Python loop over the static history length:
training steps are XLA jit-compiled, and XLA on CPU handles a tf.while_loop
(Keras RNN layers) much worse than an unrolled loop over a short sequence.
A padding step carries the state unchanged, so with left padding the state
stays 0 until the first real click and ids in padded slots never matter.
"""

import keras
import numpy as np
import tensorflow as tf

from trainer.config import EVOLUTIONS
from trainer.models import SeededDropout, checkpoint_list
from trainer.precision import large_negative


def _f32(x: tf.Tensor) -> tf.Tensor:
  # Layers return the policy's compute dtype (bfloat16 under mixed precision).
  return tf.cast(x, tf.float32)


class GRUCell(keras.layers.Layer):
  """One GRU step, optionally modulated by a per-example attention scalar a_t.

    r  = σ(W_r x + U_r h + b_r)
    u  = σ(W_u x + U_u h + b_u)
    h~ = tanh(W_h x + r ⊙ (U_h h) + b_h)     (reset applied after U_h, as
                                             cuDNN/Keras reset_after)
    h' = (1 - u) ⊙ h + u ⊙ h~

  mode "gru": as above; "aigru": x' = a_t x; "augru": u' = a_t u. With a_t = 1
  both are the plain step; with a_t = 0, AUGRU keeps h (u' = 0).
  """

  def __init__(self, units: int, **kwargs):
    super().__init__(**kwargs)
    self.units = units

  def build(self, input_shape):
    dim, units = int(input_shape[-1]), self.units
    self.kernel = self.add_weight(shape=(dim, 3 * units), initializer="glorot_uniform",
                                  name="kernel")
    self.recurrent_kernel = self.add_weight(shape=(units, 3 * units), initializer="orthogonal",
                                            name="recurrent_kernel")
    self.bias = self.add_weight(shape=(3 * units,), initializer="zeros", name="bias")
    self.built = True

  def input_gates(self, x: tf.Tensor, attention: tf.Tensor | None = None,
                  mode: str = "gru") -> tf.Tensor:
    """Input side of the gates, W x' + b [..., 3H]: one matmul for all steps rather than
    one per unrolled step. AIGRU's x' = a x just scales the product: W (a x) = a (W x)."""
    _check_mode(mode, attention)
    if not self.built:
      self.build(x.shape)
    gates = tf.linalg.matmul(_f32(x), tf.cast(self.kernel, tf.float32))
    if mode == "aigru":
      gates *= _f32(attention)[..., None]
    return gates + tf.cast(self.bias, tf.float32)

  def step(self, gates_x: tf.Tensor, h: tf.Tensor, attention: tf.Tensor | None = None,
           mode: str = "gru", recurrent_kernel: tf.Tensor | None = None) -> tf.Tensor:
    """gates_x [B, 3H] (input_gates), h [B, H], attention [B] -> h' [B, H].
    recurrent_kernel: the variable read once for the whole loop."""
    _check_mode(mode, attention)
    if recurrent_kernel is None:
      recurrent_kernel = tf.cast(self.recurrent_kernel, tf.float32)
    units = self.units
    gates_h = tf.linalg.matmul(h, recurrent_kernel)
    r, u = tf.split(tf.sigmoid(gates_x[:, :2 * units] + gates_h[:, :2 * units]), 2, axis=-1)
    if mode == "augru":
      u *= _f32(attention)[:, None]
    candidate = tf.tanh(gates_x[:, 2 * units:] + r * gates_h[:, 2 * units:])
    return h + u * (candidate - h)  # == (1 - u) h + u h~

  def call(self, x, h, attention=None, mode="gru"):
    return self.step(self.input_gates(x, attention, mode), _f32(h), attention, mode)


def _check_mode(mode, attention):
  if mode not in ("gru",) + EVOLUTIONS:
    raise ValueError(f"unknown GRU mode {mode!r}")
  if mode != "gru" and attention is None:
    raise ValueError(f"mode {mode!r} needs an attention weight per step")


def run_gru(cell: GRUCell, x: tf.Tensor, mask: tf.Tensor, attention: tf.Tensor | None = None,
            mode: str = "gru", return_sequences: bool = False) -> tf.Tensor:
  """The cell over x [B, L, D] (L static) from a zero state; where mask [B, L] is false
  the state is carried unchanged. Returns every state [B, L, H] or the last [B, H]."""
  length = x.shape[1]
  if length is None:
    raise ValueError("run_gru needs a static sequence length")
  gates_x = tf.unstack(cell.input_gates(x, attention, mode), axis=1)
  masks = tf.unstack(mask, axis=1)
  attentions = tf.unstack(_f32(attention), axis=1) if attention is not None else [None] * length
  recurrent_kernel = tf.cast(cell.recurrent_kernel, tf.float32)
  h = tf.zeros([tf.shape(x)[0], cell.units], tf.float32)
  states = []
  for t in range(length):  # unrolled: XLA compiles it far better than a while loop
    h_new = cell.step(gates_x[t], h, attentions[t], mode, recurrent_kernel)
    h = tf.where(masks[t][:, None], h_new, h)
    states.append(h)
  return tf.stack(states, axis=1) if return_sequences else h


class DIEN(keras.Model):
  """Scores (user, history, candidate, dense features) -> click logit.

  forward() also returns the auxiliary loss (0 without aux_loss); `seed`
  ([2] int64, training) keys the dropout masks and the aux loss's negatives.
  """

  def __init__(self, *, num_items: int, num_users: int, num_categories: int,
               item_category: np.ndarray, max_hist_len: int, dense_mean: np.ndarray,
               dense_var: np.ndarray, emb_dim: int, gru_units: int, evolution: str,
               mlp_units: tuple[int, ...], dropout: float, aux_loss: bool, wide_dense: bool,
               attention_units=(80, 40), user_embedding: bool = True,
               item_vectors: np.ndarray | None = None,
               dense_log1p: np.ndarray | None = None,
               **kwargs):
    super().__init__(**kwargs)
    if evolution not in EVOLUTIONS:
      raise ValueError(f"evolution must be one of {EVOLUTIONS}, not {evolution!r}")
    dense_mean = np.asarray(dense_mean, np.float32).reshape(-1)
    dense_var = np.asarray(dense_var, np.float32).reshape(-1)
    if dense_mean.shape != dense_var.shape:
      raise ValueError(f"dense_mean {dense_mean.shape} and dense_var {dense_var.shape} differ")
    item_category = np.asarray(item_category, np.int32)
    if item_category.shape != (num_items,):
      raise ValueError(f"item_category must be [{num_items}], not {item_category.shape}")
    self.num_items, self.max_hist_len = num_items, max_hist_len
    self.num_dense, self.evolution, self.aux_loss = dense_mean.size, evolution, aux_loss

    self.user_embedding = keras.layers.Embedding(num_users, emb_dim, name="user_emb") \
        if user_embedding else None
    # A linear logit term over the standardised dense features (Wide & Deep).
    self.wide = keras.layers.Dense(1, name="wide_dense") if wide_dense else None
    self.item_embedding = keras.layers.Embedding(num_items, emb_dim, name="item_emb")
    self.category_embedding = keras.layers.Embedding(num_categories, max(4, emb_dim // 4),
                                                     name="cat_emb")
    self.item_category = tf.constant(item_category, tf.int32)
    # Features standardised after log1p (contracts/manifest.py dense_model_input).
    self.dense_log1p = tf.constant(np.zeros(dense_mean.shape, bool) if dense_log1p is None
                                   else np.asarray(dense_log1p, bool))
    # The retrieval model's item vectors, frozen: an item space learnt from every
    # training click, where the ranker alone sees only one positive per user.
    self.item_vectors = None
    if item_vectors is not None:
      self.item_vectors = self.add_weight(
          shape=item_vectors.shape, name="retrieval_item_vectors", trainable=False,
          initializer=keras.initializers.Constant(item_vectors.astype(np.float32)))
    # Non-trainable weights, so checkpoints and SavedModels carry the statistics.
    self.dense_mean = self.add_weight(shape=dense_mean.shape, name="dense_mean",
                                      initializer=keras.initializers.Constant(dense_mean),
                                      trainable=False)
    self.dense_var = self.add_weight(shape=dense_var.shape, name="dense_var",
                                     initializer=keras.initializers.Constant(dense_var),
                                     trainable=False)

    self.extractor = GRUCell(gru_units, name="interest_extractor")
    self.evolver = GRUCell(gru_units, name="interest_evolution")
    self.attention_query = keras.layers.Dense(gru_units, name="attention_query")
    self.attention_mlp = [keras.layers.Dense(units, activation="relu", name=f"attention_{i}")
                          for i, units in enumerate(attention_units)]
    self.attention_mlp.append(keras.layers.Dense(1, name="attention_out"))

    self.head = []
    for i, units in enumerate(mlp_units):
      self.head += [keras.layers.Dense(units, activation="relu", name=f"mlp_{i}"),
                    SeededDropout(dropout, salt=i + 1, name=f"mlp_dropout_{i}")]
    self.head.append(keras.layers.Dense(1, name="logit"))

    # Only with aux_loss, so a model without it has no unused variables.
    self.aux_net = None
    if aux_loss:
      self.aux_net = checkpoint_list(self, "aux_net", [
          keras.layers.Dense(100, activation="relu", name="aux_0"),
          keras.layers.Dense(50, activation="relu", name="aux_1"),
          keras.layers.Dense(1, name="aux_out")])
    checkpoint_list(self, "attention_mlp", self.attention_mlp)
    checkpoint_list(self, "head", self.head)

  def item_representation(self, items: tf.Tensor) -> tf.Tensor:
    """[...] item indices -> [..., emb_dim + category width]."""
    categories = tf.gather(self.item_category, items)
    parts = [_f32(self.item_embedding(items)), _f32(self.category_embedding(categories))]
    if self.item_vectors is not None:
      parts.append(tf.gather(tf.cast(self.item_vectors, tf.float32), items))
    return tf.concat(parts, axis=-1)

  def standardise(self, dense: tf.Tensor) -> tf.Tensor:
    var = tf.cast(self.dense_var, tf.float32)
    # A constant feature (var 0) is only centred: dividing by sqrt(1e-6) would
    # turn any serving-time deviation into a 1000x input.
    std = tf.where(var > 0.0, tf.sqrt(var + 1e-6), tf.ones_like(var))
    dense = _f32(dense)
    dense = tf.where(self.dense_log1p, tf.math.log1p(tf.maximum(dense, 0.0)), dense)
    return (dense - tf.cast(self.dense_mean, tf.float32)) / std

  def attention(self, query: tf.Tensor, states: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """query [B, Dq], states [B, L, H], mask [B, L] -> softmax weights [B, L] over real
    positions."""
    q = tf.broadcast_to(_f32(self.attention_query(query))[:, None, :], tf.shape(states))
    x = tf.concat([q, states, q - states, q * states], axis=-1)
    for layer in self.attention_mlp:
      x = layer(x)
    scores = tf.where(mask, tf.squeeze(_f32(x), -1), large_negative(tf.float32))
    return tf.nn.softmax(scores, axis=-1)

  def auxiliary_loss(self, states, history, history_items, mask, seed) -> tf.Tensor:
    """Paper eq. 6: h_t scores the next click e_{t+1} high and a uniform item low;
    BCE summed over the two, averaged over consecutive real pairs (0 if none)."""
    pairs = _f32(tf.logical_and(mask[:, :-1], mask[:, 1:]))  # [B, L-1]
    h = states[:, :-1]
    seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
    # The raw seed is free: dropout layers use seed + salt (salts from 1).
    negatives = tf.random.stateless_uniform(
        tf.shape(history[:, 1:]), seed=seed, minval=1, maxval=max(self.num_items, 2),
        dtype=tf.int32, alg="philox")

    def score(items):
      x = tf.concat([h, items], axis=-1)
      for layer in self.aux_net:
        x = layer(x)
      return tf.squeeze(_f32(x), -1)

    pos = score(history_items[:, 1:])
    neg = score(self.item_representation(negatives))
    bce = (tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(pos), pos)
           + tf.nn.sigmoid_cross_entropy_with_logits(tf.zeros_like(neg), neg))
    return tf.reduce_sum(bce * pairs) / tf.maximum(tf.reduce_sum(pairs), 1.0)

  def forward(self, inputs: dict, training: bool = False,
              seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """inputs: user [B], history [B, L] (left-padded, latest last), candidate [B],
    dense [B, F] raw. Returns (logits [B] float32, auxiliary loss scalar float32)."""
    history = tf.ensure_shape(tf.cast(inputs["history"], tf.int32), [None, self.max_hist_len])
    mask = tf.not_equal(history, 0)
    history_items = self.item_representation(history)
    candidate = self.item_representation(tf.cast(inputs["candidate"], tf.int32))

    states = run_gru(self.extractor, history_items, mask, return_sequences=True)
    weights = self.attention(candidate, states, mask)
    interest = run_gru(self.evolver, states, mask, attention=weights, mode=self.evolution)

    dense = self.standardise(inputs["dense"])
    parts = [candidate, interest, dense]
    if self.user_embedding is not None:
      parts.insert(0, _f32(self.user_embedding(tf.cast(inputs["user"], tf.int32))))
    x = tf.concat(parts, axis=-1)
    for layer in self.head:
      x = layer(x, seed=seed, training=training) if isinstance(layer, SeededDropout) \
          else layer(x)
    logits = tf.squeeze(_f32(x), -1)
    if self.wide is not None:
      logits += tf.squeeze(_f32(self.wide(dense)), -1)

    aux = tf.constant(0.0, tf.float32)
    if self.aux_loss:
      aux = self.auxiliary_loss(states, history, history_items, mask, seed)
    return logits, aux

  def call(self, inputs, training=False):
    return self.forward(inputs, training)[0]

  def build_variables(self):
    """Creates every variable (aux net included) with one call on a zero batch."""
    self.forward({"user": tf.zeros([1], tf.int32),
                  "history": tf.zeros([1, self.max_hist_len], tf.int32),
                  "candidate": tf.zeros([1], tf.int32),
                  "dense": tf.zeros([1, self.num_dense], tf.float32)})
    return self
