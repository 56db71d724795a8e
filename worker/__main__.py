"""``python -m worker``: the same program as ``pulsecal-worker``."""

from .app import main

if __name__ == "__main__":
    main()
