"""Triton attention kernels (installed as dalle_ar.kernels).

Imported by the bare name `kernels` (the repository root on sys.path: `python -c` or `python -m`
run there, or a multiprocessing forkserver started there), this folder would stand in for the
`kernels` package that transformers and diffusers import; where that package is installed it
loads it in its place instead (where it is not, transformers does not use the name)."""

import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    _other = _spec is not None and _spec.loader is not None and _spec.origin is not None
    if _other and not os.path.samefile(_spec.origin, __file__):  # never this file again
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import system returns what sys.modules holds
        _spec.loader.exec_module(_module)
