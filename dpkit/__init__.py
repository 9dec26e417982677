"""dpkit: Diffusion Policy for PushT — train in PyTorch, export to ONNX, sample in C++.

    dpkit-train --config tiny --out runs/tiny          # train on the real PushT demonstrations
    dpkit-export runs/tiny --out bundles/tiny           # checkpoint -> verified ONNX bundle
    dpkit-eval --bundle bundles/tiny --backend cpp      # score in gym-pusht (original protocol)
    dpkit-bench --quick                                  # latency of every backend

Stages are subpackages: `dpkit.train`, `dpkit.export`, `dpkit.runtime`.
"""

__version__ = "0.1.0"

from dpkit.errors import DpkitError

__all__ = ["DpkitError", "__version__"]
