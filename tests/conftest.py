"""Shared test setup.

The models under test are tiny: one intra-op thread is faster than two for their small
matrices, and it keeps test time stable when the machine is busy (two OpenMP threads
spin-waiting on a loaded 2-core machine can be 50x slower).
"""

import torch

torch.set_num_threads(1)
