"""The `retrieval` job.

It imports `trainer` first so TensorFlow starts with trainer's CPU allocator
setting (see trainer/__init__.py).
"""

import trainer  # noqa: F401
