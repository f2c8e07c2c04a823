"""Subcommands of the `pyrebasin` CLI, one module each (see pyrebasin/cli.py)."""
