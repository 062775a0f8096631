"""BatchNorm during fine-tuning: keep the pretrained running statistics (eval-mode BN) or let them adapt.

fastai trains BatchNorm layers everywhere (`train_bn=True`): in train mode each layer normalises with the
batch's statistics and moves its running statistics towards the new data. After a head has been fitted on
features the frozen body computed in eval mode (fastlearn.features), train-mode BN changes the features the head
sees, most at small batch sizes and resolutions far from the pretraining one. Freezing the statistics (BN in eval
mode, its affine weights still trainable) keeps the features the head was fitted on; Keras' fine-tuning guide and
detectron2's FrozenBatchNorm do the same for small data.
"""
from __future__ import annotations

from fastai.callback.core import Callback
from torch import nn

__all__ = ["FrozenBNStats", "bn_layers"]


def bn_layers(model: nn.Module) -> list[nn.Module]:
    "BatchNorm layers that keep running statistics."
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class FrozenBNStats(Callback):
    "Put every BatchNorm layer in eval mode for training batches: running statistics stay as pretrained."
    order = -9  # right after TrainEvalCallback (-10) puts the whole model in train mode

    def before_train(self):
        for m in bn_layers(self.learn.model):
            m.eval()
