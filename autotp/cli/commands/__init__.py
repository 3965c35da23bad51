"""Subcommands of the ``autotp`` CLI, one module each (see ``autotp.cli``)."""
