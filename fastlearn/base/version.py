"""The library version: the one place it is defined (setup.cfg reads it; checkpoints and model.json record it)."""
__version__ = "0.1.0"
