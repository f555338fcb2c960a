import torch

# Tests use tiny models: one intra-op thread is much faster than two fighting over a busy
# 2-core machine. This holds for every test in this process; subprocesses set their own.
torch.set_num_threads(1)


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=""):
    # torch.testing.assert_close's first call costs seconds of imports; this is all we need
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{msg} max abs diff {err:.3g}"
