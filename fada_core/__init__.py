"""fada_core: fine-grained adversarial domain adaptation (FADA, ECCV 2020) for segmentation.

The public API: four modules, the two-call adversarial helper, the upsampled
cross-entropy, and :mod:`fada_core.functional`. The fused CPU/CUDA kernels load
lazily on first use (``python -m fada_core.info`` tells what you have).
"""

from . import functional
from .discriminator import FineGrainedDiscriminator
from .encoding import DomainEncoding
from .functional import CCDResult, ClassCenterStats
from .loss import FADALoss, FineGrainedAdversary, UpsampledCrossEntropy
from .metrics import ClassCenterDistance

__version__ = "0.1.0"

__all__ = [
    "FineGrainedDiscriminator",
    "DomainEncoding",
    "FADALoss",
    "UpsampledCrossEntropy",
    "FineGrainedAdversary",
    "ClassCenterDistance",
    "CCDResult",
    "ClassCenterStats",
    "functional",
]
