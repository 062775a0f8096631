"""Every RNG a CPU/CUDA fastai run draws from, captured and put back as plain data (checkpoints, lr_find's
snapshot): python, numpy, torch, cuda, and the DataLoaders' own `random.Random`."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state(dls=None) -> dict:
    """The RNG states as plain data (numpy's key array as a tensor: `weights_only` loads refuse numpy arrays).
    `dls`: also the train/valid DataLoaders' `rng`."""
    np_state = np.random.get_state(legacy=False)
    st = {"python": random.getstate(),
          "numpy": {"bit_generator": np_state["bit_generator"],
                    "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                    "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                    "gauss": float(np_state["gauss"])},
          "torch": torch.get_rng_state(),
          "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []}
    if dls is not None:
        st["dl_train"] = dls.train.rng.getstate()
        st["dl_valid"] = dls.valid.rng.getstate()
    return st


def set_rng_state(st: dict, dls=None, globals_: bool = True) -> None:
    "Put back what `rng_state` saved (the DataLoaders' too when `dls` is given and the state has them)."
    if globals_:
        random.setstate(_tuples(st["python"]))
        n = st["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"],
                             "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
        torch.set_rng_state(st["torch"])
        if st["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])
    if dls is not None and "dl_train" in st:
        dls.train.rng.setstate(_tuples(st["dl_train"]))
        dls.valid.rng.setstate(_tuples(st["dl_valid"]))


def _tuples(x):
    "random.setstate needs tuples; a torch round trip may hand back lists."
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
