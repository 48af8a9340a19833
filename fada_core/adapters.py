"""(features, low-resolution logits) from common segmentation models, for FADA.

FADA needs two things from a segmentation network: the feature map its
discriminator judges and the logits *before* they are upsampled to the image
(the losses upsample on the fly). Ready-made models hide both behind a
``forward`` that returns full-resolution logits. Each adapter here wraps a model
and returns :class:`SegmentationOutput` ``(features, logits)`` instead:

- :class:`TorchvisionAdapter`: ``torchvision.models.segmentation`` (DeepLabV3,
  FCN, LRASPP): ``backbone`` then ``classifier``, no final upsampling.
- :class:`SMPAdapter`: segmentation_models_pytorch encoder-decoder models (Unet,
  DeepLabV3Plus, FPN, ...): encoder, decoder, the head's conv, no upsampling.
- :class:`SegformerAdapter`: Hugging Face ``SegformerForSemanticSegmentation``
  (MiT backbones): the last encoder stage or the decoder's fused features.
- :class:`HookAdapter`: anything else, by the names of its submodules.

:func:`adapt` picks one by duck typing. Nothing here imports torchvision,
segmentation_models_pytorch or transformers: the adapters only use the
attributes those models have. Each adapter's ``align_corners`` says how the
wrapped model upsamples its own logits, to pass on to the losses when the
model's convention should be kept (FADA's own is ``True``, the default of every
fada_core loss).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Mapping, NamedTuple, Optional

from torch import Tensor, nn

__all__ = [
    "SegmentationOutput",
    "TorchvisionAdapter",
    "SMPAdapter",
    "SegformerAdapter",
    "HookAdapter",
    "adapt",
]


class SegmentationOutput(NamedTuple):
    """``features`` :math:`(B, C, h, w)` for the discriminator, ``logits`` :math:`(B, K, h', w')` not upsampled."""

    features: Tensor
    logits: Tensor


def _require(model: nn.Module, family: str, *attributes: str) -> None:
    missing = [a for a in attributes if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise TypeError(
            f"model must be a {family} model (an nn.Module with {', '.join(attributes)}); "
            f"{type(model).__name__} lacks {', '.join(missing) or 'nn.Module'}"
        )


def _check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def _main_output(out: Any) -> Tensor:
    """The logits of a model's output: a tensor, ``out["out"]`` / ``out["logits"]``, ``.logits``, or ``out[0]``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("out", "logits"):
            if key in out:
                return out[key]
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}; name a module instead")


class _Capture:
    """Holds what one submodule receives (its first positional input) or returns, during one forward."""

    def __init__(self, module: nn.Module, what: str) -> None:
        self.value: Any = None
        if what == "input":
            self.handle = module.register_forward_pre_hook(self._keep_input)
        else:
            self.handle = module.register_forward_hook(self._keep_output)

    def _keep_input(self, module, args):
        self.value = args[0]

    def _keep_output(self, module, args, output):
        self.value = output

    def take(self, where: str) -> Any:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"{where} was not called during the model's forward")
        return value


class TorchvisionAdapter(nn.Module):
    """A ``torchvision.models.segmentation`` model: ``backbone`` then ``classifier``, not upsampled.

    Features are the backbone's ``"out"`` map (DeepLabV3, FCN: 2048 channels at
    stride 8 for ResNet-50/101, the input of the classifier, as FADA's
    DeepLab-v2) or, for LRASPP, its ``"high"`` map. The auxiliary classifier
    is not run. torchvision upsamples with ``align_corners=False``.
    ``TorchvisionAdapter(deeplabv3_resnet50(num_classes=19))(images)`` gives
    ``(B, 2048, H/8, W/8)`` features and ``(B, 19, H/8, W/8)`` logits.
    """

    align_corners = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _require(model, "torchvision segmentation", "backbone", "classifier")
        self.model = model

    def forward(self, images: Tensor) -> SegmentationOutput:
        stages = self.model.backbone(images)
        if "out" in stages:  # DeepLabV3, FCN: the classifier takes the last stage
            return SegmentationOutput(stages["out"], self.model.classifier(stages["out"]))
        # LRASPP: the classifier takes the dict of the low- and high-level maps
        return SegmentationOutput(stages["high"], self.model.classifier(stages))


