"""Settings: the only place that reads the environment.

Sources, highest priority first: explicit arguments (CLI flags), ``GUARDPROXY_*`` environment
variables (nested with ``__``, e.g. ``GUARDPROXY_UPSTREAM__BASE_URL``), then an optional TOML config
file (``--config FILE`` or ``GUARDPROXY_CONFIG_FILE``), then the defaults below.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from guardproxy.errors import ConfigError
from guardproxy.tomllines import KeyLines

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = PROJECT_ROOT / "models" / "guard-v1"
DEFAULT_POLICY = PROJECT_ROOT / "policies" / "default.toml"


class _Section(BaseModel):
    """A table of the settings. An unknown key is an error, not ignored: ``[server] prot = 9000`` or
    ``GUARDPROXY_LIMITS__MAX_TOKEN_CAP`` is a typo that would otherwise leave the default in force unnoticed."""

    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    shutdown_timeout: float = Field(10.0, ge=0, description="seconds open streams may run on after SIGTERM")
    max_concurrent_requests: int = Field(512, ge=1, description="beyond this, a fast 503 with Retry-After")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn's log level and the guardproxy loggers' (guardproxy.logs.LOG_LEVELS)"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one line a record; json: one JSON object a line (time, level, logger, message, and exc for "
        "a traceback; an access line's fields each a key of their own), uvicorn's lines too, for a log pipeline to "
        "ingest; secrets are cut from both",
    )
    access_log: bool = Field(
        True,
        description="one INFO line per finished request on the guardproxy.access logger (so log_level warning or "
        "above silences it too): method, path without its query, status, duration, request id, tenant, guard action, "
        "fallback, outcome, error code, upstream status, bytes, streamed, disconnected; a field each in the json "
        "format; never a header, key, query or body",
    )
    timing_header: bool = Field(True, description="send a Server-Timing header with the gateway's stage times")
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="comma-separated addresses (or '*') of the proxies whose X-Forwarded-Proto and X-Forwarded-For "
        "are believed: behind a TLS-terminating load balancer, its addresses, so the review page's session cookie "
        "is marked Secure",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class UpstreamSettings(_Section):
    """The upstream, its key (replace mode), its timeouts and connection pool.

    Timeouts, in seconds (applied in ``guardproxy.proxy``):

    - ``connect_timeout``: opening a TCP connection, and waiting for a pooled one.
    - ``read_timeout``: for a request that asks for a stream (``"stream": true``), the longest wait for the first
      byte of the reply, then between two reads; a stream that stalls longer ends with an in-band
      ``upstream_timeout`` error. Also the longest a write of the request body may take. A plain request has no
      read timeout: its reply comes only when generation ends, so ``total_timeout`` alone bounds the wait.
    - ``total_timeout``: the overall deadline of one exchange, plain or streamed, from its start (the input check
      included) to the reply's last byte, a re-ask included; past it the client gets ``504 upstream_timeout``, or
      the in-band error on a stream under way. 600 s, as the openai SDK's own default.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: SecretStr | None = Field(
        None, description="replace mode: send this key upstream and require gateway keys from clients"
    )
    api_key_header: Literal["authorization", "api-key", "x-api-key"] = Field(
        "authorization",
        description="how replace mode sends the key: 'Authorization: Bearer <key>', or the bare key in Azure "
        "OpenAI's 'api-key' or an 'x-api-key' header",
    )
    connect_timeout: float = Field(5.0, gt=0, description="TCP connect, and the wait for a pooled connection")
    read_timeout: float = Field(
        60.0,
        gt=0,
        description="streamed requests: longest wait for the first byte, then between two reads; a plain request has "
        "none (its reply comes when generation ends: total_timeout bounds it)",
    )
    total_timeout: float = Field(
        600.0,
        gt=0,
        description="overall deadline of one exchange, plain or streamed: from its start (the input check included) "
        "to the reply's last byte (600 s, as the openai SDK's own default)",
    )
    max_connections: int = Field(256, ge=1)
    max_keepalive_connections: int = Field(64, ge=0)
    transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp", description="httpx transport to the upstream: aiohttp-backed (measured faster) or httpx's own"
    )

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        # Credentials in the URL clash with the Authorization header every request carries (the client's, or the
        # gateway's in replace mode): the aiohttp transport refuses the pair and each request would fail with a 500.
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@", value):
            raise ValueError("carries credentials (user:password@host): set upstream.api_key instead")
        return value


