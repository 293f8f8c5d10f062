"""`python -m picochat ...` (and `torchrun -m picochat ...`) runs the command-line interface."""

from picochat.cli import main

if __name__ == "__main__":
    main()
