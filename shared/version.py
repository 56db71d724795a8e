from importlib import metadata

__all__ = ("build_version",)


def build_version() -> str:
    try:
        return metadata.version("pulsecal")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"