class LimitSettings(_Section):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)
    max_messages: int = Field(2048, ge=1)
    max_user_turns: int = Field(
        512,
        ge=1,
        description="user messages one request may carry: the guard scores every new one, from the newest; when they "
        "take longer than guard.timeout, a block the turns read by then earn stands and the policy's "
        "on_classifier_failure decides the rest (the default policy forwards it), so the limit bounds how far "
        "padding turns can push an earlier ask out of reach. 512 distinct short turns take ~0.7-1.5 s to score on a "
        "2-core CPU; lower it on a slower one",
    )
    max_header_bytes: int = Field(16 * 1024, ge=256)
    max_headers: int = Field(100, ge=1)
    max_json_depth: int = Field(64, ge=4)
    max_n: int = Field(8, ge=1)
    max_tokens_cap: int | None = Field(
        None,
        description="clamp the max_tokens / max_completion_tokens a request sends to this; a request with neither is "
        "sent without one (the upstream's default: which field an upstream accepts varies); None leaves them as sent",
    )
    rate_per_second: float | None = Field(None, description="per-tenant token bucket refill rate; None is off")
    rate_burst: int = Field(50, ge=1)


class AuthSettings(_Section):
    # tenant name -> sha256 hex of a gateway key. Required in replace mode (upstream.api_key set).
    gateway_keys: dict[str, str] = Field(default_factory=dict)


class RouteSettings(_Section):
    forward_unguarded_generating: bool = Field(
        False,
        description="forward routes off the forwarding allowlist (/v1/completions, /v1/responses, /v1/messages, ...) "
        "unguarded, counted; stored chat completions stay refused",
    )


def default_exit_cache() -> str:
    """Where the cut parts are kept between starts by default: ``$XDG_CACHE_HOME/guardproxy/early-exit`` (or
    ``~/.cache/...``); empty (no cache) when there is no home directory."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:
        return ""
    return str(base / "guardproxy" / "early-exit")


def default_workers() -> int:
    """Model runs at once by default: the CPUs this process may use, at most 2 (measured on 2-core machines: under
    load a second run takes the second core, and at low load every run stays on the first thread,
    ``guardproxy.workers``; more cores were not measured)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


