"""The medium model on Triton's vLLM backend, with the three things the fleet needs that the
backend of the pinned image does not do (Triton 25.12, vLLM 0.11.1; see ../README.md):

- **prompts as token ids**: an optional ``prompt_token_ids`` input (INT32 ``[-1]``) goes to the
  engine as vLLM's ``TokensPrompt``. The backend takes text only, and the model's tokenizer
  mode (``mistral``) encodes text without control tokens, so a chat-formatted prompt must
  arrive as the ids ``mistral-common`` made (the fleet's ``MistralFormat``).
- **request priority**: an optional ``priority`` input (INT32 ``[1]``, lower first) is passed to
  the engine's ``generate(..., priority=)``; ``model.json`` sets ``scheduling_policy`` to
  ``priority``, so a waiting interactive request goes ahead of waiting batch ones (running ones
  are not displaced: the fleet preempts them itself).
- **the engine's scheduler and cache state** on Triton's metrics port, under vLLM's own names
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``,
  ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``,
  ``vllm:num_preemptions_total``, and ``vllm:cache_config_info`` whose labels give the KV cache's
  ``num_gpu_blocks`` and ``block_size``, as vLLM's own exporter does) beside the backend's own (TTFT and time-per-output-token
  histograms, token counters): the inference pool reads them.

Everything else is the backend's: this is a thin subclass of the model it ships
(``/opt/tritonserver/backends/vllm/model.py``), loaded by the python backend. No GPU runs here,
so the fleet's tests check this file's glue against stand-ins of the backend
(``tests/unit/ops/test_medium_model.py``) and ``ops/gpu_check.py`` runs it for real.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import triton_python_backend_utils as pb_utils

BACKEND_DIR = os.environ.get("FLEET_VLLM_BACKEND_DIR", "/opt/tritonserver/backends/vllm")
if BACKEND_DIR not in sys.path:
    sys.path.insert(0, BACKEND_DIR)  # the backend imports its own utils/ package


def _load_backend():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("vllm_backend_model", os.path.join(BACKEND_DIR, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_backend = _load_backend()
from utils.metrics import VllmStatLogger, VllmStatLoggerFactory  # noqa: E402  (the backend's)
from vllm.inputs.data import TokensPrompt  # noqa: E402

EXTRA_INPUTS = [
    {"name": "prompt_token_ids", "data_type": "TYPE_INT32", "dims": [-1], "optional": True},
    {"name": "priority", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
]


def _tensor(request, name: str):  # noqa: ANN001, ANN202
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


class FleetGenerateRequest(_backend.GenerateRequest):
    """The backend's generate request, taking token ids and a priority when they are given."""

    def __init__(self, request, executor_callback, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        priority = _tensor(request, "priority")
        if priority is not None and priority.size:
            executor_callback = functools.partial(executor_callback, priority=int(priority[0]))
        super().__init__(request, executor_callback, *args, **kwargs)

    def _get_input_tensors(self):  # noqa: ANN202
        prompt, *rest = super()._get_input_tensors()
        ids = _tensor(self.triton_request, "prompt_token_ids")
        if ids is not None and ids.size:
            prompt = TokensPrompt(prompt_token_ids=[int(i) for i in ids])
        return (prompt, *rest)


# The backend builds its requests by this name.
_backend.GenerateRequest = FleetGenerateRequest


class _SchedulerMetrics:
    """vLLM's scheduler and cache figures as Triton metrics (gauges and counters)."""

    def __init__(self, labels: dict) -> None:
        self._labels = labels
        self._families = []  # a family must outlive its metrics

        def family(name: str, description: str, kind: int):  # noqa: ANN202
            made = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(made)
            return made.Metric(labels=labels)

        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.running = family("vllm:num_requests_running", "Requests in model execution batches.", gauge)
        self.waiting = family("vllm:num_requests_waiting", "Requests waiting to be processed.", gauge)
        self.kv_usage = family("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent).", gauge)
        self.prefix_queries = family("vllm:prefix_cache_queries_total",
                                     "Prefix cache queries, in tokens.", counter)
        self.prefix_hits = family("vllm:prefix_cache_hits_total", "Prefix cache hits, in tokens.", counter)
        self.preemptions = family("vllm:num_preemptions_total", "Preemptions by the engine.", counter)

    def cache_config(self, vllm_config) -> None:  # noqa: ANN001
        """The KV cache's size and block size, known once the engine has profiled its memory."""
        cache = getattr(vllm_config, "cache_config", None)
        if cache is None:
            return
        made = pb_utils.MetricFamily(name="vllm:cache_config_info", description="Information of the KV cache "
                                     "configuration.", kind=pb_utils.MetricFamily.GAUGE)
        self._families.append(made)
        self.cache_info = made.Metric(labels={
            **self._labels, "block_size": str(cache.block_size), "num_gpu_blocks": str(cache.num_gpu_blocks),
            "enable_prefix_caching": str(cache.enable_prefix_caching)})
        self.cache_info.set(1)

    def record(self, scheduler_stats, iteration_stats) -> None:  # noqa: ANN001
        if scheduler_stats is not None:
            self.running.set(scheduler_stats.num_running_reqs)
            self.waiting.set(scheduler_stats.num_waiting_reqs)
            self.kv_usage.set(scheduler_stats.kv_cache_usage)
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            if prefix is not None:
                if prefix.queries:
                    self.prefix_queries.increment(prefix.queries)
                if prefix.hits:
                    self.prefix_hits.increment(prefix.hits)
        if iteration_stats is not None and getattr(iteration_stats, "num_preempted_reqs", 0):
            self.preemptions.increment(iteration_stats.num_preempted_reqs)


class FleetStatLogger(VllmStatLogger):
    """The backend's stat logger, with the scheduler's figures."""

    def __init__(self, labels: dict, log_logger, vllm_config, engine_index: int) -> None:  # noqa: ANN001
        super().__init__(labels, log_logger, vllm_config, engine_index)
        self.scheduler = _SchedulerMetrics(labels)
        self._vllm_config = vllm_config  # vLLM's base class does not keep it

    def log_engine_initialized(self) -> None:
        super().log_engine_initialized()
        self.scheduler.cache_config(self._vllm_config)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:  # noqa: ANN001
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
        self.scheduler.record(scheduler_stats, iteration_stats)


class FleetStatLoggerFactory(VllmStatLoggerFactory):
    """Makes :class:`FleetStatLogger` for each engine."""

    def __call__(self, vllm_config, engine_index):  # noqa: ANN001, ANN204
        logger = FleetStatLogger(self._labels, self._log_logger, vllm_config, engine_index)
        self._instances_list.append(logger)  # the backend finalizes them
        return logger


class TritonPythonModel(_backend.TritonPythonModel):
    """The backend's model, with the inputs and metrics above."""

    @classmethod
    def auto_complete_config(cls, auto_complete_model_config):  # noqa: ANN001, ANN206
        config = super().auto_complete_config(auto_complete_model_config)
        declared = {i["name"] for i in config.as_dict().get("input", [])}
        for spec in EXTRA_INPUTS:
            if spec["name"] not in declared:
                config.add_input(spec)
        return config

    def _setup_metrics(self) -> None:
        self._vllm_metrics = []
        if self._enable_metrics:
            try:
                labels = {"model": self.args["model_name"], "version": self.args["model_version"]}
                self._vllm_metrics.append(FleetStatLoggerFactory(labels, self.logger))
            except pb_utils.TritonModelException as exc:
                if "metrics not supported" not in str(exc):
                    raise
                self.logger.log_info("[fleet] Metrics not supported by this server")


__all__ = ["FleetGenerateRequest", "FleetStatLogger", "TritonPythonModel"]
