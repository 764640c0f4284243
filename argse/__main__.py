"""``python -m argse`` (and ``torchrun -m argse``) runs the CLI."""

from argse.cli import main

if __name__ == "__main__":
    main()
