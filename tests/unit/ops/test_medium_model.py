"""The medium model's Triton extension (``triton_models/medium/1/model.py``) against stand-ins of
the vLLM backend it extends.

The backend, vLLM and Triton's python-backend module run only in the GPU image, so this test
gives the extension small stand-ins with the same names and calls (the backend's model,
GenerateRequest and stat logger of release 25.12, vLLM's TokensPrompt, ``pb_utils``' tensors and
metric families) and checks the glue: token ids become the engine's prompt, the priority
reaches ``generate``, the scheduler's figures reach Triton's metrics. ``ops/gpu_check.py`` runs
the real thing on a GPU host.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

MODEL = Path(__file__).resolve().parents[3] / "triton_models" / "medium" / "1" / "model.py"

BACKEND = '''
class GenerateRequest:
    def __init__(self, request, executor_callback, output_dtype, logger):
        self.triton_request, self.executor_callback = request, executor_callback

    def _get_input_tensors(self):
        return "the text", True, False, "{}", {}

    def execute(self):
        prompt, *_ = self._get_input_tensors()
        return self.executor_callback(prompt, "sampling", "request-id", lora_request=None)


class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, config):
        return config
'''
METRICS = '''
class VllmStatLogger:
    def __init__(self, labels, log_logger, vllm_config, engine_index):
        self.recorded = []

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        self.recorded.append(iteration_stats)

    def log_engine_initialized(self):
        self.recorded.append("initialized")


class VllmStatLoggerFactory:
    def __init__(self, labels, log_logger):
        self._labels, self._log_logger, self._instances_list = labels, log_logger, []
'''


class _Tensor:
    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def as_numpy(self) -> np.ndarray:
        return self.value


class _Metric:
    def __init__(self, name: str) -> None:
        self.name, self.value = name, 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        self.value += value


class _Family:
    GAUGE, COUNTER = "gauge", "counter"
    made: dict[str, _Metric] = {}
    labels: dict[str, dict] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict) -> _Metric:  # noqa: N802 - pb_utils' name
        _Family.labels[self.name] = labels
        return _Family.made.setdefault(self.name, _Metric(self.name))


class _Config:
    def __init__(self) -> None:
        self.inputs = [{"name": "text_input"}]

    def as_dict(self) -> dict:
        return {"input": list(self.inputs)}

    def add_input(self, spec: dict) -> None:
        self.inputs.append(spec)


@pytest.fixture
def medium(tmp_path, monkeypatch):
    backend = tmp_path / "vllm"
    (backend / "utils").mkdir(parents=True)
    (backend / "model.py").write_text(textwrap.dedent(BACKEND))
    (backend / "utils" / "__init__.py").write_text("")
    (backend / "utils" / "metrics.py").write_text(textwrap.dedent(METRICS))
    inputs: dict[str, np.ndarray] = {}
    pb = types.SimpleNamespace(
        get_input_tensor_by_name=lambda request, name: _Tensor(inputs[name]) if name in inputs else None,
        MetricFamily=_Family, TritonModelException=RuntimeError)
    vllm = types.ModuleType("vllm")
    data = types.ModuleType("vllm.inputs.data")
    data.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    for name, module in {"triton_python_backend_utils": pb, "vllm": vllm, "vllm.inputs": types.ModuleType("x"),
                         "vllm.inputs.data": data}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "utils", raising=False)
    monkeypatch.delitem(sys.modules, "utils.metrics", raising=False)
    monkeypatch.setenv("FLEET_VLLM_BACKEND_DIR", str(backend))
    monkeypatch.syspath_prepend(str(backend))
    spec = importlib.util.spec_from_file_location("medium_model_under_test", MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, inputs


def test_token_ids_become_the_engines_prompt_and_the_priority_reaches_generate(medium):
    module, inputs = medium
    calls = []
    inputs.update(prompt_token_ids=np.array([1, 17, 3], dtype=np.int32), priority=np.array([2], dtype=np.int32))
    request = module._backend.GenerateRequest("req", lambda *a, **kw: calls.append((a, kw)), None, None)
    assert isinstance(request, module.FleetGenerateRequest)  # what the backend builds, by its own name
    request.execute()
    (prompt, *_), kwargs = calls[0]
    assert prompt == {"prompt_token_ids": [1, 17, 3]} and kwargs == {"lora_request": None, "priority": 2}
    inputs.clear()  # neither given: the backend's text prompt, no priority
    module._backend.GenerateRequest("req", lambda *a, **kw: calls.append((a, kw)), None, None).execute()
    assert calls[1] == (("the text", "sampling", "request-id"), {"lora_request": None})


def test_the_scheduler_figures_reach_tritons_metrics(medium):
    module, _ = medium
    factory = module.FleetStatLoggerFactory({"model": "medium", "version": "1"}, None)
    logger = factory(vllm_config=None, engine_index=0)
    stats = types.SimpleNamespace(num_running_reqs=5, num_waiting_reqs=2, kv_cache_usage=0.4,
                                  prefix_cache_stats=types.SimpleNamespace(queries=96, hits=64))
    logger.record(stats, types.SimpleNamespace(num_preempted_reqs=1))
    logger.record(stats, types.SimpleNamespace(num_preempted_reqs=0))
    got = {name: m.value for name, m in _Family.made.items()}
    assert got["vllm:num_requests_running"] == 5 and got["vllm:num_requests_waiting"] == 2
    assert got["vllm:kv_cache_usage_perc"] == 0.4 and got["vllm:num_preemptions_total"] == 1
    assert got["vllm:prefix_cache_queries_total"] == 192 and got["vllm:prefix_cache_hits_total"] == 128
    assert len(logger.recorded) == 2 and factory._instances_list == [logger]  # the backend's own logging too


def test_the_kv_cache_size_is_exported_once_the_engine_knows_it(medium):
    module, _ = medium
    config = types.SimpleNamespace(cache_config=types.SimpleNamespace(
        block_size=16, num_gpu_blocks=9120, enable_prefix_caching=True))
    logger = module.FleetStatLoggerFactory({"model": "medium", "version": "1"}, None)(config, 0)
    logger.log_engine_initialized()
    assert _Family.made["vllm:cache_config_info"].value == 1 and logger.recorded == ["initialized"]
    assert _Family.labels["vllm:cache_config_info"] == {
        "model": "medium", "version": "1", "block_size": "16", "num_gpu_blocks": "9120", "enable_prefix_caching": "True"}


def test_the_extra_inputs_are_declared(medium):
    module, _ = medium
    config = module.TritonPythonModel.auto_complete_config(_Config())
    assert [i["name"] for i in config.inputs] == ["text_input", "prompt_token_ids", "priority"]
