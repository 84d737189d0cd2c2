"""The dev model's engine (``triton_models/medium_sim/1/dev_engine.py``), imported by path:
it ships with the Triton model, not in the ``fleet`` package that apps import."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "triton_models" / "medium_sim" / "1" / "dev_engine.py"


def _load():  # noqa: ANN202
    found = sys.modules.get("dev_engine")
    if found is not None:
        return found
    spec = importlib.util.spec_from_file_location("dev_engine", PATH)
    assert spec is not None and spec.loader is not None  # noqa: S101
    module = importlib.util.module_from_spec(spec)
    sys.modules["dev_engine"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


engine = _load()
