"""Retrieval models (trainer/registry.py names them).

Every model maps a left-padded history [B, L] of item indices (0 = padding)
and the user index [B] to a query vector at *every* position, [B, L, D],
and item indices to item vectors [..., D]; both L2-normalised. Position
L - 1 always holds the latest click (left padding), so it is the user
vector; the other positions give a loss on every position of a window
(`--samples=windows`).

  sasrec:    the notebook's SASRec: item + position embeddings, pre-LN causal
             multi-head attention blocks with a feed-forward layer, final
             LayerNorm, a Dense head; items: the shared item embedding and a
             Dense head.
  two_tower: the notebook's DSSM: user embedding + mean of the history
             embeddings so far (a running mean, so each position sees only
             its past) -> MLP; items: item + category embeddings -> MLP. The
             notebook's MLP ends in a ReLU, which confines every vector to the
             positive orthant; here the last layer is linear.

Dropout is `SeededDropout`: its mask is a function of (seed, step, replica,
layer), so a resumed run repeats the exact masks without any RNG state in the
checkpoint, and it uses the Philox generator: XLA on CPU generates the
default ("auto_select") stateless randoms about 70x slower, which made Keras
`Dropout` cost 0.5 s per [128, 50, 128] tensor inside a jit-compiled step.
Attention is a small causal self-attention layer for the same reason (Keras
`MultiHeadAttention` drops out with Keras `Dropout`).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from trainer import precision
from trainer.config import TrainerConfig


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a model needs to know about the data (from the manifest)."""
  num_items: int  # vocabulary size, padding included
  num_users: int
  num_categories: int
  max_seq_len: int
  item_category: np.ndarray  # int32 [num_items]: category index of each item index


class SeededDropout(keras.layers.Layer):
  """Dropout with a mask that is a function of (seed, salt); Philox RNG."""

  def __init__(self, rate: float, salt: int, **kwargs):
    super().__init__(**kwargs)
    self.rate, self.salt = rate, salt
    self.supports_masking = True  # elementwise: a Keras mask passes through unchanged

  def call(self, x, seed=None, training=False):
    if not training or not self.rate or seed is None:
      return x
    layer_seed = tf.cast(seed, tf.int64) + tf.constant([0, 1_000_003], tf.int64) * self.salt
    return tf.nn.experimental.stateless_dropout(x, self.rate, seed=layer_seed, rng_alg="philox")


class RetrievalModel(keras.Model):
  """Base: query vectors per position, item vectors, the user vector.

  `seed` ([2] int64, training only) keys every dropout mask of the call.
  """

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._dropout_salts = 0

  def dropout(self, rate: float) -> SeededDropout:
    self._dropout_salts += 1
    return SeededDropout(rate, salt=self._dropout_salts)

  def query_sequence(self, history: tf.Tensor, user: tf.Tensor, training: bool = False,
                     seed: tf.Tensor | None = None) -> tf.Tensor:
    raise NotImplementedError

  def item_vectors(self, items: tf.Tensor, training: bool = False,
                   seed: tf.Tensor | None = None) -> tf.Tensor:
    raise NotImplementedError

  def query_last(self, history: tf.Tensor, user: tf.Tensor, training: bool = False,
                 seed: tf.Tensor | None = None) -> tf.Tensor:
    """The query at the last position only ([B, D]); equals query_sequence(...)[:, -1]
    (without dropout). Subclasses skip the work for the other positions."""
    return self.query_sequence(history, user, training=training, seed=seed)[:, -1, :]

  def user_vector(self, history: tf.Tensor, user: tf.Tensor) -> tf.Tensor:
    return self.query_last(history, user, training=False)

  def call(self, inputs, training=False):
    return self.query_sequence(inputs["history"], inputs["user"], training=training)


def checkpoint_list(owner: keras.layers.Layer, name: str, layers: list) -> list:
  """Makes each layer of a list attribute a checkpoint dependency (`name_i`).

  Keras 3 keeps list attributes out of tf.train.Checkpoint's object graph:
  their weights reached the checkpoint only through the optimizer's variable
  list, so a model-only restore (`tf.train.Checkpoint(model=...)`) skipped
  them without an error.
  """
  for i, layer in enumerate(layers):
    setattr(owner, f"{name}_{i}", layer)
  return layers


def l2_normalize(x: tf.Tensor) -> tf.Tensor:
  return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


