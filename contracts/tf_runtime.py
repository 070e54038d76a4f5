"""Process settings every job that runs TensorFlow needs before TensorFlow loads.

TensorFlow's default CPU allocator is malloc, and glibc maps every block
above 32 MiB fresh from the kernel and unmaps it on free. The catalogue
softmax allocates several such blocks per step (ML-1M: logits of 7,300 x
3,706 floats, 108 MB), so each step paid page faults and zeroing in the
kernel: 80% of the CPU was system time, and the ML-1M recipe's step took
0.70 s against 0.40 s with the BFC allocator, which keeps its pool
(docs/design.md, "The CPU allocator", with the command).
"""

import os


def prefer_bfc_allocator() -> None:
  """Turns on the BFC allocator for CPU memory unless TF_CPU_ALLOCATOR_USE_BFC is set."""
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
