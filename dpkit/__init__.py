"""dpkit: Diffusion Policy for PushT — train in PyTorch, export to ONNX, sample in C++.

    dpkit-train --config tiny --out runs/tiny          # train on the real PushT demonstrations
    dpkit-export runs/tiny --out bundles/tiny           # checkpoint -> verified ONNX bundle
    dpkit-eval --bundle bundles/tiny --backend cpp      # score in gym-pusht (original protocol)
    dpkit-bench --quick                                  # latency of every backend

Stages are subpackages: `dpkit.train`, `dpkit.export`, `dpkit.runtime`.
"""

__version__ = "0.1.0"

from dpkit.errors import DpkitError
from dpkit.threads import prepare_openmp

# OpenMP reads its wait policy once, when torch loads libgomp: set it (unless the user did) before any dpkit
# module can import torch. Spinning OpenMP threads collapse on a shared CPU (dpkit.threads says how much).
prepare_openmp()

__all__ = ["DpkitError", "__version__"]
