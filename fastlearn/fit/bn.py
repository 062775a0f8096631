"""BatchNorm in inference mode while a network is fine-tuned (Keras' advice for transfer learning).

In train mode a BN layer normalises each batch by that batch's statistics and moves its running statistics
toward them. When fine-tuning starts from a head fitted on the frozen body's features, both change what the head
sees: small augmented batches give noisy statistics, and the running ones drift from those the head was fitted
on. In inference mode every BN layer normalises by its running statistics, which stay as they were; its scale and
shift still train when their group does. fastai sets the whole model to train mode before each training epoch
(`TrainEvalCallback.before_train`, order -10); this callback puts the BN layers back right after it.
"""
from __future__ import annotations

from fastai.callback.core import Callback

from ..core.models import bn_layers

__all__ = ["BNInference"]


class BNInference(Callback):
    "Every BatchNorm layer in inference mode during training: running statistics used, never updated."
    order = -9  # right after TrainEvalCallback (-10) set model.train()

    def before_train(self):
        for m in bn_layers(self.learn.model).values():
            m.eval()
