"""Stop training on the first NaN/Inf loss or gradient, before the optimizer step can spread it into the weights.

fastai's `TerminateOnNaNCallback` looks at the loss only, after the step, and just cancels the fit; here
`NonFiniteError` names the step, the stage and the LR; the weights stay finite and the last checkpoint good.
"""
from __future__ import annotations

import math

import torch
from fastai.callback.core import Callback

from ..base.errors import NonFiniteError


__all__ = ["NonFiniteGuard", "grad_norm", "is_finite"]


def is_finite(x: torch.Tensor | float) -> bool:
    "True when every element of `x` is finite (one host sync for a tensor)."
    return bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else math.isfinite(x)


def grad_norm(params) -> torch.Tensor | None:
    "Global L2 norm of the gradients of `params` (torch's own foreach kernel); None when none has a grad."
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    if len({(g.device, g.dtype) for g in grads}) == 1:
        # one foreach call on any device (torch's get_total_norm runs one norm per tensor off CUDA)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)


class NonFiniteGuard(Callback):
    """Raises `NonFiniteError` when a training loss, a running statistic or the gradient norm is NaN/Inf, before
    the optimizer step. The flags are computed on the device and read together before the step: one host sync.
    It runs after fastai's `MixedPrecision`, whose GradScaler cancels the normal fp16 overflow steps first, so only
    real non-finite gradients raise; steps `GradientAccumulation` cancels are checked at the accumulated step."""
    order = 12        # after MixedPrecision (10) and GradientClip (11); before the optimizer step
    run_valid = False

    def __init__(self):
        self.stage = ""
        self.steps = 0    # training batches seen across fits (used when no Checkpointer counts them)

    def _where(self) -> str:
        lrs = [float(h["lr"]) for h in self.opt.hypers]
        lr = f"{lrs[-1]:.3g}" if min(lrs) == max(lrs) else f"{lrs[-1]:.3g} (head) .. {lrs[0]:.3g} (first group)"
        stage = f"stage {self.stage!r}, " if self.stage else ""
        ck = getattr(self.learn, "checkpointer", None)  # the Checkpointer's count survives a resume
        step = ck.global_step if ck is not None else self.steps
        return (f"at step {step + 1} ({stage}epoch {self.epoch + 1}, batch {self.iter + 1}/{self.n_iter}) "
                f"with lr {lr}")

    def before_fit(self):
        self._model = None  # the buffer lists below are built once per fit and model

    def before_batch(self):
        # the forward updates BatchNorm running statistics before any loss exists: keep a copy to put back
        # if this batch turns out non-finite (copies into buffers allocated once, a few KB per norm layer)
        if getattr(self, "_model", None) is not self.model:
            self._model = self.model
            self._bufs = list(self.model.buffers())  # num_batches_tracked too: it counts this forward
            self._fbufs = [b for b in self._bufs if b.is_floating_point()]
            self._saved = [torch.empty_like(b) for b in self._bufs]
        if self._bufs:
            torch._foreach_copy_(self._saved, self._bufs)
        self._flags = None

    def after_loss(self):
        if len(self.yb) == 0:
            return
        loss_ok = torch.isfinite(self.learn.loss_grad.detach()).all()
        bufs_ok = (torch.isfinite(torch.cat([b.reshape(-1) for b in self._fbufs])).all() if self._fbufs
                   else torch.ones((), dtype=torch.bool, device=loss_ok.device))
        self._flags = torch.stack([loss_ok, bufs_ok.to(loss_ok.device)])

    def before_step(self):
        self._check(grad_norm(p for pg in self.opt.param_lists for p in pg))

    def after_cancel_step(self):  # a step another callback cancelled: its loss and statistics still count
        self._check(None)

    def _check(self, norm) -> None:
        flags, self._flags = getattr(self, "_flags", None), None
        if flags is None:
            return
        if norm is not None:
            flags = torch.cat([flags, torch.isfinite(norm).reshape(1).to(flags.device)])
        loss_ok, bufs_ok, *grad_ok = flags.tolist()  # the step's one host sync
        bad = None
        if not loss_ok:
            bad = f"non-finite training loss ({float(self.learn.loss_grad.detach().float().mean())})"
        elif not bufs_ok:
            names = [n for n, b in self.model.named_buffers() if b.is_floating_point() and not is_finite(b)]
            bad = f"non-finite running statistics in {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
        if bad is not None:
            if getattr(self, "_bufs", None):
                torch._foreach_copy_(self._bufs, self._saved)
            raise NonFiniteError(f"{bad} {self._where()}; the optimizer step was not taken and the running "
                                 f"statistics were put back, so the model is the last finite one. Lower the lr, "
                                 f"check the inputs for NaN/Inf, or set grad_clip")
        if grad_ok and not grad_ok[0]:
            raise NonFiniteError(f"non-finite gradient norm ({float(norm)}) {self._where()}; the optimizer step "
                                 f"was not taken, so the weights are the last finite ones (BatchNorm statistics "
                                 f"from this batch's forward pass are finite: checked after the loss). Lower the lr or set "
                                 f"grad_clip (the loss was {float(self.learn.loss.detach()):.4g})")

    def after_batch(self):
        if len(self.yb):
            self.steps += 1
