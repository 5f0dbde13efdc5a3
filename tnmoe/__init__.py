"""tnmoe: tensor-network (MPO) layers and mixture-of-experts whose experts share factor tensors."""

from . import networks
from .networks import MPO, MPOLinear, TensorTrain, factorize
from .runtime import retain_freed_cpu_memory

__version__ = "0.1.0"
__all__ = ["networks", "MPO", "MPOLinear", "TensorTrain", "factorize", "retain_freed_cpu_memory", "__version__"]
