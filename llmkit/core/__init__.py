"""The llmkit library: no typer, no rich, no printing, no exiting.

Submodules are imported explicitly (``from llmkit.core import model``); this package file stays
empty so that importing the light modules (config, errors) never drags torch in.
"""
