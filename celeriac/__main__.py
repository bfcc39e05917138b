"""``python -m celeriac``."""

from celeriac.cli.main import main

if __name__ == "__main__":
    main()
