"""`graphcert train` and `graphcert export-training`."""
from __future__ import annotations

import json
import sys

from graphcert import methods  # noqa: F401
from graphcert.commands.common import (DEFAULT_MODEL, DEFAULT_RETRIES, DEFAULT_TASK_MEMORY_MB,  # noqa: F401
                                       add_alpha_options, add_parallel_options, alpha_settings, clipping_note,
                                       parallel_executor, parallel_requested, shipped_model)


# ---- train ---------------------------------------------------------------------------------------------

def add_train(sub) -> None:
    p = sub.add_parser("train", help="certified training (IBP, CROWN-IBP, GloRo, 1-Lipschitz orthogonal) of an ONNX "
                                     "model or a standard architecture")
    p.add_argument("model", nargs="?", help="ONNX model to fine-tune (or a shipped model name); or use --arch")
    p.add_argument("--arch", help="build a standard architecture instead: mlp (784-100-100-100-10), cnn, or lipmlp "
                                  "(784-256-256-256-10 with GroupSort2, for --method orthogonal)")
    p.add_argument("-o", "--output", help="where to write the trained model (.onnx); the checkpoint goes to OUTPUT.ckpt")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist-test or FILE.npz (x, y) (default: mnist5k)")
    p.add_argument("--eps", type=float, help="target radius: L-inf, or L2 for --method gloro and orthogonal")
    p.add_argument("--method", default="ibp",
                   help=f"bound method to train through: {methods.help_text(role=None, trainable=True)} (gloro "
                        "and orthogonal train for L2: orthogonal keeps Björck-orthonormal weights, a 1-Lipschitz "
                        "network; certify those with --method lipschitz --norm l2) (default: ibp)")
    p.add_argument("--loss", default="ce",
                   help="ce (cross-entropy on certified margins, annealed by --kappa), or with --method orthogonal: "
                        "tau-ce (cross-entropy of tau-scaled logits, over tau) or hkr (hinge minus "
                        "Kantorovich-Rubinstein) (default: ce)")
    # Their defaults live in graphcert.training.losses.Loss (not imported here: it would slow every command).
    p.add_argument("--tau", type=float, help="tau-ce temperature: small is robust, large is accurate (default: 3)")
    p.add_argument("--hkr-alpha", type=float, help="hkr weight of the hinge against KR (default: 50)")
    p.add_argument("--hkr-margin", type=float,
                   help="hkr hinge margin between the label's logit and the others (default: 1)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup", type=int, help="epochs at eps = 0 first (default: a fifth of --epochs)")
    p.add_argument("--rampup", type=int, help="epochs in which eps grows to its target (default: the rest); "
                                              "warm-up + ramp-up may not exceed --epochs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--kappa", type=float, default=0.0,
                   help="final weight of the clean loss; it anneals from 1 during ramp-up (default: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="linear", help="eps ramp: linear or smooth (Shi et al. 2021) (default: linear)")
    p.add_argument("--init", default="default", help="default (keep the weights) or ibp (Shi et al. 2021)")
    p.add_argument("--grad-clip", type=float, default=10.0, help="clip the gradient's L2 norm (0: off; default: 10)")
    p.add_argument("--backend", default="torch", help="torch or ort-training (default: torch)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of the data held out to report certified accuracy (default: 0.1)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (default: 1)")
    p.add_argument("--hr-alpha", type=float, default=0.0,
                   help="holistic robust training: fraction of the data that may be poisoned (default: 0)")
    p.add_argument("--hr-r", type=float, default=0.0,
                   help="holistic robust training: KL radius for statistical error (default: 0; with --hr-alpha 0: "
                        "plain certified training)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(run=run_train, reads=("model", "data"), writes=("output", "checkpoint"))


def run_train(args) -> int:
    from dataclasses import asdict
    from graphcert.errors import InputError
    from graphcert.training import TrainConfig, train
    if args.output is None:
        raise InputError("missing -o OUTPUT.onnx: where to write the trained model")
    if args.eps is None:
        raise InputError("missing --eps: the radius to train for")
    config = TrainConfig(
        output=args.output, eps=args.eps, model=shipped_model(args.model) if args.model else None, arch=args.arch,
        data=args.data, method=args.method, epochs=args.epochs, warmup=args.warmup, rampup=args.rampup,
        batch_size=args.batch_size, lr=args.lr, kappa=args.kappa, seed=args.seed, schedule=args.schedule,
        init=args.init, grad_clip=args.grad_clip, backend=args.backend, holdout=args.holdout, resume=args.resume,
        threads=args.threads, hr_alpha=args.hr_alpha, hr_r=args.hr_r, loss=args.loss,
        **{name: getattr(args, name) for name in ("tau", "hkr_alpha", "hkr_margin") if getattr(args, name) is not None})
    bars = not args.json and sys.stderr.isatty()
    report = None if args.json or bars else _print_epoch
    result = train(config, progress=bars, on_epoch=report)
    if args.json:
        print(json.dumps({"output": result.output, "checkpoint": result.checkpoint, "seconds": result.seconds,
                          "train_size": result.train_size, "holdout_size": result.holdout_size,
                          "holdout": result.holdout.as_dict() if result.holdout else None,
                          "history": [asdict(s) for s in result.history]}))
        return 0
    epochs = max(len(result.history), 1)
    print(f"wrote {result.output} ({len(result.trainable)} weight tensors trained on {result.train_size} samples, "
          f"{result.seconds:.1f} s, {result.seconds / epochs:.2f} s/epoch; checkpoint {result.checkpoint})")
    if result.holdout is not None:
        h = result.holdout
        print(f"held-out {h.n} samples, eps={h.eps:g}, method={h.method}: clean accuracy {h.clean_accuracy:.2%}, "
              f"certified accuracy {h.certified_accuracy:.2%}")
        print(f"reproduce: {result.reproduce}")
    return 0


def _print_epoch(stats) -> None:
    held = ""
    if stats.holdout_certified_accuracy is not None:
        held = (f" | held-out clean {stats.holdout_clean_accuracy:.1%} "
                f"certified {stats.holdout_certified_accuracy:.1%}")
    print(f"epoch {stats.epoch}: eps {stats.eps:.4g} kappa {stats.kappa:.2f} | loss {stats.loss:.4f} "
          f"clean {stats.clean_loss:.4f}/{stats.clean_accuracy:.1%} robust {stats.robust_loss:.4f}/"
          f"{stats.certified_accuracy:.1%}{held} | {stats.seconds:.2f} s", flush=True)


# ---- export-training -----------------------------------------------------------------------------------

def add_export_training(sub) -> None:
    p = sub.add_parser("export-training", help="write onnxruntime-training artifacts for certified training")
    p.add_argument("model", help="ONNX model file (or the name of a shipped model)")
    p.add_argument("-o", "--output", help="folder for training/eval/optimizer graphs, checkpoint and manifest")
    p.add_argument("--method", default="ibp", help="bound method: ibp or crown-ibp (default: ibp)")
    p.add_argument("--eps", type=float, help="target L-inf radius, recorded in the manifest (epsilon is an input)")
    p.add_argument("--domain", nargs=2, type=float, metavar=("LO", "HI"), help="clip the input box to [LO, HI]")
    p.add_argument("--grad-clip", type=float, default=10.0, help="clip the gradient's L2 norm (0: off)")
    p.set_defaults(run=run_export_training, reads=("model",), writes=())


def run_export_training(args) -> int:
    from graphcert.errors import InputError
    from graphcert.training.ort import export_training
    if args.output is None:
        raise InputError("missing -o DIR: the folder to write the artifacts to")
    if args.eps is None:
        raise InputError("missing --eps: the L-inf radius to train for")
    files = export_training(shipped_model(args.model), args.output, args.method, args.eps,
                            tuple(args.domain) if args.domain else None, args.grad_clip or None)
    print(f"wrote {args.output}: {', '.join(files)}")
    return 0
