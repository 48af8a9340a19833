"""fada_core: fine-grained adversarial domain adaptation (FADA, ECCV 2020) for segmentation.

The public API: four modules, the two-call adversarial helper, the upsampled
cross-entropy, the one-call training step, :mod:`fada_core.functional`, and the
optional :mod:`fada_core.adapters` (torchvision / smp / Hugging Face models) and
:mod:`fada_core.plot` (matplotlib), imported on demand. The fused CPU/CUDA kernels load
lazily on first use (``python -m fada_core.info`` tells what you have).
"""

from . import functional
from .discriminator import FineGrainedDiscriminator
from .encoding import DomainEncoding
from .functional import CCDResult, ClassCenterStats
from .loss import FADALoss, FineGrainedAdversary, UpsampledCrossEntropy
from .metrics import ClassCenterDistance
from .training import AdversarialStep, StepLosses

__version__ = "0.1.0"

__all__ = [
    "FineGrainedDiscriminator",
    "DomainEncoding",
    "FADALoss",
    "UpsampledCrossEntropy",
    "FineGrainedAdversary",
    "ClassCenterDistance",
    "AdversarialStep",
    "StepLosses",
    "CCDResult",
    "ClassCenterStats",
    "functional",
]
