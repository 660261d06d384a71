"""The ``sdl`` command line: a thin typer app over the library modules."""
