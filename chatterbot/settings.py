"""Settings for every ChatterBot process, read from `CHATTERBOT_*` environment variables and `.env`.

Every field here is listed with its default in `.env.example`; `tests/test_settings.py` keeps the two in step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SERVICES = ("chat", "context", "inference", "store")
# Processes that serve gRPC health on an address of their own (services, plus job workers).
GRPC_PROCESSES = (*SERVICES, "worker")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def sentinel_address(entry: str) -> tuple[str, int]:
    """`host:port` (or `[v6 address]:port`) of a Redis Sentinel; ValueError naming the entry when malformed."""
    host, sep, port = entry.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"CHATTERBOT_REDIS_SENTINELS: {entry!r} is not host:port (e.g. 10.0.0.5:26379)")
    return host, int(port)


def _redis_url_problem(url: str, sentinels: bool) -> str | None:
    scheme, _, rest = url.partition("://")
    schemes = ("redis", "rediss") if sentinels else ("redis", "rediss", "unix")
    if scheme not in schemes:
        return f"the scheme must be {' or '.join(f'{s}://' for s in schemes)}"
    database = rest.partition("?")[0].partition("/")[2] if scheme != "unix" else ""
    if database and not database.isdigit():
        return f"the database ({database!r} after the host) must be a number"
    return None


class Settings(BaseSettings):
    # A setting that fails validation is named, its value (a DSN or URL may hold a password) never shown.
    model_config = SettingsConfigDict(
        env_prefix="CHATTERBOT_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    # --- process ---
    data_dir: Path = Field(Path(".chatterbot"), description="where `chatterbot up` keeps data, logs and keys")
    up_mode: Literal["combined", "split"] = Field(
        "combined",
        description="how `chatterbot up` runs the services: combined (processes that each run every "
        "component, calling each other in process) or split (a process per service, as in compose)",
    )
    up_processes: int = Field(
        0,
        ge=0,
        description="combined mode: how many processes share the ports; 0 = one per core but one, at least one",
    )
    log_level: str = "INFO"
    log_json: bool = True
    bind_host: str = Field("127.0.0.1", description="interface gRPC and HTTP servers listen on")
    metrics_port: int = Field(0, description="Prometheus port of this process; 0 disables it")
    shutdown_grace_seconds: float = Field(10.0, description="how long SIGTERM waits for in-flight calls")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the event loop every process runs on: uvloop (faster I/O) or asyncio's own"
    )

    # --- where the services are (callers dial these; a service binds bind_host and the port) ---
    chat_addr: str = "127.0.0.1:50051"
    context_addr: str = "127.0.0.1:50052"
    inference_addr: str = "127.0.0.1:50053"
    store_addr: str = "127.0.0.1:50054"
    worker_addr: str = Field("127.0.0.1:50055", description="a job worker's gRPC health endpoint")
    edge_port: int = 8000

    # --- servers; empty means "not configured" (`chatterbot up` fills them with embedded ones) ---
    nats_url: str = ""
    redis_url: str = Field(
        "",
        description="redis://[:password@]host:port/db; with CHATTERBOT_REDIS_SENTINELS only its password and db "
        "are used, the host is ignored (e.g. redis://:pw@ignored/0)",
    )
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host:port of the Redis Sentinels that know the master; empty: "
        "CHATTERBOT_REDIS_URL is dialled directly",
    )
    redis_sentinel_master: str = Field("chatterbot", description="the master's name at the sentinels")
    redis_sentinel_password: str = Field(
        "", description="password of the sentinels themselves (the master's comes from CHATTERBOT_REDIS_URL)"
    )
    postgres_dsn: str = Field(
        "", description="the one database of an unsharded store (used when postgres_shards is empty)"
    )
    postgres_shards: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated shard DSNs, in shard order; only ever append to it (then run `chatterbot shards rebalance`)",
    )
    postgres_replicas: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated read-replica DSNs in shard order, empty entries for shards without one",
    )
    postgres_previous_shard_count: int = Field(
        0,
        description="while a rebalance runs: how many shards there were before the list grew (0: none runs)",
    )

    # --- keys: comma-separated; service keys may act for any user_id, admin keys also reach /debug ---
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key_cache_seconds: float = Field(
        5.0,
        description="how long the edge and chat_svc cache a key looked up in the store; revocation bites within it",
    )

    # --- rate limits at the edge (counters in Redis, shared by every edge replica) ---
    rate_limits: str = Field(
        "/chat=20/minute,/async-chat=20/minute,/stream-chat=20/minute,/v1/chat/completions=20/minute",
        description="requests per key and route: route=limit, comma-separated; several limits of a route joined "
        "by ';' (e.g. /chat=20/minute;500/hour)",
    )
    rate_limit_static_keys: bool = Field(
        False,
        description="rate-limit the static keys of CHATTERBOT_API_KEYS and CHATTERBOT_ADMIN_KEYS too (dev, tests and load tests use them)",
    )
    auth_failures_per_ip: str = Field(
        "10/minute",
        description="failed authentications allowed per client IP before answering 429; empty: no limit",
    )

    # --- guarded client ---
    deadline_seconds: float = Field(10.0, description="deadline of a unary call between services")
    stream_deadline_seconds: float = Field(300.0, description="deadline of a whole generation stream")
    breaker_fail_max: int = Field(5, description="consecutive failures that open a target's breaker")
    breaker_reset_seconds: float = Field(5.0, description="how long an open breaker waits before a trial")
    retry_attempts: int = Field(3, description="tries for a call that failed UNAVAILABLE before any response")
    retry_initial_backoff: float = 0.05
    retry_max_backoff: float = 0.5

    # --- gRPC transport: TLS between services, the partner port, connection lifetimes ---
    grpc_tls_ca: str = Field(
        "",
        description="PEM file of the CA that signs every mesh certificate; with _CERT and _KEY: mutual TLS on "
        "every gRPC server and client of the mesh (all three empty: plaintext)",
    )
    grpc_tls_cert: str = Field(
        "", description="PEM certificate (chain) this process presents, as a server and as a client"
    )
    grpc_tls_key: str = Field("", description="PEM private key of CHATTERBOT_GRPC_TLS_CERT")
    partner_grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="chat_svc also listens here for partners (API keys as on its own port, server TLS from "
        "CHATTERBOT_PARTNER_TLS_*, no client certificate); 0: off",
    )
    partner_tls_cert: str = Field("", description="PEM certificate of the partner port; empty: plaintext")
    partner_tls_key: str = Field("", description="PEM private key of CHATTERBOT_PARTNER_TLS_CERT")
    grpc_max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="gRPC servers end a connection (GOAWAY) after this long, so clients re-resolve and find new "
        "replicas; calls in flight get CHATTERBOT_STREAM_DEADLINE_SECONDS to finish; 0: never",
    )
    grpc_keepalive_seconds: float = Field(
        30.0,
        ge=1,
        description="gRPC clients ping an idle connection this often (servers accept pings down to a third of "
        "their own value), so a dead peer is found before the next call",
    )

    # --- edge ---
    edge_max_in_flight: int = Field(
        20000, description="requests (streams included) one edge process serves at once; past it: 503"
    )
    max_body_bytes: int = Field(1_048_576, description="largest request body the edge accepts (413 beyond)")
    edge_keepalive_seconds: float = Field(
        75.0,
        description="idle keep-alive of client connections; keep it above the proxy's upstream idle timeout",
    )
    sse_keepalive_seconds: float = Field(
        15.0, gt=0, description="an idle server-sent event stream gets a keep-alive comment this often"
    )
    idempotency_ttl_seconds: int = Field(
        86400,
        gt=0,
        description="how long the answer to a request with an Idempotency-Key is kept in Redis for its retries",
    )
    idempotency_lease_seconds: float = Field(
        10.0,
        gt=0,
        description="an edge running a keyed request renews its hold on the key for this long, a third of it "
        "apart; when the edge dies, a retry takes the key over once the hold lapses",
    )

    # --- browsers: the chat page at /, other origins, and streams an EventSource can open ---
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins whose pages may call the edge, comma-separated: https://app.example.com, "
        "http://localhost:* (any port), https://*.example.com (one label), or * (any, not with credentials); "
        "empty: none (`chatterbot up` allows loopback origins)",
    )
    cors_allow_credentials: bool = Field(
        False,
        description="let pages on those origins send cookies and HTTP authentication (API keys travel in "
        "headers and need no credentials); not allowed with *",
    )
    stream_ticket_secret: str = Field(
        "",
        description="HMAC secret of stream tickets, the same on every edge replica; empty: one is made once "
        "and kept in Redis for all of them",
    )
    stream_ticket_seconds: int = Field(
        300, gt=0, description="how long a stream ticket (the ?ticket= of a stream_endpoint) opens its stream"
    )

    # --- tracing: W3C trace context always flows; spans are exported over OTLP/HTTP when this is set ---
    otel_exporter_otlp_endpoint: str = Field("", description="e.g. http://otel-collector:4318")

    # --- chat turn ---
    context_token_budget: int = Field(3072, description="tokens of earlier turns sent with a prompt")
    max_message_chars: int = 2000
    system_prompt: str = "You are ChatterBot, a helpful assistant."
    openai_default_user: str = Field(
        "openai-client",
        description="user_id of /v1/chat/completions requests that name no `user` (3-50 characters)",
    )

    # --- queued chats on NATS JetStream ---
    jetstream_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="replicas of the streams (jobs, events, DLQ) and job consumers a process creates; 3 on a "
        "JetStream cluster. A stream that exists keeps its replicas, retention and storage",
    )
    worker_concurrency: int = Field(8, description="jobs one worker process runs at once")
    jobs_ack_wait_seconds: float = Field(
        30.0, description="a job not acknowledged or touched in this time is redelivered"
    )
    jobs_heartbeat_seconds: float = Field(
        10.0, description="how often a worker tells JetStream a long job is alive"
    )
    jobs_max_deliver: int = Field(5, description="tries of a job before it goes to the dead-letter stream")
    jobs_backoff_seconds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 5.0, 15.0, 30.0], description="delay before each retry of a failed job"
    )
    events_max_age_seconds: int = Field(900, description="how long token events of a job are kept for replay")
    job_result_ttl_seconds: int = Field(86400, description="how long /check-response keeps a result")

    # --- degradation ladder (chat_svc), driven by the primary model's waiting queue and the breakers ---
    degrade_poll_seconds: float = Field(0.5, description="how often chat_svc reads the inference queue depth")
    degrade_reduced_context_waiting: int = Field(
        8, description="waiting sequences from which context shrinks"
    )
    degrade_light_model_waiting: int = Field(
        32, description="waiting sequences from which turns go to the light model"
    )
    degrade_cache_only_waiting: int = Field(
        128, description="waiting sequences from which only cached deterministic repeats are answered"
    )
    degrade_shed_waiting: int = Field(224, description="waiting sequences from which new turns get 503")
    reduced_context_token_budget: int = Field(768, description="context budget on the reduced-context rung")

    # --- context_svc ---
    context_max_turns: int = Field(64, description="turns kept per conversation in Redis")
    context_ttl_seconds: int = Field(
        86400, description="idle time after which a conversation's context expires"
    )
    context_lock_timeout_seconds: float = Field(
        10.0, description="a conversation's context lock frees itself after this long if its holder died"
    )
    context_tokenizer: str = Field(
        "",
        description="tokenizer.json counting tokens of turns (needs `tokenizers`); empty: ~4 chars per token",
    )

    # --- inference_svc ---
    inference_engine: str = Field("sim", description="engine of the primary model: sim | vllm | openai")
    model_name: str = Field(
        "chatterbot-sim-7b-awq", description="primary model: id, or a path or hub name for vllm"
    )
    light_model_engine: str = Field(
        "", description="engine of an optional light fallback model (empty: none)"
    )
    light_model_name: str = Field("", description="the light fallback model")
    # vllm engine (passed through to vLLM's engine arguments)
    vllm_quantization: str = Field("", description="e.g. awq; empty lets vLLM decide")
    vllm_dtype: str = "auto"
    vllm_max_model_len: int = Field(0, description="0 takes the model's own")
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_num_seqs: int = 256
    vllm_tensor_parallel_size: int = 1
    vllm_enable_prefix_caching: bool = True
    vllm_seed: int = 0
    vllm_enforce_eager: bool = Field(
        False, description="run the model eagerly (no compiled graphs): a faster start, slower steps"
    )
    vllm_start_timeout_seconds: float = Field(
        900.0, gt=0, description="how long `chatterbot up` waits for inference_svc to load its vLLM model"
    )
    vllm_tool_parser: str = Field(
        "hermes",
        description="vLLM's tool-call parser (as `vllm serve --tool-call-parser`); empty: none, and a "
        "tool_choice other than none is refused",
    )
    vllm_chat_template: str = Field(
        "",
        description="path of a chat template used instead of the model's (as `vllm serve --chat-template`)",
    )
    # openai engine: any OpenAI-compatible upstream
    openai_base_url: str = Field("", description="e.g. http://vllm:8000/v1")
    openai_api_key: str = ""
    openai_model: str = Field("", description="upstream model name; empty uses the model's id")
    openai_timeout_seconds: float = Field(60.0, description="connect and between-chunks timeout upstream")
    inference_max_waiting: int = Field(
        256,
        description="sequences allowed to wait for a slot; past it Generate fails fast (RESOURCE_EXHAUSTED)",
    )
    result_cache_ttl_seconds: int = Field(
        3600,
        description="keep answers of deterministic requests (temperature 0 or a seed) in Redis; 0 disables",
    )
    # sim engine: defaults model a 7B AWQ model under vLLM on one 24 GB GPU (see README, "The simulator")
    sim_ttft_ms: float = Field(45.0, description="time to first token of an unqueued request, before prefill")
    sim_prefill_ms_per_token: float = Field(0.12, description="prefill time per prompt token")
    sim_itl_ms: float = Field(12.0, description="inter-token latency with one sequence running")
    sim_itl_at_max_ms: float = Field(38.0, description="inter-token latency with max_num_seqs running")
    sim_max_num_seqs: int = Field(
        64, description="sequences the simulated engine runs at once; the rest wait"
    )
    sim_mean_output_tokens: int = Field(
        220, description="mean length of an answer that stops on its own (exponential); max_tokens caps it"
    )
    sim_max_model_len: int = 8192
    sim_seed: int = 0

    # --- store_svc ---
    postgres_pool_min: int = 1
    postgres_pool_max: int = 10
    postgres_partitions_ahead_months: int = Field(
        3, description="monthly partitions of messages kept created ahead of the current month"
    )

    @field_validator("api_keys", "admin_keys", "jobs_backoff_seconds", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _no_credentials_for_any_origin(self) -> Settings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "CHATTERBOT_CORS_ORIGINS=* cannot be combined with CHATTERBOT_CORS_ALLOW_CREDENTIALS: "
                "name the origins"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        mesh = ("GRPC_TLS_CA", "GRPC_TLS_CERT", "GRPC_TLS_KEY")
        for names in (mesh, ("PARTNER_TLS_CERT", "PARTNER_TLS_KEY")):
            unset = [f"CHATTERBOT_{name}" for name in names if not getattr(self, name.lower())]
            if 0 < len(unset) < len(names):
                every = ", ".join(f"CHATTERBOT_{name}" for name in names)
                raise ValueError(f"{', '.join(unset)} not set: set all of {every}, or none of them")
        return self

    @field_validator("postgres_shards", mode="before")
    @classmethod
    def _shards_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinels_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_usable(cls, value: str) -> str:
        problem = _redis_url_problem(value, sentinels=False) if value else None
        if problem:
            raise ValueError(f"CHATTERBOT_REDIS_URL: {problem}")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_addresses(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for entry in value:
            sentinel_address(entry)
        url = info.data.get("redis_url", "")
        problem = _redis_url_problem(url, sentinels=True) if value and url else None
        if problem:
            raise ValueError(f"CHATTERBOT_REDIS_URL with CHATTERBOT_REDIS_SENTINELS: {problem}")
        return value

    @field_validator("redis_sentinel_master")
    @classmethod
    def _master_is_a_name(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError(
                "CHATTERBOT_REDIS_SENTINEL_MASTER must be a name without spaces (e.g. chatterbot)"
            )
        return value

    @field_validator("postgres_replicas", mode="before")
    @classmethod
    def _replicas_csv(cls, value: object) -> object:
        # Positional: "dsn0,,dsn2" means shard 1 has no replica, so empty entries are kept.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",")] if value.strip() else []
        return value

    def to_env(self) -> dict[str, str]:
        """These settings as `CHATTERBOT_*` variables, to hand to a child process."""
        env = {}
        for name, value in self.model_dump().items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"CHATTERBOT_{name.upper()}"] = str(value)
        return env

    def service_addr(self, service: str) -> str:
        """Address callers dial for `service` (one of SERVICES)."""
        return getattr(self, f"{service}_addr")

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each of CHATTERBOT_REDIS_SENTINELS."""
        return [sentinel_address(entry) for entry in self.redis_sentinels]

    def redis_configured(self) -> bool:
        """True when Redis is reached directly (CHATTERBOT_REDIS_URL) or through sentinels."""
        return bool(self.redis_url or self.redis_sentinels)

    def service_port(self, service: str) -> int:
        return int(self.service_addr(service).rsplit(":", 1)[1])


def env_example() -> str:
    """The text of `.env.example`: every setting with its description and default."""
    lines = [
        "# Every ChatterBot setting with its default. Copy to .env and edit; real environment variables win.",
        "# Empty server URLs mean: `chatterbot up` starts embedded ones (NATS, PostgreSQL, Valkey).",
        "# Generated by `make env-example` from chatterbot/settings.py.",
        "",
    ]
    defaults = Settings(_env_file=None).to_env()
    for name, field in Settings.model_fields.items():
        if field.description:
            lines.append(f"# {field.description}")
        key = f"CHATTERBOT_{name.upper()}"
        lines.append(f"{key}={defaults[key]}")
    return "\n".join(lines) + "\n"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
