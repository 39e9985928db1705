"""Subcommands of the `blens` command line (see blens_fast/cli.py)."""
