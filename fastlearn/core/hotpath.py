"""The training step's fixed cost: leaner versions of what a fastai step spends outside the model, with the same
results (same losses, hyper-parameters and records; tests/test_hotpath.py checks it, bench/overhead.py measures it).

`LeanLearner` sends each event only to the callbacks that handle it, computes the loss on plain tensors
(`flat_loss`) and keeps the smoothed loss on the device (`DeviceSmoothLoss`); `core.optim.LeanOptimWrapper` does
the same for the optimizer's hyper-parameters. fastai's `CastToTensor` already hands the model plain tensors; the
batch transforms keep fastai's types, which they dispatch on.
"""
from __future__ import annotations

import torch
from fastai.callback.core import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                                  CancelFitException, CancelStepException, CancelTrainException,
                                  CancelValidException, _inner_loop, event)
from fastai.learner import AvgSmoothLoss, Learner
from fastai.losses import BaseLoss
from fastai.torch_core import num_distrib
from fastcore.xtras import modify_exception

_CANCELS = (CancelBatchException, CancelBackwardException, CancelEpochException, CancelFitException,
            CancelStepException, CancelTrainException, CancelValidException)

__all__ = ["LeanLearner", "EventTable", "event_handlers", "flat_loss", "DeviceSmoothLoss", "plain_tensor"]


def _handles(cb, event_name: str) -> bool:
    "True when `cb` has its own handler for `event_name` (a method of its class or one passed as a keyword)."
    return event_name in vars(cb) or any(event_name in vars(k) for k in type(cb).__mro__ if k not in (Callback, object))


def event_handlers(cbs, event_name: str) -> list:
    "The callbacks of `cbs` that handle `event_name`, in fastai's order (sorted by `order`, stable)."
    return [cb for cb in sorted(cbs, key=lambda c: c.order) if _handles(cb, event_name)]


class EventTable:
    """Per event, the callbacks that handle it, computed once per callback list (fastai sorts the list at every event
    and calls every callback, even one without a handler). Adding or removing a callback rebuilds the table; an
    `order` changed, or a handler attached, after a callback was added is seen once the list changes."""

    def __init__(self):
        self.key, self.table = (), {}

    def handlers(self, cbs, event_name: str) -> list:
        key = tuple(cbs)
        if key != self.key:  # compares the callbacks by identity (Callback has no __eq__)
            self.key, self.table = key, {}
        hs = self.table.get(event_name)
        if hs is None:
            if not hasattr(event, event_name):
                raise Exception(f"missing {event_name}")  # what fastai's Learner raises
            # after_fit goes to every callback: fastai's Callback.__call__ resets `run` there
            hs = self.table[event_name] = (sorted(cbs, key=lambda c: c.order) if event_name == "after_fit"
                                           else event_handlers(cbs, event_name))
        return hs


def plain_tensor(x):
    "fastai's tensor subclasses (TensorBase, TensorImage, TensorCategory) as plain tensors; anything else as it is."
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor else x


def flat_loss(loss_func, pred, *yb, **kwargs):
    """`loss_func(pred, *yb)`, the same number, on plain tensors. fastai's `BaseLoss` wraps the predictions in
    `TensorBase`, whose `__torch_function__` every later op then goes through; its flattened losses are computed here
    with its own steps. Any other loss function gets plain-tensor arguments and gives a plain result."""
    pred, yb = plain_tensor(pred), tuple(plain_tensor(y) for y in yb)
    f = loss_func
    if isinstance(f, BaseLoss) and type(f).__call__ is BaseLoss.__call__ and len(yb) == 1:
        inp, targ = pred, yb[0]
        if isinstance(inp, torch.Tensor): inp = inp.transpose(f.axis, -1).contiguous()
        if isinstance(targ, torch.Tensor): targ = targ.transpose(f.axis, -1).contiguous()
        if f.floatify and targ.dtype != torch.float16: targ = targ.float()
        if targ.dtype in (torch.int8, torch.int16, torch.int32): targ = targ.long()
        if f.flatten: inp = inp.view(-1, inp.shape[-1]) if f.is_2d else inp.view(-1)
        return f.func.__call__(inp, targ.view(-1) if f.flatten else targ, **kwargs)
    return plain_tensor(f(pred, *yb, **kwargs))


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss (the same exponential average) kept on the loss's device, where fastai's
    version copies each step's loss to the CPU (a host sync per step on CUDA); under DDP fastai's version runs."""

    def accumulate(self, learn):
        if num_distrib() > 1:
            return super().accumulate(learn)
        loss = learn.loss.detach().mean()
        if self.val.device != loss.device:
            self.val = self.val.to(loss.device)
        self.count += 1
        self.val = torch.lerp(plain_tensor(loss), self.val, self.beta)

    @property
    def value(self):
        # fastai's debiased value, computed once per step (Recorder reads it twice)
        key = getattr(self, "_value_of", None)
        if key is None or key[0] is not self.val or key[1] != self.count:
            self._value, self._value_of = self.val / (1 - self.beta ** self.count), (self.val, self.count)
        return self._value


class LeanLearner(Learner):
    """A fastai `Learner` whose step costs what its model costs (`EventTable`, `flat_loss`, `DeviceSmoothLoss`);
    training computes exactly what fastai's `Learner` computes."""

    def __init__(self, *args, **kwargs):
        self._events = EventTable()
        super().__init__(*args, **kwargs)
        rec = getattr(self, "recorder", None)
        if rec is not None and type(rec.smooth_loss) is AvgSmoothLoss:
            rec.smooth_loss = DeviceSmoothLoss(beta=rec.smooth_loss.beta)

    def __call__(self, event_name):
        if isinstance(event_name, str):
            return self._call_one(event_name)
        for e in event_name:
            self._call_one(e)

    def _call_one(self, event_name):
        hs = self._events.handlers(self.cbs, event_name)
        if event_name == "after_fit" or not hs:
            for cb in hs:
                cb(event_name)
            return
        # fastai's Callback.__call__, inlined for callbacks that keep it: the same run/run_train/run_valid test
        # (with the learner's `training` read once) and the same exception message
        inner, training = event_name in _inner_loop, self.training
        for cb in hs:
            if type(cb).__call__ is not Callback.__call__:
                cb(event_name)
            elif cb.run and (not inner or (cb.run_train and training) or (cb.run_valid and not training)):
                try:
                    getattr(cb, event_name)()
                except _CANCELS:
                    raise
                except Exception as e:
                    raise modify_exception(e, f"Exception occured in `{cb.__class__.__name__}` when calling event "
                                              f"`{event_name}`:\n\t{e.args[0]}", replace=True)

    def _do_one_batch(self):
        # fastai's Learner._do_one_batch, with the loss computed by flat_loss
        self.pred = self.model(*self.xb)
        self("after_pred")
        if len(self.yb):
            self.loss_grad = flat_loss(self.loss_func, self.pred, *self.yb)
            self.loss = self.loss_grad.clone()
        self("after_loss")
        if self.training and len(self.yb):
            self._do_grad_opt()

    def __setstate__(self, state):  # learners pickled before the event table existed
        super().__setstate__(state)
        if "_events" not in self.__dict__:
            self._events = EventTable()
