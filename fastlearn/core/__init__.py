"""Training primitives that know nothing of folders or runs: recipes, schedules, the LR finder, layer groups,
optimizers, models, losses, targets, weights files and the lean training step."""
