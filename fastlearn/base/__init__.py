"""The bottom layer: errors, the version, the console and progress lines, atomic files, RNG state, ranks.

Nothing here imports another fastlearn package. `errors`, `version` and `console` import neither torch nor fastai,
so the commands that only print stay fast."""
