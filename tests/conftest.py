"""Suite-wide settings: one intra-op thread per test process.

The suite runs on 2 cores as two pytest-xdist workers (scripts/test.sh); tiny test models gain
nothing from intra-op threads, and two workers each spinning two threads oversubscribe the CPU.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("LMSTACK_TEST_THREADS", "1")))
