"""The GPU check's model repository (the check itself runs on a GPU host: ops/gpu_check.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_gpu_check_builds_the_medium_model_with_dummy_weights(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "ops" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    repo, tekken = module.repository(tmp_path)
    engine = json.loads((repo / "medium" / "1" / "model.json").read_text())
    assert engine["load_format"] == "dummy" and Path(engine["model"]) == tekken.parent
    assert json.loads((tekken.parent / "params.json").read_text())["vocab_size"] == 131072
    assert engine["max_num_seqs"] == module.SEQS and f'string_value: "{module.SEQS}"' in \
        (repo / "medium" / "config.pbtxt").read_text()
    assert (repo / "medium" / "1" / "model.py").read_text() == (ROOT / "triton_models/medium/1/model.py").read_text()
    assert engine["tokenizer_mode"] == "mistral" and engine["scheduling_policy"] == "priority"
