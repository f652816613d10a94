"""Train the shipped MNIST models (plain cross-entropy) on mnist5k and export them to models/.

Usage: python scripts/train_plain_models.py [--epochs 15] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from graphcert.data import mnist5k
from graphcert.export import atomic_write

MODELS = Path(__file__).resolve().parents[1] / "models"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def export(net: nn.Module, path: Path) -> None:
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(proto.SerializeToString(), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = mnist5k()
    for name, build in (("mnist_mlp", mlp), ("mnist_cnn", cnn)):
        torch.manual_seed(args.seed)
        net = train(build(), data.x, data.y, args.epochs, args.seed)
        export(net, MODELS / f"{name}.onnx")
        print(f"wrote models/{name}.onnx")


if __name__ == "__main__":
    main()
