"""The fleet's one settings object, built from ``FLEET_*`` environment variables.

Build it once (``Settings()``) at the edge of a process and pass it in; nothing deeper
in the code reads ``os.environ``. Every name carries its unit.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fleet.keys import Keys
from fleet.tenants import DEFAULT_TENANT, TENANT_PATTERN, Tenants, TenantSpec, parse_tenants, read_tenants_file

PriorityClass = Literal["interactive", "batch"]
PRIORITY_CLASSES: tuple[PriorityClass, ...] = ("interactive", "batch")
BatchPolicy = Literal["preempt", "reserve", "static"]
Routing = Literal["cache", "session", "most_room", "round_robin"]


class ReplicaSpec(BaseModel):
    """One Triton replica of the inference pool (a GPU host serving the model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$",
                      description="Label in Redis keys, metrics and status; the gRPC address when empty.")
    grpc_url: str = Field(min_length=3, description="host:port of the replica's gRPC endpoint.")
    metrics_url: str = Field("", description="Its Prometheus metrics URL; http://host:8002/metrics when empty.")
    max_sequences: int | None = Field(
        None, gt=0, description="Most sequences it runs at once; read from the model when unset.")

    @model_validator(mode="after")
    def _defaults(self) -> "ReplicaSpec":
        host = self.grpc_url.rsplit(":", 1)[0]
        if not self.name:
            object.__setattr__(self, "name", self.grpc_url)
        if not self.metrics_url:
            object.__setattr__(self, "metrics_url", f"http://{host}:8002/metrics")
        return self


PromptFormatName = Literal["text", "mistral"]


