"""One FADA training iteration, for users who would rather not write the two steps themselves."""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .loss import FineGrainedAdversary, UpsampledCrossEntropy

Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]
Segmenter = Union[
    Callable[[Tensor], Tuple[Tensor, Tensor]],  # images -> (features, logits)
    Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]],  # (images -> features, features -> logits)
]


class StepLosses(NamedTuple):
    """The three losses of one iteration, detached (reading them with ``.item()`` is the caller's sync)."""

    segmentation: Tensor
    adversarial: Tensor
    discriminator: Tensor


class AdversarialStep:
    r"""FADA's adversarial iteration in the official order (``train_adv.py``).

    1. every optimizer's gradients cleared;
    2. source forward, supervised loss ``seg_loss(z_s, y_s)``, backward;
    3. target forward, :meth:`FineGrainedAdversary.generator_loss`, backward;
    4. the segmentation network's optimizers step;
    5. the discriminator's gradients from step 3 are dropped (``zero_grad``);
    6. :meth:`FineGrainedAdversary.discriminator_loss` on the detached features
       and logits of steps 2-3, backward, and the discriminator's optimizer steps.

    With a :class:`torch.amp.GradScaler`, every backward is scaled, every
    optimizer steps through the scaler and ``scaler.update()`` runs once at the
    end (torch's recipe for several losses and optimizers); with a separate
    ``discriminator_scaler``, each scaler scales and updates its own step.
    ``autocast_dtype`` runs the forwards and losses (not the backwards) under
    :func:`torch.autocast`.

    Args:
        model: images :math:`(B, 3, H, W)` → ``(features, low-resolution logits)``:
            an adapter of :mod:`fada_core.adapters`, or any callable returning the pair;
            or a pair ``(features, classifier)`` of callables (images → features,
            features → logits). With the pair, the target logits, which only give the
            generator step its (detached) soft labels, are computed without autograd:
            less memory, and a ``DistributedDataParallel`` classifier is not left
            waiting for gradients that never come.
        adversary: the :class:`~fada_core.FineGrainedAdversary` (holds the discriminator).
        optimizer: the segmentation network's optimizer, or several (the official
            code has one for the feature extractor and one for the classifier).
        discriminator_optimizer: the discriminator's.
        seg_loss: ``(logits, labels) → loss``; default
            :class:`~fada_core.UpsampledCrossEntropy` with the adversary's
            temperature (1.8, as FADA's adversarial stage), backend and ``align_corners``.
        scaler: optional ``torch.amp.GradScaler``.
        autocast_dtype: optional ``torch.float16`` / ``torch.bfloat16``.
        discriminator_scaler: optional scaler of the discriminator's step
            (default: ``scaler``).
        on_discriminator_gradients: optional callable run after the
            discriminator's backward, before its optimizer step (e.g. to
            all-reduce its gradients when it is not wrapped in
            ``DistributedDataParallel``).

    Example:
        >>> from fada_core import FineGrainedDiscriminator
        >>> net = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1); head = torch.nn.Conv2d(8, 3, 1)
        >>> model = lambda x: (lambda f: (f, head(f)))(net(x))
        >>> adversary = FineGrainedAdversary(FineGrainedDiscriminator(num_classes=3, ndf=16), backend="eager")
        >>> step = AdversarialStep(model, adversary,
        ...                        torch.optim.SGD([*net.parameters(), *head.parameters()], lr=1e-3),
        ...                        torch.optim.Adam(adversary.discriminator.parameters(), lr=1e-4))
        >>> x_s, y_s, x_t = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)), torch.randn(2, 3, 32, 32)
        >>> losses = step(x_s, y_s, x_t)
        >>> sorted(losses._asdict())
        ['adversarial', 'discriminator', 'segmentation']
    """

    def __init__(
        self,
        model: Segmenter,
        adversary: FineGrainedAdversary,
        optimizer: Optimizers,
        discriminator_optimizer: torch.optim.Optimizer,
        seg_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        scaler: Optional["torch.amp.GradScaler"] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        discriminator_scaler: Optional["torch.amp.GradScaler"] = None,
        on_discriminator_gradients: Optional[Callable[[], None]] = None,
    ) -> None:
        if not (callable(model) or (isinstance(model, tuple) and len(model) == 2 and all(map(callable, model)))):
            raise TypeError("model must be a callable images -> (features, logits) or a pair (features, classifier) "
                            f"of callables, got {type(model).__name__}")
        if not isinstance(adversary, FineGrainedAdversary):
            raise TypeError(f"adversary must be a FineGrainedAdversary, got {type(adversary).__name__}")
        self.optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        if not self.optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in self.optimizers):
            raise TypeError("optimizer must be a torch.optim.Optimizer or a non-empty sequence of them")
        if not isinstance(discriminator_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"discriminator_optimizer must be a torch.optim.Optimizer, got {type(discriminator_optimizer).__name__}"
            )
        if autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype}")
        if seg_loss is None:
            crit = adversary.criterion
            seg_loss = UpsampledCrossEntropy(
                crit.temperature, backend=crit.backend, align_corners=crit.align_corners
            )
        self.model = model
        self.adversary = adversary
        self.discriminator_optimizer = discriminator_optimizer
        self.seg_loss = seg_loss
        self.scaler = scaler
        self.discriminator_scaler = scaler if discriminator_scaler is None else discriminator_scaler
        self.autocast_dtype = autocast_dtype
        self.on_discriminator_gradients = on_discriminator_gradients

    def _forward(self, images: Tensor, logits_need_grad: bool) -> Tuple[Tensor, Tensor]:
        if not isinstance(self.model, tuple):
            return self.model(images)
        features, classifier = self.model
        f = features(images)
        with torch.set_grad_enabled(logits_need_grad and torch.is_grad_enabled()):
            return f, classifier(f)

    def _autocast(self, like: Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(like.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def _backward(loss: Tensor, scaler) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    @staticmethod
    def _step(optimizer: torch.optim.Optimizer, scaler) -> None:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)

    def __call__(self, source_images: Tensor, source_labels: Tensor, target_images: Tensor) -> StepLosses:
        for opt in (*self.optimizers, self.discriminator_optimizer):
            opt.zero_grad()
        size_s, size_t = tuple(source_images.shape[-2:]), tuple(target_images.shape[-2:])

        with self._autocast(source_images):
            f_s, z_s = self._forward(source_images, logits_need_grad=True)
            loss_seg = self.seg_loss(z_s, source_labels)
        scaler, scaler_d = self.scaler, self.discriminator_scaler
        self._backward(loss_seg, scaler)  # frees the source graph before the target forward, as the official code

        with self._autocast(target_images):
            f_t, z_t = self._forward(target_images, logits_need_grad=False)
            loss_adv = self.adversary.generator_loss(f_t, z_t, size_t)
        self._backward(loss_adv, scaler)
        for opt in self.optimizers:
            self._step(opt, scaler)
        if scaler is not None and scaler is not scaler_d:
            scaler.update()

        self.discriminator_optimizer.zero_grad()  # the generator step's gradients on D are dropped
        with self._autocast(target_images):
            loss_d = self.adversary.discriminator_loss(f_s, z_s, size_s, f_t, z_t, size_t)
        self._backward(loss_d, scaler_d)
        if self.on_discriminator_gradients is not None:
            self.on_discriminator_gradients()
        self._step(self.discriminator_optimizer, scaler_d)
        if scaler_d is not None:
            scaler_d.update()
        return StepLosses(loss_seg.detach(), loss_adv.detach(), loss_d.detach())
