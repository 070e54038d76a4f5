"""The `trainer` job.

Importing the package sets the process up for TensorFlow before it loads
(contracts/tf_runtime.py).
"""

from contracts import tf_runtime

tf_runtime.prefer_bfc_allocator()
