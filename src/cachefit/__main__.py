"""``python -m cachefit``: the same as the ``cachefit`` command."""

from cachefit.cli import main

if __name__ == "__main__":
    main()
