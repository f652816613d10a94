"""Models shipped in the repository's models/ folder."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def shipped_path(name: str) -> str | None:
    for candidate in (MODELS_DIR / name, MODELS_DIR / f"{name}.onnx"):
        if candidate.is_file():
            return str(candidate)
    return None
