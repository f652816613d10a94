"""Certified training (IBP, CROWN-IBP) through bound graphs, on torch or onnxruntime-training, with the
trained weights written back into the original ONNX model."""
from graphcert.training.loop import EpochStats, TrainConfig, TrainResult, train

__all__ = ["EpochStats", "TrainConfig", "TrainResult", "train"]
