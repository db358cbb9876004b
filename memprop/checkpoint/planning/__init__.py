"""Planning: what to choose under a budget (``plan``), from a profile of the model and
simulated steps (see the package docstring, memprop.checkpoint, for the modules)."""