def _call_decoder(decoder: nn.Module, features: List[Tensor]) -> Tensor:
    # smp >= 0.5 passes the list of stages; earlier releases unpacked it
    params = inspect.signature(decoder.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return decoder(*features)
    return decoder(features)


class SMPAdapter(nn.Module):
    """A segmentation_models_pytorch encoder-decoder model, the head's upsampling skipped.

    Args:
        model: e.g. ``smp.DeepLabV3Plus(..., encoder_weights=None)`` or ``smp.Unet``,
            built with ``activation=None`` (FADA needs logits).
        features: ``"decoder"`` (default): the decoder's output, what the
            segmentation head's conv sees; ``"encoder"``: the deepest encoder stage.

    The logits are the head's conv output before its ``upsampling`` (DeepLabV3+:
    stride 4; Unet: already full resolution). smp upsamples with ``align_corners=True``.
    """

    align_corners = True

    def __init__(self, model: nn.Module, features: str = "decoder") -> None:
        super().__init__()
        _require(model, "segmentation_models_pytorch", "encoder", "decoder", "segmentation_head")
        self.features = _check_choice("features", features, ("decoder", "encoder"))
        head = model.segmentation_head
        if not isinstance(head, nn.Sequential) or len(head) == 0:
            raise TypeError("model.segmentation_head must be smp's SegmentationHead (conv, upsampling, activation)")
        activation = getattr(head[-1], "activation", head[-1])
        if len(head) > 1 and not isinstance(activation, nn.Identity):
            raise ValueError(
                f"the model's head ends in {type(activation).__name__}: FADA needs logits, build it with activation=None"
            )
        self.model = model

    def forward(self, images: Tensor) -> SegmentationOutput:
        if hasattr(self.model, "check_input_shape"):
            self.model.check_input_shape(images)  # smp's own error for sizes its encoder cannot take
        stages = self.model.encoder(images)
        decoded = _call_decoder(self.model.decoder, stages)
        logits = self.model.segmentation_head[0](decoded)
        return SegmentationOutput(decoded if self.features == "decoder" else stages[-1], logits)


class SegformerAdapter(nn.Module):
    """Hugging Face ``SegformerForSemanticSegmentation`` (MiT encoder, all-MLP decoder).

    Args:
        model: e.g. ``SegformerForSemanticSegmentation(SegformerConfig(num_labels=19))``.
        features: ``"decoder"`` (default): the decoder's fused map that its 1x1
            classifier sees (``decoder_hidden_size`` channels, stride 4);
            ``"encoder"``: the last MiT stage (``hidden_sizes[-1]`` channels, stride 32).

    The logits are the model's own (stride 4). Hugging Face upsamples with
    ``align_corners=False``.
    """

    align_corners = False

    def __init__(self, model: nn.Module, features: str = "decoder") -> None:
        super().__init__()
        _require(model, "Hugging Face Segformer", "segformer", "decode_head")
        self.features = _check_choice("features", features, ("decoder", "encoder"))
        self.model = model
        self._capture = _Capture(model.decode_head.classifier, "input") if features == "decoder" else None

    def forward(self, images: Tensor) -> SegmentationOutput:
        out = self.model(pixel_values=images, output_hidden_states=self.features == "encoder", return_dict=True)
        if self._capture is not None:
            return SegmentationOutput(self._capture.take("decode_head.classifier"), out.logits)
        last = out.hidden_states[-1]
        if last.dim() != 4:
            raise ValueError("the last encoder stage is not a (B, C, h, w) map: build the model with reshape_last_stage=True")
        return SegmentationOutput(last, out.logits)


class HookAdapter(nn.Module):
    """Any model: features and logits taken from named submodules with forward hooks.

    Args:
        model: the network; its ``forward`` is called with the images.
        features: name of the submodule (as in ``model.named_modules()``) whose
            output, or input with ``features_from="input"``, is the feature map.
        logits: name of the submodule whose output is the low-resolution logits;
            ``None`` takes them from the model's output (a tensor, ``["out"]``,
            ``["logits"]``, ``.logits`` or the first element).
        features_from: ``"output"`` (default) or ``"input"`` of ``features``.
        select: optional function applied to the captured features (e.g.
            ``lambda stages: stages["out"]`` when the module returns a dict).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 5, 1))
        >>> f, z = HookAdapter(net, features="1")(torch.randn(2, 3, 32, 32))   # ReLU's output
        >>> f.shape, z.shape
        (torch.Size([2, 8, 8, 8]), torch.Size([2, 5, 8, 8]))
    """

    align_corners = True  # unknown: FADA's default

    def __init__(
        self,
        model: nn.Module,
        features: str,
        logits: Optional[str] = None,
        features_from: str = "output",
        select: Optional[Callable[[Any], Tensor]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_choice("features_from", features_from, ("output", "input"))
        self.model = model
        self.names = (features, logits)
        self._features = _Capture(self._submodule("features", features), features_from)
        self._logits = None if logits is None else _Capture(self._submodule("logits", logits), "output")
        self._select = select

    def _submodule(self, argument: str, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in self.model.named_modules() if n][:12]
            raise ValueError(f"{argument}={name!r} is not a submodule of the model; some names: {names}") from None

    def forward(self, images: Tensor, *args, **kwargs) -> SegmentationOutput:
        out = self.model(images, *args, **kwargs)
        features = self._features.take(self.names[0])
        if self._select is not None:
            features = self._select(features)
        logits = _main_output(out) if self._logits is None else self._logits.take(self.names[1])
        return SegmentationOutput(features, logits)


def adapt(model: nn.Module, **kwargs) -> nn.Module:
    """The adapter for ``model``'s family, found by its attributes (keyword arguments go to it).

    Raises ``TypeError`` for an unknown family: use :class:`HookAdapter` there.
    """
    if hasattr(model, "segformer") and hasattr(model, "decode_head"):
        return SegformerAdapter(model, **kwargs)
    if all(hasattr(model, a) for a in ("encoder", "decoder", "segmentation_head")):
        return SMPAdapter(model, **kwargs)
    if hasattr(model, "backbone") and hasattr(model, "classifier"):
        return TorchvisionAdapter(model, **kwargs)
    raise TypeError(
        f"no adapter recognises {type(model).__name__} (torchvision segmentation, smp or Hugging Face "
        "Segformer); use HookAdapter(model, features=<module name>, logits=<module name>)"
    )
