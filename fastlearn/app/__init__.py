"""What a user runs beyond one training: the command implementations, hyper-parameter search, diagnostics and
the recipe listing."""
