"""Techniques that act during `fit`, as fastai callbacks or small loops: precision and speed, progressive
resizing, EMA, SWA, keep-best, the non-finite guard, health monitoring, data-parallel training."""
