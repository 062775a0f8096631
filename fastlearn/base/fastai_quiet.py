"""fastai, imported once with one known-harmless warning silenced (imported first by `fastlearn/__init__.py`).

`fastai.layers` decorates a few activations with `torch.jit.script` at import, and torch >= 2.10 answers each with
a FutureWarning that every command (even `--help`) would print. The filter is scoped to this one import, so the
user's warning settings are untouched and the same warning raised later by anything else is still shown.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import fastai.layers  # noqa: F401  (the module that calls torch.jit.script at import)
