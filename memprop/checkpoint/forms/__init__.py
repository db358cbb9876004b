"""The forms a user applies: how each strategy changes a model (see the package
docstring, memprop.checkpoint, for the modules). Nothing here imports
memprop.checkpoint.planning."""
