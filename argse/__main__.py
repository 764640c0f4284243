"""``python -m argse`` (and ``torchrun -m argse``) runs the CLI, through :mod:`argse.launch`."""

from argse.launch import main

if __name__ == "__main__":
    main()
