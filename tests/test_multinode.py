"""Beyond one node: two torchrun "nodes" of one process each, meeting through a c10d rendezvous on
127.0.0.1, train exactly the model that one node with two processes trains (everything keys on the
global rank and world size; the checkpoint is written by global rank 0)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_optim import run_ranks

TINY = ["--device", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
        "--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "3", "--eval-tokens", "256",
        "--sample-every", "-1", "--save-every", "-1"]


def weights(base_dir, tag):
    return load_file(next((base_dir / "checkpoints" / "base" / tag).glob("model_*.safetensors")))


@pytest.mark.slow
def test_two_nodes_train_what_one_node_with_two_processes_trains(base_dir):
    import base_train

    with socket.socket() as s:  # a free port for the rendezvous (torchrun binds it on node 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]
    train = ["-m", "base_train", "--", *TINY, "--model-tag", "nodes"]
    nodes = [subprocess.Popen(torchrun + ["--node-rank", str(r)] + train, cwd=Path(__file__).parents[1],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    run_ranks(lambda rank: base_train.main(TINY + ["--model-tag", "single"]))  # one node, two processes
    for proc in nodes:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    two_nodes, one_node = weights(base_dir, "nodes"), weights(base_dir, "single")
    assert two_nodes.keys() == one_node.keys()
    for name in one_node:
        assert torch.equal(two_nodes[name], one_node[name]), name