class ModelSpec(BaseModel):
    """A model the inference pool serves, as the fleet must know it to talk to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, description="The Triton model's name.")
    prompt_format: PromptFormatName = Field(
        "text", description="How the model takes a prompt: 'mistral' (Mistral's chat format, as token ids) or "
        "'text' (the dev model's plain-text layout).")
    tokenizer: Path | None = Field(
        None, description="The model's tokenizer file (tekken.json for the mistral format): prompts are rendered "
        "and counted with it.")
    replicas: list[ReplicaSpec] | None = Field(
        None, description="The Triton replicas serving it; unset: the fleet's (FLEET_TRITON_REPLICAS).")
    price_per_1k_input_tokens: float | None = Field(None, ge=0, description="Its prices; unset: the fleet's.")
    price_per_1k_output_tokens: float | None = Field(None, ge=0)
    price_per_gpu_s: float | None = Field(None, ge=0)

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"grpc_url": v} if isinstance(v, str) else v for v in value]
        return value


class Settings(BaseSettings):
    """Configuration of one fleet deployment (clients, workers and the local stack)."""

    # .fleet/stack.env is written by `fleet up`: CLI commands run beside a local stack find it.
    # Real environment variables take precedence over it.
    model_config = SettingsConfigDict(
        env_prefix="FLEET_", env_file=".fleet/stack.env", extra="ignore", frozen=True
    )

    # --- Redis: broker, run records, events, dead letters -----------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for the broker, run records, events and dead letters (unused with FLEET_REDIS_SENTINELS).",
    )
    redis_socket_timeout_s: float = Field(
        10.0,
        gt=1,
        description="Read timeout of the fleet's Redis connections (blocking reads wait at most 1 s), "
        "so a connection to a Redis that went away fails instead of hanging.",
    )
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Redis Sentinels watching the fleet's Redis (comma-separated or JSON list of host:port); "
        "when set, every client asks them for the primary and follows it through a failover, and "
        "FLEET_REDIS_URL is not used.",
    )
    redis_master_name: str = Field(
        "fleet", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
        description="The name the Sentinels know the fleet's Redis by (their `sentinel monitor` line).",
    )
    redis_password: SecretStr | None = Field(
        None, description="Password of the Redis servers behind the Sentinels (`requirepass`); a plain "
        "FLEET_REDIS_URL carries its own.", repr=False,
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the Sentinels themselves (their `requirepass`).", repr=False,
    )
    redis_db: int = Field(0, ge=0, description="Database number on the Redis servers behind the Sentinels.")
    redis_tls: bool = Field(
        False, description="Speak TLS to the Redis servers and the Sentinels (a plain URL says so with rediss://).",
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA certificate that signed the Redis servers' and Sentinels' certificates "
        "(with FLEET_REDIS_TLS; unset: the system's CAs).",
    )
    redis_wait_replicas: int | None = Field(
        None, ge=0,
        description="Replicas that must have a write before the fleet acts on it (a step's commit, an "
        "admission, a dead letter, a backlog dispatch: Redis WAIT); unset: 1 with Sentinels, 0 without.",
    )
    redis_wait_timeout_ms: int = Field(
        500, gt=0, description="How long such a write waits for its replicas before going on without them "
        "(logged: it would not survive a failover that comes before they catch up).",
    )
    redis_reconnect_wait_s: float = Field(
        10.0, ge=0,
        description="How long a Redis command keeps reconnecting (through the Sentinels, to a promoted "
        "replica) before it fails; covers a failover.",
    )
    key_prefix: str = Field("fleet", description="Prefix of every Redis key the fleet writes.")
    queue_prefix: str = Field(
        "", description="Prefix of every queue name (lets several fleets share one Redis)."
    )

    # --- Triton -----------------------------------------------------------------------
    triton_grpc_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint (host:port).")
    triton_http_url: str = Field("127.0.0.1:8000", description="Triton HTTP endpoint (host:port).")
    triton_metrics_url: str = Field(
        "http://127.0.0.1:8002/metrics", description="Triton's Prometheus metrics URL."
    )
    triton_replicas: Annotated[list[ReplicaSpec], NoDecode] = Field(
        default_factory=list,
        description="Triton replicas of the inference pool (JSON list of host:port strings or "
        "{name, grpc_url, metrics_url, max_sequences} objects); unset: the one at FLEET_TRITON_GRPC_URL.",
    )
    triton_model: str = Field("medium_sim", description="Model that llm steps call by default.")
    models: Annotated[list[ModelSpec], NoDecode] = Field(
        default_factory=list,
        description="The served models' prompt formats and tokenizers (JSON list of {name, prompt_format, "
        "tokenizer}); a model not listed takes plain text (the dev model's layout).",
    )
    model_roles: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Roles a step may name instead of a model (JSON object role -> model, e.g. "
        '{"small": "small_sim"}); the role "default" is FLEET_TRITON_MODEL unless given.',
    )
    triton_connect_wait_s: float = Field(
        5.0, ge=0, description="How long a model call waits for an unreachable Triton before failing."
    )
    triton_priority_interactive: int = Field(
        1, description="Triton request priority for interactive runs (1 is the highest level)."
    )
    triton_priority_batch: int = Field(2, description="Triton request priority for batch runs.")

    # --- Deadlines and time limits ----------------------------------------------------
    interactive_deadline_s: float = Field(
        30.0, gt=0, description="Default deadline of an interactive run, from submission."
    )
    batch_deadline_s: float = Field(
        86400.0, gt=0, description="Default deadline of a batch run, from submission."
    )
    step_time_limit_s: float = Field(
        300.0, gt=0, description="Hard time limit of one step attempt; the worker kills it."
    )
    visibility_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Redis redelivers an unacknowledged step after this; must exceed the step time limit.",
    )

    stall_after_s: float = Field(
        1800.0,
        gt=0,
        description="A run with no progress and no message in flight for this long is sent again.",
    )
    reconcile_interval_s: float = Field(30.0, gt=0, description="How often workers look for such runs.")
    recount_interval_s: float = Field(
        60.0, gt=0,
        description="How often the reconciler recounts the tenants' places and the ledger of admitted runs from "
        "the run records (at once, too, after a failover); the count holds Redis about 10 ms per 1,000 "
        "unfinished runs.",
    )

    # --- Retries ----------------------------------------------------------------------
    retry_max_attempts: int = Field(5, ge=1, description="Attempts of a step on transient errors.")
    retry_backoff_base_s: float = Field(0.5, ge=0, description="First retry backoff (full jitter).")
    retry_backoff_max_s: float = Field(30.0, ge=0, description="Largest retry backoff.")

    # --- Records ----------------------------------------------------------------------
    result_ttl_s: int = Field(86400, gt=0, description="How long a finished run's record is kept.")
    run_ttl_s: int = Field(
        7 * 86400, gt=0, description="Upper bound on how long an unfinished run's record lives."
    )
    session_ttl_s: int = Field(86400, gt=0, description="How long a session outlives its last turn.")
    session_max_turns: int = Field(50, gt=0, description="Turns of a session kept (oldest dropped).")
    dead_letter_maxlen: int = Field(
        100_000, gt=0, description="Dead-letter stream length cap (oldest entries trimmed)."
    )
    max_input_bytes: int = Field(65536, gt=0, description="Largest accepted run input (JSON bytes).")

    # --- Workers ----------------------------------------------------------------------
    inference_concurrency: int = Field(
        16, ge=1, description="Threads per inference worker: requests it may keep in flight at the pool (or waiting for a slot)."
    )
    inference_interactive_concurrency: int = Field(
        8, ge=1, description="Threads of the inference worker that takes interactive work only."
    )
    inference_borrow: bool = Field(
        False,
        description="The interactive-only inference worker also takes batch steps while its threads are idle, "
        "and gives a thread back as soon as an interactive step waits in its queue: the batch call is cancelled "
        "at Triton and its step goes back to the head of the batch queue, with no attempt spent.",
    )
    tool_concurrency: int = Field(4, ge=1, description="Processes per tool worker.")

    # --- Scheduling and admission ------------------------------------------------------
    batch_policy: BatchPolicy = Field(
        "preempt",
        description="How batch requests share each replica with interactive ones: 'preempt' (batch uses "
        "every slot; an interactive request that finds none takes the youngest batch request's), "
        "'reserve' (slots kept free for interactive demand) or 'static' (FLEET_BATCH_INFLIGHT_MAX).",
    )
    batch_inflight_max: int = Field(
        8, ge=1, description="With FLEET_BATCH_POLICY=static: batch requests in flight per replica.",
    )
    model_max_sequences: int | None = Field(
        None,
        gt=0,
        description="Most sequences a replica runs at once (vLLM max_num_seqs) when neither its entry "
        "in FLEET_TRITON_REPLICAS nor the model's max_num_seqs parameter says.",
    )
    pipeline_max: int = Field(
        16, ge=0,
        description="With 'preempt': most requests sent to a replica beyond its sequence capacity, so "
        "that the engine stays full while requests travel to it; the depth in use is learned from the "
        "engine's running and waiting sequences (0: never beyond capacity).",
    )
    preempt_victims: int = Field(
        3, ge=1, description="With 'preempt': most batch requests an interactive request preempts: the "
        "youngest of those sent beyond the replica's capacity, so that at most the pipeline depth minus "
        "this many stay ahead of it (at least one when the replica has no room).",
    )
    interactive_reserve_min: int = Field(
        2, ge=0, description="With 'reserve': slots per replica always kept for interactive requests; "
        "the reserve grows to the most interactive requests seen in flight in the demand window.",
    )
    interactive_demand_window_s: float = Field(
        30.0, gt=0, description="With 'reserve': how far back the interactive peak that sizes the reserve looks."
    )
    routing: Routing = Field(
        "cache",
        description="Which replica with room a model call goes to: 'cache' (the one expected to hold the "
        "longest prefix of its prompt in its KV cache, against its load), 'session' (the session's or run's "
        "own replica, by rendezvous hashing), both within FLEET_ROUTING_LOAD_BOUND; 'most_room' or "
        "'round_robin' (no regard for caches).",
    )
    routing_load_bound: float = Field(
        1.25, ge=1.0,
        description="With 'cache' and 'session': a replica takes a call only while its requests in flight "
        "stay within this factor of the pool's mean (by capacity); the next best takes it otherwise.",
    )
    routing_cache_weight: float = Field(
        1.0, gt=0,
        description="With 'cache': what a whole prompt found in a replica's cache is worth against a "
        "replica's load (1: as much as the replica's whole capacity of requests in flight).",
    )
    routing_patience_s: float = Field(
        1.0, ge=0,
        description="With 'cache': how long a batch call may wait for the full replica that holds its prompt's "
        "prefix (while other batch calls wait to take the slot it leaves elsewhere) before it takes any.",
    )
    prefix_index_blocks: int = Field(
        8192, ge=16,
        description="Blocks of prompts the router remembers per replica when the engine does not report its "
        "KV cache size (vllm:cache_config_info); the oldest are forgotten first, as the engine evicts.",
    )
    objective_ttft_p99_s: float | None = Field(
        None, gt=0,
        description="Interactive latency objective: time to first token, p99, in seconds. Set (with or "
        "without FLEET_OBJECTIVE_TPOT_P99_S), the pool monitor learns per replica how the engine's "
        "latencies grow with its running sequences and holds batch to the occupancy that keeps the "
        "predicted interactive p99 within FLEET_OBJECTIVE_MARGIN of it; unset, batch occupancy is the "
        "batch policy's alone.",
    )
    objective_tpot_p99_s: float | None = Field(
        None, gt=0,
        description="Interactive latency objective: time per output token (between two tokens), p99, in "
        "seconds; see FLEET_OBJECTIVE_TTFT_P99_S.",
    )
    objective_margin: float = Field(
        0.9, gt=0, le=1,
        description="With an objective: the fraction of it that the predicted interactive p99 is held within.",
    )
    objective_halflife_s: float = Field(
        30.0, gt=0,
        description="With an objective: how fast the occupancy learner forgets what it saw of an engine (an "
        "observation counts half after this long), so it follows an engine whose behaviour changes.",
    )
    replica_probe_interval_s: float = Field(
        0.5, gt=0, description="How often a replica that is down is probed to rejoin the pool.",
    )
    engine_poll_interval_s: float = Field(
        0.1, gt=0, description="How often each replica's engine state (running, waiting) is read from its metrics.",
    )
    admission_batch_max_queued: int = Field(
        2_000_000, gt=0,
        description="Batch submissions are refused while this much batch work is queued (runs in the backlog "
        "and steps in the batch queue together).",
    )
    batch_dispatch_window: int | None = Field(
        None, gt=0,
        description="Batch runs dispatched from the backlog and unfinished at once; unset: twice the threads "
        "of the live workers that take batch model steps (each keeps a run in hand and one ready).",
    )
    batch_dispatch_interval_s: float = Field(
        0.05, gt=0, description="How often the dispatcher looks for room in the window when it found none.",
    )
    scheduling: Literal["fleet", "vanilla"] = Field(
        "fleet",
        description="'vanilla' turns the fleet's scheduling off (Celery defaults), for benchmarks only.",
    )

    # --- Cost, usage and tracing ------------------------------------------------------
    price_per_1k_input_tokens: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="Estimated cost of 1,000 prompt tokens, in the currency usage reports are read in.",
    )
    price_per_1k_output_tokens: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Estimated cost of 1,000 generated tokens."
    )
    price_per_gpu_s: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="Estimated cost of one second at the model (a model call's duration).",
    )
    usage_retention_s: int = Field(
        8 * 86400, gt=0, description="How long per-minute usage totals (fleet usage) are kept."
    )
    tracing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="OpenTelemetry tracing: 'auto' traces when OTEL_EXPORTER_OTLP_ENDPOINT (or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, 'on' also without (the SDK's default endpoint), "
        "'off' never.",
    )
    trace_url_template: str | None = Field(
        None, pattern=r"\{trace_id\}",
        description="Link of a trace in a trace viewer, with {trace_id} in it (e.g. "
        "http://jaeger:16686/trace/{trace_id}); the run console links each traced run's trace there.",
    )

    # --- Agents, observability, local stack -------------------------------------------
    agents_dir: Path | None = Field(
        None, description="Extra directory of agent definitions (*.toml) beside the built-ins."
    )
    tool_modules: list[str] = Field(
        default_factory=list,
        description="Python modules that register extra tools on import (JSON list).",
    )
    sentry_dsn: SecretStr | None = Field(None, description="Sentry DSN; errors are reported when set.")
    sentry_include_data: bool = Field(
        False, description="Send frame locals and request bodies (prompts, inputs) with Sentry events.")
    log_level: str = Field("INFO", description="Log level of fleet processes.")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json' writes one JSON object per log line (run_id, agent, step fields)."
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of a worker's Prometheus endpoint (/metrics); unset, no endpoint.",
    )
    flower_port: int = Field(5555, description="Port of Flower in the local stack.")
    flower_basic_auth: SecretStr | None = Field(
        None, description="user:password for Flower; required when Flower listens beyond loopback."
    )
    api_keys: str = Field(
        "",
        description="Comma-separated API keys of the HTTP gateway; without keys it serves loopback only.",
        repr=False,
    )
    admin_keys: str = Field(
        "", description="Comma-separated API keys of operators: they see and act on every tenant's runs.",
        repr=False,
    )
    tenants: Annotated[list[TenantSpec], NoDecode] = Field(
        default_factory=list,
        description="Tenants as a JSON list of {name, weight, keys, quotas} (see README, Tenants); the "
        "default tenant, which FLEET_API_KEYS belong to, always exists.",
        repr=False,
    )
    tenants_file: Path | None = Field(
        None, description="A mounted JSON or TOML file of tenants (beside FLEET_TENANTS).")
    tenant: str = Field(
        DEFAULT_TENANT, pattern=TENANT_PATTERN,
        description="The tenant the Python client and the CLI act as.",
    )
    gateway_port: int = Field(8080, description="Port of the HTTP gateway.")
    gateway_max_body_bytes: int = Field(
        1_048_576, gt=0, description="Largest request body the gateway accepts."
    )
    bind_address: str = Field(
        "127.0.0.1", description="Address the local stack's servers listen on."
    )
    data_dir: Path = Field(Path(".fleet"), description="Local stack state: Redis AOF, logs.")

    @model_validator(mode="after")
    def _visibility_exceeds_time_limit(self) -> "Settings":
        # A step still running when its visibility timeout passes is handed out a second time.
        if self.visibility_timeout_s <= self.step_time_limit_s:
            raise ValueError(
                "FLEET_VISIBILITY_TIMEOUT_S must exceed FLEET_STEP_TIME_LIMIT_S "
                f"({self.visibility_timeout_s} <= {self.step_time_limit_s}): a long step would run twice"
            )
        names = [r.name for r in self.replicas()]
        if len(set(names)) != len(names):
            raise ValueError(f"FLEET_TRITON_REPLICAS: replica names must differ, got {names}")
        if self.stall_after_s <= self.visibility_timeout_s:
            # An unacked message comes back after the visibility timeout: only later is a
            # run without one really stalled.
            raise ValueError(
                "FLEET_STALL_AFTER_S must exceed FLEET_VISIBILITY_TIMEOUT_S "
                f"({self.stall_after_s} <= {self.visibility_timeout_s})"
            )
        # Fail at load for a bad tenants file or a key given to two tenants.
        try:
            self.tenant_registry.get(self.tenant)
        except KeyError as exc:
            raise ValueError(f"FLEET_TENANT: {exc.args[0]}") from None
        return self

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON list of tenants: {exc}") from None
        return [s.model_dump() if isinstance(s, TenantSpec) else s for s in parse_tenants(value, "FLEET_TENANTS")]

    @field_validator("models", mode="before")
    @classmethod
    def _models_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON list of models: {exc}") from None
        return value

    @field_validator("model_roles", mode="before")
    @classmethod
    def _roles_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON object of roles: {exc}") from None
        return value

    def catalog(self) -> list[str]:
        """The models the inference pool serves: the default model, those in FLEET_MODELS and
        those the roles name."""
        names = [self.triton_model, *(m.name for m in self.models), *self.model_roles.values()]
        return list(dict.fromkeys(names))

    def resolve_model(self, ref: str | None) -> str:
        """The model a step's ``model`` names: a role's model, a model itself, or (None) the default."""
        if ref is None:
            return self.model_roles.get("default", self.triton_model)
        return self.model_roles.get(ref, ref)

    def for_model(self, name: str) -> "Settings":
        """These settings as the inference pool of model ``name`` sees them: the default model's
        are these; another model's pool keys live under a namespace of its own (so the slot and
        replica scripts serve it unchanged), on its replicas."""
        if name == self.triton_model:
            return self
        spec = self.model_spec(name)
        return self.model_copy(update={"key_prefix": f"{self.key_prefix}:model:{name}", "triton_model": name,
                                       "triton_replicas": list(spec.replicas or self.replicas())})

    def model_spec(self, name: str) -> ModelSpec:
        """What the fleet knows of the model ``name`` (a plain-text model when FLEET_MODELS does
        not list it)."""
        for spec in self.models:
            if spec.name == name:
                return spec
        return ModelSpec(name=name)

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: Any) -> Any:
        # A JSON list, or comma-separated "host:port" strings.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list: {exc}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, list):
            for item in value:
                host, _, port = str(item).rpartition(":")
                if not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"{item!r} is not host:port")
        return value

    @field_validator("triton_replicas", mode="before")
    @classmethod
    def _replica_shorthand(cls, value: Any) -> Any:
        # A JSON list, or comma-separated "host:port" strings; a string stands for {"grpc_url": it}.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list: {exc}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, list):
            return [{"grpc_url": v} if isinstance(v, str) else v for v in value]
        return value

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels as (host, port) pairs; empty when the fleet's Redis is a plain URL."""
        return [(item.rpartition(":")[0].strip("[]"), int(item.rpartition(":")[2])) for item in self.redis_sentinels]

    def wait_replicas(self) -> int:
        """Replicas a write that must survive a failover waits for (FLEET_REDIS_WAIT_REPLICAS)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels else 0

    def replicas(self) -> list[ReplicaSpec]:
        """The inference pool's replicas: FLEET_TRITON_REPLICAS, or the one Triton at FLEET_TRITON_GRPC_URL."""
        if self.triton_replicas:
            return list(self.triton_replicas)
        return [ReplicaSpec(name="triton", grpc_url=self.triton_grpc_url, metrics_url=self.triton_metrics_url)]

    def api_key_list(self) -> list[str]:
        """The default tenant's API keys (FLEET_API_KEYS)."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def admin_key_list(self) -> list[str]:
        """The operators' API keys."""
        return [k.strip() for k in self.admin_keys.split(",") if k.strip()]

    @property
    def tenant_registry(self) -> Tenants:
        """The fleet's tenants (FLEET_TENANTS and FLEET_TENANTS_FILE) and the keys that name them."""
        # Built once per configuration (a copy of these settings with other keys gets its own),
        # and again when the mounted file changes.
        stamp = None
        if self.tenants_file is not None:
            try:
                stamp = self.tenants_file.stat().st_mtime_ns
            except OSError:
                stamp = -1
        specs = json.dumps([t.model_dump(mode="json") | {"keys": [k.get_secret_value() for k in t.keys]}
                            for t in self.tenants])
        return _registry(specs, self.tenants_file, stamp, self.api_keys, self.admin_keys)

    def objectives(self) -> dict[str, float]:
        """The interactive latency objectives that are set: ``{"ttft": s, "tpot": s}``, either or none."""
        found = {"ttft": self.objective_ttft_p99_s, "tpot": self.objective_tpot_p99_s}
        return {k: v for k, v in found.items() if v is not None}

    def deadline_s(self, priority: PriorityClass) -> float:
        """Default deadline, in seconds from submission, of a run of this class."""
        return self.interactive_deadline_s if priority == "interactive" else self.batch_deadline_s

    def triton_priority(self, priority: PriorityClass) -> int:
        """Triton request priority level of a run of this class."""
        if priority == "interactive":
            return self.triton_priority_interactive
        return self.triton_priority_batch

    def key(self, *parts: str) -> str:
        """A Redis key under this fleet's prefix (for scanning the namespace; the fleet's own
        keys are named in :class:`fleet.keys.Keys`)."""
        return ":".join((self.key_prefix, *parts))

    @property
    def keys(self) -> Keys:
        """The Redis key names of this fleet's namespace."""
        return Keys(self.key_prefix)


@lru_cache(maxsize=64)
def _registry(specs: str, tenants_file: Path | None, _stamp: int | None, api_keys: str, admin_keys: str) -> Tenants:
    found = parse_tenants(json.loads(specs), "FLEET_TENANTS")
    if tenants_file is not None:
        found += read_tenants_file(tenants_file)
    split = lambda text: [k.strip() for k in text.split(",") if k.strip()]  # noqa: E731
    return Tenants(found, split(api_keys), split(admin_keys))