class CausalSelfAttention(keras.layers.Layer):
  """Multi-head self-attention over allowed (query, key) pairs."""

  def __init__(self, emb_dim: int, num_heads: int, dropout: SeededDropout, **kwargs):
    super().__init__(**kwargs)
    self.num_heads, self.head_dim = num_heads, emb_dim // num_heads
    self.qkv = keras.layers.Dense(3 * emb_dim, name="qkv")
    self.output_projection = keras.layers.Dense(emb_dim, name="out")
    self.attention_dropout = dropout

  def call(self, x, mask, seed=None, training=False, last_query_only=False):
    """mask [B, Lq, L]; with last_query_only, only the last position queries (Lq = 1)."""
    batch, length = tf.shape(x)[0], tf.shape(x)[1]
    qkv = tf.reshape(self.qkv(x), [batch, length, 3, self.num_heads, self.head_dim])
    q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # each [B, H, L, d]
    if last_query_only:
      q = q[:, :, -1:, :]
    # Scores and softmax in float32 under mixed precision too (the Keras
    # convention): bfloat16's 8 significant bits would tie scores 0.4% apart.
    scores = tf.cast(tf.einsum("bhqd,bhkd->bhqk", q, k), tf.float32) / tf.math.sqrt(
        float(self.head_dim))
    scores = tf.where(mask[:, None, :, :], scores, precision.large_negative(tf.float32))
    weights = tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
    weights = self.attention_dropout(weights, seed=seed, training=training)
    context = tf.einsum("bhqk,bhkd->bqhd", weights, v)
    return self.output_projection(tf.reshape(context, [batch, tf.shape(q)[2], -1]))


class TransformerBlock(keras.layers.Layer):
  """Pre-LayerNorm causal self-attention + feed-forward, residual both."""

  def __init__(self, emb_dim: int, num_heads: int, ff_dim: int, dropout, **kwargs):
    super().__init__(**kwargs)
    self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6)
    self.attention = CausalSelfAttention(emb_dim, num_heads, dropout(), name="attention")
    self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6)
    self.ffn_in = keras.layers.Dense(ff_dim, activation="relu")
    self.ffn_dropout = dropout()
    self.ffn_out = keras.layers.Dense(emb_dim)
    self.attention_output_dropout = dropout()
    self.ffn_output_dropout = dropout()

  def call(self, x, attention_mask, seed=None, training=False, last_query_only=False):
    """With last_query_only the block returns the last position only ([B, 1, D])."""
    h = self.attention(self.attention_norm(x), attention_mask, seed=seed, training=training,
                       last_query_only=last_query_only)
    if last_query_only:
      x = x[:, -1:, :]
    x = x + self.attention_output_dropout(h, seed=seed, training=training)
    h = self.ffn_out(self.ffn_dropout(self.ffn_in(self.ffn_norm(x)), seed=seed,
                                      training=training))
    return x + self.ffn_output_dropout(h, seed=seed, training=training)


class SASRec(RetrievalModel):

  def __init__(self, config: TrainerConfig, data: DataSpec, **kwargs):
    super().__init__(**kwargs)
    self.max_seq_len = data.max_seq_len
    self.item_embedding = keras.layers.Embedding(data.num_items, config.emb_dim, name="item_emb")
    self.position_embedding = keras.layers.Embedding(data.max_seq_len, config.emb_dim,
                                                     name="pos_emb")
    self.input_dropout = self.dropout(config.dropout)
    self.blocks = checkpoint_list(self, "blocks", [
        TransformerBlock(config.emb_dim, config.num_heads, config.ff_dim,
                         lambda: self.dropout(config.dropout), name=f"block_{i}")
        for i in range(config.num_blocks)])
    self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6)
    self.shared_embeddings = config.share_item_embeddings
    if not self.shared_embeddings:
      self.query_head = keras.layers.Dense(config.emb_dim, name="query_head")
      self.item_head = keras.layers.Dense(config.emb_dim, name="item_head")
    # Created last: the other layers keep their dropout salts (and masks).
    self.item_dropout = self.dropout(config.item_dropout)

  def query_sequence(self, history, user, training=False, seed=None):
    del user  # SASRec is a function of the history only
    return self._encode(history, training, seed, last_only=False)

  def query_last(self, history, user, training=False, seed=None):
    # The last block computes the last position only: positions-mode training,
    # serving and evaluation need no other.
    del user
    return self._encode(history, training, seed, last_only=True)[:, -1, :]

  def _encode(self, history, training, seed, last_only):
    real = tf.not_equal(history, 0)
    x = self.item_embedding(history) + self.position_embedding(tf.range(self.max_seq_len))
    x = self.input_dropout(x * tf.cast(real, x.dtype)[..., None], seed=seed, training=training)
    length = tf.shape(history)[1]
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    mask = causal[None, :, :] & real[:, None, :]  # query i sees real keys j <= i
    for i, block in enumerate(self.blocks):
      if last_only and i == len(self.blocks) - 1:
        x = block(x, attention_mask=mask[:, -1:, :], seed=seed, training=training,
                  last_query_only=True)
      else:
        x = block(x, attention_mask=mask, seed=seed, training=training)
    x = self.final_norm(x)
    return l2_normalize(x if self.shared_embeddings else self.query_head(x))

  def item_vectors(self, items, training=False, seed=None):
    e = self.item_dropout(self.item_embedding(items), seed=seed, training=training)
    return l2_normalize(e if self.shared_embeddings else self.item_head(e))


