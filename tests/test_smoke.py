import subprocess
import sys

import torch

import moekit


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "moekit", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"moekit {moekit.__version__}")
    out = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True, check=True)
    assert "version" in out.stdout


def test_layer_keeps_shape_and_backpropagates():
    layer = moekit.MoE(dim=16, num_experts=4, expert_hidden=32, top_k=2)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    (y.square().mean() + moekit.aux_loss(layer)).backward()
    assert x.grad is not None and layer.router.weight.grad is not None
