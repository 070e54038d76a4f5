"""Mixed precision (--mixed_precision): the Keras dtype policy of a model.

With the flag, layers compute in float16 on a GPU and in bfloat16 on a CPU
(float16 matmuls have no fast CPU kernels); variables stay float32, the
models cast their output vectors and logits to float32, and every loss and
softmax over items is computed in float32 (trainer/losses.py), the Keras
mixed-precision convention. float16 needs loss scaling against gradients
that underflow; bfloat16 has float32's exponent range and does not.

The policy is set only while a model's layers are created (`policy_scope`):
a Keras layer keeps the policy it was created with, so the process-wide
policy is never left changed for the next model built in the same process
(an evaluation, a test, the float32 reference of a mixed-precision model).
"""

import contextlib

import keras
import tensorflow as tf

FLOAT32 = "float32"
MIXED_FLOAT16 = "mixed_float16"
MIXED_BFLOAT16 = "mixed_bfloat16"


def policy_name(mixed_precision: bool) -> str:
  """The Keras policy of --mixed_precision on this machine's devices."""
  if not mixed_precision:
    return FLOAT32
  return MIXED_FLOAT16 if tf.config.list_physical_devices("GPU") else MIXED_BFLOAT16


def needs_loss_scale(name: str) -> bool:
  """float16 gradients underflow without loss scaling (LossScaleOptimizer)."""
  return name == MIXED_FLOAT16


@contextlib.contextmanager
def policy_scope(name: str):
  """Layers created inside the block get policy `name`; the previous global
  policy is back afterwards, whatever the block raised."""
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def large_negative(dtype) -> float:
  """A logit that a softmax turns into 0 and that stays finite in `dtype`.

  -1e9 is finite in float32 and bfloat16 but overflows float16 (largest
  65504) to -inf, and a row where every entry is -inf softmaxes to NaN. Half
  of the largest finite value leaves room to subtract another logit.
  """
  dtype = tf.as_dtype(dtype)
  return max(-1e9, -0.5 * float(dtype.max))
