"""``python -m lightning_ext`` is the ``lightning-ext`` command."""

from lightning_ext.cli import main

if __name__ == "__main__":
    main()
