"""The public API is small and explicit: `from fastlearn import *` gives exactly `__all__`."""
import fastlearn


def test_star_import_gives_only_the_public_api():
    ns = {}
    exec("from fastlearn import *", ns)
    names = {k for k in ns if not k.startswith("__")}
    assert names == set(fastlearn.__all__)
    assert {"image_dls", "transfer_learner", "lr_find", "load_recipe", "sample"} <= names


def test_fastai_learner_methods_not_shadowed():
    from fastai.learner import Learner
    from fastlearn.train.learner import TransferLearner
    added = set(vars(TransferLearner)) - {"__init__", "__module__", "__doc__", "__qualname__", "__firstlineno__",
                                          "__static_attributes__"}
    assert not (added & set(dir(Learner))), added & set(dir(Learner))   # adds, never overrides