class GuardSettings(_Section):
    enabled: bool = True
    model_dir: Path = DEFAULT_MODEL_DIR
    speculative: bool = Field(False, description="start the upstream call while the input check runs")
    speculative_window: bool = Field(
        False,
        description="start the upstream call once a request's own turns pass the policy, while its conversation "
        "window is still being scored; the reply is held until the window's verdict (ignored with speculative)",
    )
    score_system: bool = Field(
        False,
        description="also score system and developer messages as the guard scores user turns. Off by default: they "
        "are the operator's. Turn it on where clients write their own system prompt (a public API, a key handed to "
        "users): otherwise a request can carry its harmful ask in a system message and pass the input check. A "
        "system prompt repeated on every request is scored once (the classifier's cache)",
    )
    score_schemas: bool = Field(
        False,
        description="also score the request's tool definitions and response_format schema as untrusted text. Off by "
        "default: they are the application's, fixed per app, and one that names risky work reads as harmful on every "
        "request (a tool 'exploit_scan: scan a host for known CVEs (authorized pentest only)' reads harm 0.96). Turn "
        "it on where clients write their own tools (a public API): otherwise a request can carry its ask in a tool "
        "description; a tool list repeated on every request is scored once (the classifier's cache)",
    )
    output_checks: bool = Field(
        True,
        description="score every reply (reply harm, refusal) and apply the policies' output rules; false checks "
        "input only: less CPU and latency per request, but no reply is blocked, the conversation tracker sees no "
        "assistant refusals and no false-refusal drills are sampled",
    )
    early_exit: bool | Literal["auto"] = Field(
        "auto",
        description="answer a clearly harmless user turn, and a clearly harmless conversation window, from the guard "
        "model's first layers (the model directory's early_exit.json, guardproxy.early_exit): about half the CPU of "
        "a pass; replies still run the whole model, and so does a window with a turn that reads risky alone, an "
        "exited turn whose rephrase similarity to a refused request a loaded policy could read, and every turn and "
        "window of a request whose policies read harm, jailbreak or window harm below the lines the heads were "
        "fitted for. auto: on when early_exit.json fits the model, else the whole model (logged); true: "
        "the gateway does not start without it; false: off. guardproxy score, eval and classify read auto as off",
    )
    early_exit_cache: str = Field(
        default_factory=default_exit_cache,
        description="directory that keeps the early-exit cut of the guard model between starts (one entry per "
        "model.onnx md5 and cut: the cut costs ~1.5 s); empty: cut at each start. Default "
        "$XDG_CACHE_HOME/guardproxy/early-exit or ~/.cache/guardproxy/early-exit",
    )
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads")
    workers: int = Field(
        default_factory=default_workers,
        ge=1,
        description="model runs at once: the size of the one inference executor, whose jobs go to the lowest-numbered "
        "idle thread (so a second thread works only under load). Default: the CPUs this process may use, at most 2",
    )
    concurrent_window: bool = Field(
        False,
        description="with workers >= 2: start a conversation's window pass beside its new turn's pass instead of "
        "after it (a closed window gate then discards it)",
    )
    timeout: float = Field(2.0, gt=0, description="a classification slower than this counts as a failure")
    cache_size: int = Field(8192, ge=0)
    window_max_ids: int = Field(
        96,  # conversation.escalation.WINDOW_MAX_IDS (a test keeps the two equal)
        ge=8,
        description="ids of the conversation window the guard model reads (at most the model's maximum)",
    )
    breaker_failures: int = Field(
        5, ge=0, description="consecutive classifier failures that open the circuit (fail fast); 0 turns it off"
    )
    breaker_cooldown: float = Field(5.0, gt=0, description="seconds the open circuit fails fast before one probe")


class PolicySettings(_Section):
    active: Path = DEFAULT_POLICY
    shadows: list[Path] = Field(default_factory=list)
    mapping: Path | None = Field(None, description="TOML picking active/shadow policies per tenant or model")
    decision_log: Path | None = Field(None, description="JSONL decision log; None keeps it in the drill store only")
    watch: bool = Field(False, description="reload when a policy file changes")


# URL schemes of a state backend shared by replicas (``conversation.build_tracker``: Redis), and the shortest
# ``state.hmac_secret`` a gateway using one starts with (``StateSettings.secret_problem``).
SHARED_STATE_SCHEMES = ("redis://", "rediss://", "unix://")
MIN_HMAC_SECRET_CHARS = 32


class StateSettings(_Section):
    url: str = Field("memory://", description="memory:// or redis://host:port/db")
    hmac_secret: SecretStr = Field(
        SecretStr(""),
        description=f"shared by all replicas; required for redis://, at least {MIN_HMAC_SECRET_CHARS} characters",
    )
    ttl_seconds: int = Field(24 * 3600, ge=1)
    prefix: str = Field(
        "guardproxy:", min_length=1, description="Redis key prefix: deployments (or benches) sharing one Redis differ"
    )
    max_conversations: int = Field(100_000, ge=1)
    max_bytes: int = Field(256 * 1024 * 1024, ge=1)
    backend_timeout: float = Field(0.05, gt=0, description="a slower state backend falls back to local state")

    @property
    def shared(self) -> bool:
        """Whether the state lives in a backend every replica reads (Redis)."""
        return self.url.startswith(SHARED_STATE_SCHEMES)

    def secret_problem(self) -> str | None:
        """Why ``hmac_secret`` cannot key shared state, on one line naming the setting and its variable; None when it
        can, or when the state is this process's own (``memory://`` makes a random secret when none is set).
        Checked by ``guardproxy serve`` before anything starts; the secret itself is never in the message."""
        if not self.shared:
            return None
        length = len(self.hmac_secret.get_secret_value())
        if length >= MIN_HMAC_SECRET_CHARS:
            return None
        problem = "is not set" if length == 0 else f"is shorter than {MIN_HMAC_SECRET_CHARS} characters"
        return (
            f"{ENV_PREFIX}STATE__HMAC_SECRET (state.hmac_secret) {problem}: a redis state.url shares conversation "
            f"state between replicas, which all need the same secret of at least {MIN_HMAC_SECRET_CHARS} random "
            """characters (python -c "import secrets; print(secrets.token_hex(32))")"""
        )


