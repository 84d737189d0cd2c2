"""The medium model's path on a real engine, on a machine with a GPU: what the fleet relies on,
checked one by one, with dummy weights (no model hub).

Run it inside the pinned Triton image (``triton_models/medium/image.toml``), with this
repository mounted and its Python dependencies installed (``pip install -e .``)::

    docker run --gpus all --rm -v $PWD:/fleet -w /fleet \\
        nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3 \\
        sh -c 'pip install -q -e . && python ops/gpu_check.py'

It builds a model repository from ``triton_models/medium`` (its config, its ``model.py``) whose
engine loads random weights of Mistral Small 3.2's shape (``load_format: dummy``, a
``params.json`` of the 24B text model) and the tokenizer stand-in of the tests (Mistral's Tekken
vocabulary as a v11 tokenizer), starts ``tritonserver`` on it, and then, through the fleet's own
client and prompt format:

1. sends a chat-formatted prompt with tools as token ids, and checks the engine counted exactly
   those ids (``num_input_tokens``): the ids, not the text, were the prompt;
2. fills the engine, queues batch requests behind it, then an interactive one, and checks the
   interactive one started first (request priority reaches the engine's scheduler);
3. cancels a streaming request mid-way and checks the engine stopped it (it frees its slot);
4. sends the same prompt twice and reads every metric the inference pool reads from the
   engine: running and waiting requests, KV-cache usage, prefix-cache queries and hits (hits
   after the repeat), TTFT and time-per-output-token histograms; and the pool's own reader.

It prints one line per check (ok or FAILED with what was seen) and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.inference.formats import MistralFormat  # noqa: E402
from fleet.inference.replicas import engine_metrics  # noqa: E402
from fleet.inference.triton import TritonClient  # noqa: E402
from fleet.run.messages import Prompt  # noqa: E402
from fleet.run.tools import tool_spec  # noqa: E402
from tests.support.tokenizer import v11_tekken  # noqa: E402

#: Mistral Small 3.2's text model (24B), in Mistral's params.json terms.
PARAMS = {"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 32768, "n_heads": 32, "n_kv_heads": 8,
          "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072, "max_position_embeddings": 8192}
#: What the pool reads on an engine's metrics port.
METRICS = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
           "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
           "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket"]
SEQS = 8

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, seen: object) -> None:
    results.append((name, bool(ok), str(seen)))
    print(f"{'ok    ' if ok else 'FAILED'} {name}: {seen}", flush=True)


def repository(work: Path) -> tuple[Path, Path]:
    weights = work / "weights"
    weights.mkdir(parents=True)
    (weights / "params.json").write_text(json.dumps(PARAMS))
    tekken = v11_tekken(weights)
    repo = work / "models"
    shutil.copytree(ROOT / "triton_models" / "medium", repo / "medium", ignore=shutil.ignore_patterns("image.toml"))
    engine = json.loads((repo / "medium" / "1" / "model.json").read_text())
    engine.update(model=str(weights), tokenizer=str(weights), load_format="dummy", max_model_len=4096,
                  max_num_seqs=SEQS, gpu_memory_utilization=0.85, enforce_eager=True)
    (repo / "medium" / "1" / "model.json").write_text(json.dumps(engine, indent=2))
    config = (repo / "medium" / "config.pbtxt").read_text()
    config = re.sub(r'(key: "max_num_seqs"\s*value: \{ string_value: ")\d+', rf"\g<1>{SEQS}", config)
    (repo / "medium" / "config.pbtxt").write_text(config)
    return repo, tekken


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and 'model="medium"' in line:
            name = line.split("{", 1)[0]
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tritonserver", default="tritonserver")
    ap.add_argument("--load-timeout", type=float, default=900.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-gpu-check-"))
    repo, tekken = repository(work)
    log = open(work / "triton.log", "w")
    server = subprocess.Popen([args.tritonserver, f"--model-repository={repo}", "--model-control-mode=none",
                               "--http-port=18000", "--grpc-port=18001", "--metrics-port=18002"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        return run(TritonClient("127.0.0.1:18001"), MistralFormat(tekken), "http://127.0.0.1:18002/metrics",
                   server, args.load_timeout, work)
    finally:
        server.terminate()
        server.wait(60)


def run(client: TritonClient, form: MistralFormat, metrics_url: str, server: subprocess.Popen,
        load_timeout: float, work: Path) -> int:
    deadline = time.monotonic() + load_timeout
    while not client.model_ready("medium"):
        if server.poll() is not None or time.monotonic() > deadline:
            print((work / "triton.log").read_text()[-4000:])
            check("the engine loads the medium model with dummy weights", False, "not ready")
            return 1
        time.sleep(5)  # loading takes minutes; nothing announces it
    check("the engine loads the medium model with dummy weights", True, "ready")
    declared = client._model_inputs("medium")
    check("the model declares prompt_token_ids and priority", {"prompt_token_ids", "priority"} <= declared,
          sorted(declared))

    prompt = Prompt(system="You solve questions step by step.", user="Question: What is 12 * 7 + 3?",
                    tools=(tool_spec("calculator"), tool_spec("word_count")))
    rendered = form.render(prompt)
    sampling = {"max_tokens": 16, "ignore_eos": True, **form.sampling(prompt)}
    gen = client.generate(rendered.text, sampling, model="medium", priority=1, timeout_s=120,
                          token_ids=rendered.token_ids)
    check("the engine's prompt is the token ids the fleet rendered", gen.tokens_in == len(rendered.token_ids),
          f"{gen.tokens_in} tokens counted, {len(rendered.token_ids)} sent")

    # Priority: fill the engine, queue batch behind it, then one interactive request.
    started: dict[str, float] = {}

    def call(tag: str, level: int, tokens: int) -> None:
        first = threading.Event()

        def on_token(_: str) -> None:
            if not first.is_set():
                first.set()
                started[tag] = time.monotonic()

        client.generate(rendered.text, {"max_tokens": tokens, "ignore_eos": True}, model="medium", priority=level,
                        timeout_s=300, token_ids=rendered.token_ids, on_token=on_token)

    threads = [threading.Thread(target=call, args=(f"running-{i}", 2, 400)) for i in range(SEQS)]
    for t in threads:
        t.start()
    time.sleep(2)  # the batch requests reach the engine's batch
    waiting = [threading.Thread(target=call, args=(f"waiting-{i}", 2, 8)) for i in range(4)]
    for t in waiting:
        t.start()
    time.sleep(1)
    interactive = threading.Thread(target=call, args=("interactive", 1, 8))
    interactive.start()
    for t in [*threads, *waiting, interactive]:
        t.join()
    queued = [started[f"waiting-{i}"] for i in range(4)]
    check("a waiting interactive request starts before waiting batch ones (priority)",
          started["interactive"] < min(queued), f"interactive started {min(queued) - started['interactive']:+.3f}s "
          "before the first waiting batch request")

    # Cancellation mid-stream frees the engine's sequence.
    before = metrics(metrics_url).get("vllm:num_requests_running", 0)
    seen: list[str] = []
    stop = threading.Event()
    try:
        client.generate(rendered.text, {"max_tokens": 2000, "ignore_eos": True}, model="medium", priority=1,
                        timeout_s=120, token_ids=rendered.token_ids, on_token=seen.append,
                        cancelled=lambda: len(seen) >= 20 or stop.is_set())
        cancelled = False
    except Exception as exc:  # noqa: BLE001 - RunCancelled is what is expected
        cancelled = type(exc).__name__ == "RunCancelled"
    time.sleep(1)  # the engine aborts at its next step
    after = metrics(metrics_url).get("vllm:num_requests_running", 0)
    check("a cancelled call stops in the engine", cancelled and len(seen) < 2000 and after <= before,
          f"{len(seen)} tokens, running {before:g} -> {after:g}")

    # Metrics: a repeated prompt hits the prefix cache; every name the pool reads is there.
    for _ in range(2):
        client.generate(rendered.text, {"max_tokens": 4}, model="medium", priority=1, timeout_s=60,
                        token_ids=rendered.token_ids)
    found = metrics(metrics_url)
    for name in METRICS:
        check(f"metric {name}", name in found, found.get(name, "absent"))
    check("the repeated prompt hit the prefix cache", found.get("vllm:prefix_cache_hits_total", 0) > 0,
          f"{found.get('vllm:prefix_cache_hits_total', 0):g} of {found.get('vllm:prefix_cache_queries_total', 0):g} "
          "tokens")
    engine = engine_metrics(metrics_url, "medium")
    check("the pool's reader finds the engine's state", engine is not None, engine)
    check("the router finds the KV cache's size (vllm:cache_config_info)",
          engine is not None and bool(engine.kv_blocks) and engine.block_size == 16, engine)
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
