"""``python -m shared.settings --markdown``: print docs/configuration.md (``make config-doc``)."""

import argparse
import sys

from .reference import configuration_markdown


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.settings",
        description="The configuration reference, generated from the settings classes.",
    )
    parser.add_argument(
        "--markdown", action="store_true", required=True, help="print docs/configuration.md"
    )
    parser.parse_args()
    sys.stdout.write(configuration_markdown())


if __name__ == "__main__":
    main()