class DrillSettings(_Section):
    store: str = Field("sqlite:///guardproxy-drills.db", description="sqlite:///path or postgresql://...")

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        # Checked with the rest of the settings (the file's line named, before the model loads), as
        # ``drills.store.open_store`` reads it; the message never repeats the URL, which may hold a password.
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("expected sqlite:///path or postgresql://user@host/db")
        if scheme == "sqlite" and not re.match(r"^sqlite:///[^/]|^sqlite:////.", value):
            raise ValueError("use sqlite:///relative/path or sqlite:////absolute/path")
        return value

    sample_rate: float = Field(0.01, ge=0, le=1)
    unreadable_sample_rate: float = Field(
        0.1, ge=0, le=1, description="share of exchanges with a turn the model cannot read sampled for review"
    )
    sample_secret: SecretStr = Field(SecretStr(""), description="keys the sampling hash; random per process if empty")
    per_tenant_hourly_cap: int = Field(200, ge=0)
    hourly_budget: int = Field(2000, ge=0)
    queue_size: int = Field(1000, ge=1)
    retention_days: int = Field(30, ge=1)
    redact_patterns: list[str] = Field(default_factory=lambda: ["email", "phone", "card"])
    hash_only: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GUARDPROXY_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    limits: LimitSettings = LimitSettings()
    auth: AuthSettings = AuthSettings()
    routes: RouteSettings = RouteSettings()
    guard: GuardSettings = Field(default_factory=GuardSettings)  # a factory: its cache default reads the environment
    policy: PolicySettings = PolicySettings()
    state: StateSettings = StateSettings()
    drills: DrillSettings = DrillSettings()
    admin_token: SecretStr | None = Field(None, description="GUARDPROXY_ADMIN_TOKEN: review page and admin endpoints")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file (model_config["toml_file"], set by load_settings) ranks below the environment.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


class InvalidSettings(ConfigError):
    """Settings that fail validation: ``issues`` holds every problem, one line each, naming where its value came
    from: ``FILE:LINE: field: message`` for the config file, ``VARIABLE: message`` for the environment."""

    def __init__(self, issues: Iterable[str], *, where: str | None = None) -> None:
        self.issues = tuple(dict.fromkeys(issues)) or ("invalid settings",)
        Exception.__init__(self, "\n".join(self.issues))
        self.where = where


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a config file, the environment and explicit overrides (nested dicts).

    The config file is ``config_file`` or else ``GUARDPROXY_CONFIG_FILE``. A file that is not valid TOML raises
    ``ConfigError`` at ``FILE:LINE``; values that fail validation raise ``InvalidSettings`` listing every problem.
    """
    if config_file is None:
        config_file = os.environ.get("GUARDPROXY_CONFIG_FILE") or None
    if config_file is None:
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            raise InvalidSettings(_issues(exc, overrides)) from exc
        except SettingsError as exc:
            raise InvalidSettings([_unparsable_env(exc)]) from exc
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError("config file not found", where=str(path))
    text, data = _read_config(path)
    file_settings = type("FileSettings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}})
    try:
        if overrides:
            # the file alone first: a value a command-line flag overrides is still the file's to get right (it is
            # what the next start without the flag reads; an operator walkthrough found `port = "abc"` started fine)
            try:
                file_settings()
            except ValidationError as exc:
                where = (str(path), data, KeyLines(text))
                raise InvalidSettings(_issues(exc, {}, where), where=str(path)) from exc
        return file_settings(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise InvalidSettings(_issues(exc, overrides, (str(path), data, KeyLines(text))), where=str(path)) from exc
    except SettingsError as exc:
        raise InvalidSettings([_unparsable_env(exc)]) from exc


def _unparsable_env(exc: SettingsError) -> str:
    """Which ``GUARDPROXY_*`` variable pydantic-settings could not parse (it names only the top-level field): each
    candidate is parsed alone, as the environment source does. Values are not echoed: some settings are secrets."""
    m = re.search(r'field "([^"]+)"', str(exc))
    field = f"{ENV_PREFIX}{m.group(1).upper() if m else ''}"
    culprits = []
    for key in os.environ:
        if m is None or (key.upper() != field and not key.upper().startswith(field + "__")):
            continue
        source = EnvSettingsSource(Settings)
        source.env_vars = {k: v for k, v in source.env_vars.items() if k.upper() == key.upper()}
        try:
            source()
        except Exception:
            culprits.append(key)
    where = culprits[0] if len(culprits) == 1 else f"{field}*"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        return (
            f"{where}: not valid JSON ({cause.msg} at column {cause.colno}); list and table settings are written as "
            """JSON, e.g. '["a.toml", "b.toml"]' or '{"key": "value"}'"""
        )
    return f"{where}: cannot parse the value" + (f": {cause}" if cause is not None else "")


def _read_config(path: Path) -> tuple[str, dict[str, Any]]:
    """The text and the data of a config file; ``ConfigError`` naming the file (and line) when it cannot be read
    or is not TOML."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", where=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read file: not UTF-8: {exc.reason} at byte {exc.start}", where=str(path)) from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if m is not None:
            line, message = int(m.group(1)), f"{message[: m.start()]} (column {m.group(2)})"
        else:  # "(at end of document)"
            line = max(1, len(text.splitlines()))
            message = message.replace("(at end of document)", "(at the end of the file)")
        raise ConfigError(f"TOML syntax error: {message}", where=f"{path}:{line}") from exc


