"""Holistic robust (HR) against plain certified training on MNIST with poisoned labels.

mnist5k with a fraction of its labels replaced by random wrong ones (the poisoned set is written to a
temporary .npz), IBP training of the 784-100-100-100-10 MLP at eps 0.01 with and without HR weights, then
clean and certified accuracy on the clean MNIST test set. One thread, same seed for every run.
Also the certified (robust) cross-entropy at eps: its mean over the poisoned training set, the HR value of the
same losses (the worst case over the ambiguity set, alpha and r as trained), and its mean on the clean test set,
which HR's guarantee says the HR value bounds.
Usage: python benchmarks/hr_bench.py [--poison 0 0.2 0.4] [--alpha 0.05] [--r 0.1] [--epochs 10]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from graphcert import model as model_lib
from graphcert.certify import certifier, certify, margin_objective
from graphcert.data import Dataset, fit_to_input, load_dataset
from graphcert.interface import perturbed_inputs
from graphcert.model import static_shape
from graphcert.training.hr import hr_weights
from graphcert.training.loop import TrainConfig, train


def robust_losses(model, data: Dataset, eps: float) -> np.ndarray:
    """Cross-entropy of the worst-case logits (label 0, others -lower margin) per sample, IBP at eps."""
    bound = certifier(model, "ibp", data.domain)
    x = fit_to_input(data.x, static_shape(perturbed_inputs(model)[0]))
    parts = []
    for lo in range(0, len(x), 1000):
        _, lower = bound(x[lo:lo + 1000], eps, margin_objective(data.y[lo:lo + 1000], 10))
        worst = np.concatenate([np.zeros((len(lower), 1)), -lower.astype(np.float64)], axis=1)
        parts.append(np.logaddexp.reduce(worst, axis=1))
    return np.concatenate(parts)


def poisoned_copy(fraction: float, folder: str, seed: int = 0) -> str:
    data = load_dataset("mnist5k")
    rng = np.random.default_rng(seed)
    labels = data.y.copy()
    chosen = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
    labels[chosen] = (labels[chosen] + rng.integers(1, 10, len(chosen))) % 10   # always a wrong label
    path = os.path.join(folder, f"mnist5k_poisoned_{fraction:g}.npz")
    np.savez_compressed(path, x=data.x, y=labels, domain=np.array(data.domain))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poison", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    parser.add_argument("--alpha", type=float, default=None, help="HR alpha (default: the poisoned fraction)")
    parser.add_argument("--r", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.01)
    args = parser.parse_args()
    test = load_dataset("mnist-test")
    print(f"{'poisoned':>8} {'training':>22} {'train s':>8} {'clean':>7} {'certified':>9} {'train CE':>9} "
          f"{'HR value':>9} {'test CE':>8}   (MNIST test, eps {args.eps:g})")
    with tempfile.TemporaryDirectory() as folder:
        for fraction in args.poison:
            data = poisoned_copy(fraction, folder)
            alpha = args.alpha if args.alpha is not None else fraction
            for name, hr in (("plain", {}), (f"HR alpha {alpha:g} r {args.r:g}", {"hr_alpha": alpha, "hr_r": args.r})):
                config = TrainConfig(output=os.path.join(folder, "model.onnx"), eps=args.eps, arch="mlp", data=data,
                                     epochs=args.epochs, holdout=0.0, **hr)
                start = time.perf_counter()
                train(config)
                seconds = time.perf_counter() - start
                trained = model_lib.load(config.output)
                found = certify(trained, test, args.eps)
                train_losses = robust_losses(trained, load_dataset(data), args.eps)
                hr_value = hr_weights(train_losses, alpha, args.r) @ train_losses
                print(f"{fraction:8.0%} {name:>22} {seconds:8.1f} {found.clean_accuracy:7.2%} "
                      f"{found.certified_accuracy:9.2%} {train_losses.mean():9.3f} {hr_value:9.3f} "
                      f"{robust_losses(trained, test, args.eps).mean():8.3f}")


if __name__ == "__main__":
    main()
