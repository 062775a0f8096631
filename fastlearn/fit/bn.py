"""BatchNorm in inference mode while a network is fine-tuned (Keras' advice for transfer learning).

Fine-tuning from a head fitted on the frozen body's features, train-mode BN would normalise by noisy small-batch
statistics and move its running statistics away from those the head was fitted on. In inference mode it uses the
running statistics, unchanged; its scale and shift still train. fastai sets the whole model to train mode before
each training epoch (`TrainEvalCallback`, order -10); this callback puts the BN layers back right after it.
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
