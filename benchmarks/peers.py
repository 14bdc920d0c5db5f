"""Peers to compare against, when available: pytorch-metric-learning, and the 0.1.6 release of this package.

0.1.6's import name is ``metric_learning_layers``, which our compatibility package owns. It is therefore fetched
into a folder of its own (``python -m benchmarks.fetch_legacy``) and imported from there under another name,
``mll_0_1_6``, without ever shadowing ours.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

LEGACY_DIR = Path(__file__).resolve().parent / "_peers" / "metric_learning_layers_0_1_6"
LEGACY_NAME = "mll_0_1_6"
_OURS = "metric_learning_layers"


def load_legacy(folder: Path = LEGACY_DIR) -> ModuleType | None:
    """Import 0.1.6 from ``folder`` as ``mll_0_1_6`` (its layers in ``mll_0_1_6.mml``), or None if not fetched."""
    if LEGACY_NAME in sys.modules:
        return sys.modules[LEGACY_NAME]
    if not (folder / _OURS / "mml.py").exists():
        return None
    ours = {k: v for k, v in sys.modules.items() if k == _OURS or k.startswith(_OURS + ".")}
    for key in ours:
        del sys.modules[key]
    sys.path.insert(0, str(folder))
    legacy: dict[str, ModuleType] = {}
    try:
        module = importlib.import_module(_OURS)
        importlib.import_module(_OURS + ".mml")
        legacy = {k: v for k, v in sys.modules.items() if k == _OURS or k.startswith(_OURS + ".")}
    finally:
        sys.path.remove(str(folder))
        for key in legacy:
            del sys.modules[key]
        sys.modules.update(ours)
    for key, value in legacy.items():
        sys.modules[LEGACY_NAME + key[len(_OURS) :]] = value
    if not str(module.__file__).startswith(str(folder)):
        raise RuntimeError(f"expected 0.1.6 from {folder}, imported {module.__file__}")
    return module


def load_pml() -> ModuleType | None:
    """pytorch_metric_learning.losses, or None if not installed (``pip install -e ".[bench]"``)."""
    try:
        return importlib.import_module("pytorch_metric_learning.losses")
    except ImportError:
        return None


def pml_version() -> str | None:
    try:
        return importlib.import_module("pytorch_metric_learning").__version__
    except ImportError:
        return None
