import torch

# Tests use tiny models: one intra-op thread is much faster than two fighting over a busy
# 2-core machine (and leaves the other core to a parallel test worker).
torch.set_num_threads(1)
