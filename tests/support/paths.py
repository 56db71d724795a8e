"""Where things are in the repository."""

from pathlib import Path

__all__ = ("ROOT_DIR",)

ROOT_DIR = Path(__file__).resolve().parents[2]
