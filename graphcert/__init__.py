"""graphcert: a graph-rewriting compiler over ONNX models for certified robustness."""
__version__ = "0.1.0"
