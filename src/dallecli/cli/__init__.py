"""The ``dalle`` command line: thin Typer commands over the engine."""
