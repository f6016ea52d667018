"""``python -m lightning_msign fit --config recipes/debug.yaml`` runs :func:`lightning_msign.cli.cli_main`."""

from lightning_msign.cli import cli_main

if __name__ == "__main__":
    cli_main()
