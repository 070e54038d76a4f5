"""GRU4Rec (Hidasi et al. 2016): a GRU over the click history, next-item loss at every position.

The item embedding feeds --num_blocks stacked GRU layers of --emb_dim units;
the GRU's output at each position is the query for the next click. As in the
later GRU4Rec versions with constrained (tied) embeddings, queries score
against the input item embeddings themselves (--share_item_embeddings), or,
with --noshare_item_embeddings, through separate query and item heads.
Histories are left-padded: the GRU skips the padding (Keras masking), so its
state is still the initial zero state at the first real click and position
L - 1 holds the latest click, as every retrieval model's contract says
(trainer/models.py). Dropout is the models' SeededDropout on the GRU's input
and output, so a resumed run repeats the masks; the GRU's own recurrent
dropout stays off for the same reason.
"""

import keras
import tensorflow as tf

from trainer.config import TrainerConfig
from trainer.models import DataSpec, RetrievalModel, checkpoint_list, l2_normalize


class GRU4Rec(RetrievalModel):

  def __init__(self, config: TrainerConfig, data: DataSpec, **kwargs):
    super().__init__(**kwargs)
    dim = config.emb_dim
    self.item_embedding = keras.layers.Embedding(data.num_items, dim, name="item_emb")
    self.input_dropout = self.dropout(config.dropout)
    # Under XLA (--jit_compile) the loop is unrolled: the gradient of Keras'
    # while loop passes a TensorList across the XLA boundary, which TensorFlow
    # does not implement. The weights are the same either way.
    self.grus = checkpoint_list(self, "grus", [
        keras.layers.GRU(dim, return_sequences=True, unroll=config.use_xla, name=f"gru_{i}")
        for i in range(config.num_blocks)])
    self.output_dropout = self.dropout(config.dropout)
    self.shared_embeddings = config.share_item_embeddings
    if not self.shared_embeddings:
      self.query_head = keras.layers.Dense(dim, name="query_head")
      self.item_head = keras.layers.Dense(dim, name="item_head")
    self.item_dropout = self.dropout(config.item_dropout)

  def query_sequence(self, history, user, training=False, seed=None):
    del user  # a function of the history only
    real = tf.not_equal(history, 0)
    x = self.input_dropout(self.item_embedding(history), seed=seed, training=training)
    for gru in self.grus:
      x = gru(x, mask=real)
    x = self.output_dropout(x, seed=seed, training=training)
    return l2_normalize(x if self.shared_embeddings else self.query_head(x))

  def item_vectors(self, items, training=False, seed=None):
    e = self.item_dropout(self.item_embedding(items), seed=seed, training=training)
    return l2_normalize(e if self.shared_embeddings else self.item_head(e))
