"""``python -m analysis``: the same program as ``pulsecal-analysis``."""

from .app import main

if __name__ == "__main__":
    main()
