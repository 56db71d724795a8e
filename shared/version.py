import functools
from importlib import metadata

__all__ = ("build_version",)


@functools.cache
def build_version() -> str:
    """The installed package's version; read once (the lookup parses package metadata)."""
    try:
        return metadata.version("pulsecal")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"
