"""The ``cnnkit`` command line: one Typer app per subcommand file, joined in ``app.py``."""