class TwoTower(RetrievalModel):

  def __init__(self, config: TrainerConfig, data: DataSpec, **kwargs):
    super().__init__(**kwargs)
    dim = config.emb_dim
    self.user_embedding = keras.layers.Embedding(data.num_users, dim, name="user_emb")
    self.item_embedding = keras.layers.Embedding(data.num_items, dim, name="item_emb")
    self.category_embedding = keras.layers.Embedding(data.num_categories, max(4, dim // 4),
                                                     name="cat_emb")
    self.item_category = tf.constant(data.item_category, tf.int32)

    def tower(name):
      layers = []
      for i, units in enumerate(config.tower_units):
        layers += [keras.layers.Dense(units, activation="relu", name=f"{name}_{i}"),
                   self.dropout(config.dropout)]
      return layers + [keras.layers.Dense(dim, name=f"{name}_out")]

    self.user_tower = checkpoint_list(self, "user_tower", tower("user_tower"))
    self.item_tower = checkpoint_list(self, "item_tower", tower("item_tower"))

  @staticmethod
  def _apply(layers, x, seed, training):
    for layer in layers:
      x = layer(x, seed=seed, training=training) if isinstance(layer, SeededDropout) \
          else layer(x)
    return x

  def query_sequence(self, history, user, training=False, seed=None):
    real = tf.cast(tf.not_equal(history, 0), tf.float32)[..., None]
    emb = tf.cast(self.item_embedding(history), tf.float32) * real
    # Prefix sums as a lower-triangular matmul: XLA on CPU compiles tf.cumsum
    # to a slow reduce-window (the two-tower step took 2.3x longer with it).
    length = tf.shape(history)[1]
    lower = tf.linalg.band_part(tf.ones([length, length], tf.float32), -1, 0)
    running_mean = tf.einsum("ij,bjd->bid", lower, emb) / tf.maximum(
        tf.einsum("ij,bjd->bid", lower, real), 1.0)
    user_emb = tf.cast(self.user_embedding(user), tf.float32)[:, None, :]
    user_emb = tf.broadcast_to(user_emb, tf.shape(running_mean))
    x = tf.concat([user_emb, running_mean], axis=-1)
    return l2_normalize(self._apply(self.user_tower, x, seed, training))

  def query_last(self, history, user, training=False, seed=None):
    # The mean of the whole history through the MLP once, not at every position.
    real = tf.cast(tf.not_equal(history, 0), tf.float32)[..., None]
    emb = tf.cast(self.item_embedding(history), tf.float32) * real
    mean = tf.reduce_sum(emb, axis=1) / tf.maximum(tf.reduce_sum(real, axis=1), 1.0)
    x = tf.concat([tf.cast(self.user_embedding(user), tf.float32), mean], axis=-1)
    return l2_normalize(self._apply(self.user_tower, x, seed, training))

  def item_vectors(self, items, training=False, seed=None):
    x = tf.concat([self.item_embedding(items),
                   self.category_embedding(tf.gather(self.item_category, items))], axis=-1)
    return l2_normalize(self._apply(self.item_tower, x, seed, training))


def build(model_class: type, config: TrainerConfig, data: DataSpec) -> RetrievalModel:
  """Builds a model of `model_class` (the registry's, for --model) and creates its variables."""
  model = model_class(config, data, name=config.model)
  history = tf.zeros([1, data.max_seq_len], tf.int32)
  model.query_sequence(history, tf.zeros([1], tf.int32))
  model.item_vectors(tf.zeros([1], tf.int32))
  return model
