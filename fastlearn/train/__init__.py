"""The training policy: a learner built from a recipe, the stage plan, the head on cached features, `auto`'s
strategy, the recipe's callbacks, and `run_recipe`, which runs them into a run folder."""
