"""The `retrieval` job.

Importing the package sets the process up for TensorFlow before it loads
(contracts/tf_runtime.py): the user tower runs in TensorFlow.
"""

from contracts import tf_runtime

tf_runtime.prefer_bfc_allocator()