ENV_PREFIX = "GUARDPROXY_"
_MESSAGES = {"extra_forbidden": "unknown field", "missing": "required field is missing"}


def _issues(
    exc: ValidationError, overrides: Mapping[str, Any], config: tuple[str, dict[str, Any], KeyLines] | None = None
) -> list[str]:
    """Every validation problem as one line naming its source: an override (a flag), then a ``GUARDPROXY_*``
    variable, then the config file (with the key's line), the ranking ``Settings`` reads them in. Values are not
    echoed: some settings are secrets."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p != "[key]")
        field = _field_path(loc)
        message = _MESSAGES.get(err["type"], err["msg"])
        if err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        variable = None if _holds(overrides, loc) else _env_variable(loc)
        if variable is not None:
            out.append(f"{variable}: {message}")
        elif config is not None and not _holds(overrides, loc) and _holds(config[1], loc):
            name, _, lines = config
            out.append(f"{name}:{lines.line_of(loc)}: {field}: {message}")
        else:
            out.append(f"setting {field}: {message}")
    return out


def _field_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _holds(data: Any, loc: tuple[str | int, ...]) -> bool:
    """Whether ``data`` (nested dicts and lists) sets the value at ``loc``, or a value that is not a table above it
    (``limits = 3``)."""
    if not loc:
        return True
    if isinstance(data, Mapping):
        key = str(loc[0]) if loc[0] in data or str(loc[0]) in data else None
        return key is not None and _holds(data[key], loc[1:])
    if isinstance(data, list):
        return isinstance(loc[0], int) and 0 <= loc[0] < len(data) and _holds(data[loc[0]], loc[1:])
    return True


def _env_variable(loc: tuple[str | int, ...]) -> str | None:
    """The ``GUARDPROXY_*`` variable that set the value at ``loc``, as spelled: the variable for ``loc`` itself, or
    one for a table above it whose JSON value holds it (``GUARDPROXY_LIMITS='{"max_n": 0}'``). Names are matched
    without regard to case, as pydantic-settings matches them."""
    names = {key.upper(): key for key in os.environ if key.upper().startswith(ENV_PREFIX)}
    for end in range(len(loc), 0, -1):
        name = names.get(ENV_PREFIX + "__".join(str(p) for p in loc[:end]).upper())
        if name is None:
            continue
        if end == len(loc):
            return name
        try:
            value = json.loads(os.environ[name])
        except ValueError:
            continue
        if _holds(value, loc[end:]):
            return name
    return None
