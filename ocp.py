#!/usr/bin/env python3
"""OCP (Open Claude Proxy): an OpenAI-compatible API over a Claude Pro/Max subscription.

It runs the official `claude` CLI for each request — or lends it one kept warm, or the
one that holds its conversation — and translates between OpenAI's chat completions,
Responses and Anthropic's Messages and the CLI's stream-json events.

    python3 ocp.py serve                 run the daemon (127.0.0.1:3456)
    python3 ocp.py keys add NAME         a per-person key (multi mode), shown once
    python3 ocp.py usage --by-key        who used what
    python3 ocp.py status | doctor       how the daemon is; what to fix
    python3 ocp.py settings | logs | sessions | lan | restart | health | models | version

Contents (`grep -n '^# [A-Z].*#$' ocp.py` prints the map):
    Config · Errors · Models · Store · Auth & quotas · Claude runner ·
    Requests (wire formats → TurnRequest) · Cache & singleflight ·
    CLI translation (TurnRequest → CLI → events) · Plan limits · Metrics & logs ·
    Turns · Encoders · Accounting · Routes · HTTP · Admin CLI · Main

A request's path: Handler.dispatch_request (Host/Origin checks, Server.authenticate — the one
way in: a key, else a dashboard session; ApiKey.usable(now) —, the Route's access: admin unless
declared keyed or public) →
answer_turn, the one recipe of every model route (TURN_ROUTES): its parser
(parse_chat_request) builds a TurnRequest → turn_input (messages_to_input) → cache_key /
Ledger.lookup → Ledger.admit (quota reservation: a Ticket) → Turn.events with the Server's
TurnServices (Runner.lease → Lease.acquire: a Pool CLI or a new one; exchange: the CLI's events
until `result` → Answer.feed for the answer's content, CLI_EVENTS for what comes beside it →
TEXT / REASONING / PING … DONE with an Outcome) → the route's
Encoder (ChatJSON / ChatSSE) writes the bytes; the Ticket records the usage row,
metrics, cache and the plan's share (PlanLimits.spent) just before the last ones
leave; Lease.keep pools the CLI for the conversation's follow-up, or Parks keeps it
for the client's tool results, or its stdin closes and a kept worker thread (WORKERS)
reaps it after the answer is out (Runner.retire_later; the keeper knows its run dir). Hangups tells the Turn when the client leaves. A
refusal goes out through Handler.refuse: a wall (a quota, the plan, a model) in the
shape this client stops at (wall_for). Connections bounds the sockets, Slots the
running CLIs, Parks and Pool the idle ones (one memory budget, a share per key).

Policy is data, one row each: a setting (SETTINGS), a per-key field (KeyPolicy), a CLI event
(CLI_EVENTS), a metric family (COUNTED, READ), a route (ROUTES, TURN_ROUTES).

Standard library only, Python 3.9+. Importing this module has no side effects.
"""

from __future__ import annotations  # annotations stay strings: typing is never loaded at run time

import argparse
import base64
import binascii
import calendar
import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import hmac
import itertools
import json
import logging
import logging.handlers
import os
import queue
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers and readers only: importing typing costs the daemon 0.5 MB
    from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

__version__ = "0.1.0"

log = logging.getLogger("ocp")
HERE = os.path.dirname(os.path.abspath(__file__))


###############################################################################
# Config ######################################################################
###############################################################################

DEFAULT_PORT = 3456
DEFAULT_TIMEOUT_MS = 600_000
DEFAULT_HEARTBEAT_MS = 15_000
DEFAULT_QUEUE_TIMEOUT_MS = 60_000
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 5 * 1024 * 1024
DEFAULT_MAX_IMAGES = 20
DEFAULT_SOCKET_TIMEOUT_S = 30
AUTH_MODES = ("none", "shared", "multi")
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")


class ConfigError(ValueError):
    """A setting is invalid; the daemon must not start."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, built once from the environment (+ serve flags).

    Units are in the names. `environ` is the environment the children inherit
    (before scrubbing); it is kept out of repr so secrets never print.
    """

    port: int = DEFAULT_PORT
    bind: str = "127.0.0.1"
    auth_mode: str = "none"
    api_key: str = dataclasses.field(default="", repr=False)
    admin_key: str = dataclasses.field(default="", repr=False)
    anonymous_key: str = dataclasses.field(default="", repr=False)
    anonymous_key_expires: str = ""  # when the guest key stops working: a date/time or epoch seconds ("": never)
    claude_bin: str = ""
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_concurrent: int = 8
    max_queue: int = 16
    queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    cache_ttl_ms: int = 0
    max_prompt_chars: int = 0
    allowed_tools: str = ""
    system_prompt: str = ""
    no_context: bool = True
    home: str = ""
    user_home: str = ""
    upstream_base_url: str = ""
    default_model: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_images: int = DEFAULT_MAX_IMAGES
    allow_image_urls: bool = False
    socket_timeout_s: int = DEFAULT_SOCKET_TIMEOUT_S
    log_level: str = "INFO"
    timezone: str = ""
    allowed_hosts: Tuple[str, ...] = ()
    cors_origins: Tuple[str, ...] = ()
    advertise_anon_key: bool = False
    cache_max_entries: int = 500
    cache_max_bytes: int = 64 * 1024 * 1024
    plan_only: bool = False
    log_prompts: bool = False
    usage_retention_days: int = 400
    audit_retention_days: int = 400
    client_tools: bool = True
    tool_park_ttl_ms: int = 600_000
    tool_park_max: int = 0  # 0: as many as max_concurrent
    tool_park_max_per_key: int = 0  # 0: half of tool_park_max, at least 1
    tool_result_max_chars: int = 100_000
    plan_headers: bool = True
    pool: bool = True
    pool_max_mb: int = 0  # 0: derived from the machine's memory (default_pool_mb)
    pool_max_clis: int = 0  # 0: twice max_concurrent
    pool_idle_ttl_ms: int = 3_600_000
    pool_spare_after: int = 2  # conversations a key began with a configuration before a spare is kept for it
    max_connections: int = 0  # 0: derived from the open-files limit (connection_cap)
    wall_status: str = "auto"  # auto: each client its own final refusal (wall_for); 429: a plain 429 for all
    reserve_5h: int = 0  # percent of the 5-hour window kept for higher-priority keys (0: off)
    reserve_7d: int = 0
    alert_url: str = dataclasses.field(default="", repr=False)  # where alerts are POSTed ("": the audit log only)
    alert_thresholds: Tuple[str, ...] = ("80", "95")  # percent of a plan window that raises an alert
    environ: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), repr=False, compare=False)
    sources: Mapping[str, str] = dataclasses.field(  # field -> flag, env name, settings.json
        default_factory=lambda: types.MappingProxyType({}), repr=False, compare=False)

    @property
    def loopback(self) -> bool:
        return self.bind in LOOPBACK_BINDS or self.bind.startswith("127.")

    @property
    def spawn_dir(self) -> str:
        return os.path.join(self.home, "spawn")

    @property
    def settings_path(self) -> str:
        return os.path.join(self.home, "settings.json")

    @property
    def db_path(self) -> str:
        return os.path.join(self.home, "ocp.db")

    @property
    def alert_percents(self) -> Tuple[int, ...]:
        return tuple(sorted(int(t) for t in self.alert_thresholds))

    @property
    def anonymous_expires_at(self) -> int:
        """When the guest key stops working (epoch seconds; 0: never)."""
        return parse_time(self.anonymous_key_expires, "PROXY_ANONYMOUS_KEY_EXPIRES") if self.anonymous_key_expires else 0

    @property
    def tzinfo(self) -> Optional[datetime.tzinfo]:
        """The operator's time zone for quota windows; None is the machine's local zone."""
        if not self.timezone:
            return None
        import zoneinfo  # only when the operator names a zone: the daemon stays small
        return zoneinfo.ZoneInfo(self.timezone)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting, in one row: its Config field, environment variable, `serve` flag, kind, what
    `serve --help` says of it (with its unit), its bounds or choices, and — for one that may change
    while OCP runs (PATCH /settings, `ocp.py settings NAME VALUE`, settings.json) — its public name.

    Kinds: int and float (within `bounds`), str (one of `choices` when given), bool (1/0,
    true/false, yes/no, on/off), list (comma-separated), secret (environment only: never a flag,
    which the process list would show)."""

    field: str
    env: str
    flag: str
    kind: str
    help: str
    bounds: Optional[Tuple[float, float]] = None
    choices: Tuple[str, ...] = ()
    runtime: str = ""

    def parse(self, source: str, raw: str) -> Any:
        """`raw` (a flag's, a variable's text) as this setting's kind; ConfigError naming `source`."""
        raw = raw.strip()
        if self.kind == "list":
            return tuple(item.strip().lower() if self.field == "allowed_hosts" else item.strip()
                         for item in raw.split(",") if item.strip())
        if self.kind == "bool":
            if raw.lower() in TRUE_WORDS + FALSE_WORDS:
                return raw.lower() in TRUE_WORDS
            raise ConfigError(f"{source}={raw!r} is not a boolean (use 1/0, true/false)")
        if self.kind in ("int", "float"):
            if not re.fullmatch(r"-?[0-9]+" if self.kind == "int" else r"-?[0-9]+(\.[0-9]+)?", raw):
                raise ConfigError(f"{source}={raw!r} is not a {'whole ' if self.kind == 'int' else ''}number")
            value = int(raw) if self.kind == "int" else float(raw)
            if self.bounds and not self.bounds[0] <= value <= self.bounds[1]:
                raise ConfigError(f"{source}={value} is out of range {self.bounds[0]}..{self.bounds[1]}")
            return value
        if self.choices and raw not in self.choices:
            raise ConfigError(f"{source}={raw!r} is not one of {', '.join(self.choices)}")
        return raw

    def check(self, source: str, value: Any) -> Any:
        """A JSON value (PATCH /settings, settings.json) as this setting's kind; ConfigError."""
        if isinstance(value, bool):
            if self.kind != "bool":
                raise ConfigError(f"{source} must be {KIND_WORDS[self.kind]}")
            return value
        if isinstance(value, list) and self.kind == "list" and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        fits = {"int": (int, str), "float": (int, float, str), "bool": (int, str)}.get(self.kind, (str,))
        if not isinstance(value, fits):
            raise ConfigError(f"{source} must be {KIND_WORDS[self.kind]}")
        return self.parse(source, str(value))


KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
              "list": "a comma-separated string or a list of strings", "secret": "a string"}
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
HOUR_MS, DAY_MS = 3600 * 1000, 24 * 3600 * 1000

SETTINGS = (
    Setting("port", "CLAUDE_PROXY_PORT", "--port", "int", "TCP port", (0, 65535)),
    Setting("bind", "CLAUDE_BIND", "--bind", "str", "address to listen on (0.0.0.0 for the LAN)"),
    Setting("auth_mode", "CLAUDE_AUTH_MODE", "--auth-mode", "str", "none, shared or multi", choices=AUTH_MODES),
    Setting("api_key", "PROXY_API_KEY", "", "secret", "the shared key (shared mode)"),
    Setting("admin_key", "OCP_ADMIN_KEY", "", "secret", "the admin key (else OCP_HOME/admin-key)"),
    Setting("anonymous_key", "PROXY_ANONYMOUS_KEY", "", "secret", "the guest key (multi mode)"),
    Setting("anonymous_key_expires", "PROXY_ANONYMOUS_KEY_EXPIRES", "--anonymous-key-expires", "str",
            "when the guest key stops working: an ISO 8601 date/time or epoch seconds (unset: never)"),
    Setting("claude_bin", "CLAUDE_BIN", "--claude-bin", "str", "path of the claude executable"),
    Setting("timeout_ms", "CLAUDE_TIMEOUT", "--timeout", "int", "milliseconds for a whole request",
            (1000, DAY_MS), runtime="timeout"),
    Setting("max_concurrent", "CLAUDE_MAX_CONCURRENT", "--max-concurrent", "int", "CLI processes at once",
            (1, 256), runtime="maxConcurrent"),
    Setting("max_queue", "CLAUDE_MAX_QUEUE", "--max-queue", "int", "requests waiting for a slot", (0, 10_000),
            runtime="maxQueue"),
    Setting("queue_timeout_ms", "OCP_QUEUE_TIMEOUT", "--queue-timeout", "int",
            "milliseconds a request may wait for a slot", (100, HOUR_MS)),
    Setting("heartbeat_ms", "CLAUDE_HEARTBEAT_INTERVAL", "--heartbeat", "int",
            "milliseconds of stream silence before a keepalive (0 = off)", (0, 600_000), runtime="heartbeat"),
    Setting("cache_ttl_ms", "CLAUDE_CACHE_TTL", "--cache-ttl", "int",
            "milliseconds a cached answer stays valid (0 = cache off)", (0, 30 * DAY_MS), runtime="cacheTTL"),
    Setting("max_prompt_chars", "CLAUDE_MAX_PROMPT_CHARS", "--max-prompt-chars", "int",
            "prompt budget in characters (0 = the model's context window x 4)", (0, 1 << 31),
            runtime="maxPromptChars"),
    Setting("allowed_tools", "CLAUDE_ALLOWED_TOOLS", "--allowed-tools", "str",
            "Claude Code tools the CLI may run on this machine (comma list)"),
    Setting("system_prompt", "CLAUDE_SYSTEM_PROMPT", "--system-prompt", "str", "text appended to every system prompt"),
    Setting("no_context", "CLAUDE_NO_CONTEXT", "--no-context", "bool",
            "run the CLI in a scratch HOME, without the owner's CLAUDE.md, hooks and MCP servers"),
    Setting("home", "OCP_HOME", "--home", "str", "directory for OCP's database, keys, logs and scratch files"),
    Setting("upstream_base_url", "OCP_UPSTREAM_BASE_URL", "--upstream-base-url", "str",
            "ANTHROPIC_BASE_URL for the CLI (tests, gateways)"),
    Setting("default_model", "OCP_DEFAULT_MODEL", "--default-model", "str", "model for unknown model ids (unset: 400)"),
    Setting("max_body_bytes", "OCP_MAX_BODY_BYTES", "--max-body-bytes", "int", "request body cap in bytes",
            (1024, 1 << 30)),
    Setting("max_image_bytes", "OCP_MAX_IMAGE_BYTES", "--max-image-bytes", "int", "image cap in bytes",
            (1024, 1 << 28)),
    Setting("max_images", "OCP_MAX_IMAGES", "--max-images", "int", "images per request", (0, 100)),
    Setting("allow_image_urls", "OCP_ALLOW_IMAGE_URLS", "--allow-image-urls", "bool", "download http(s) image URLs"),
    Setting("socket_timeout_s", "OCP_SOCKET_TIMEOUT", "--socket-timeout", "int",
            "seconds an idle or slow client is kept", (1, 3600)),
    Setting("log_level", "OCP_LOG_LEVEL", "--log-level", "str", "DEBUG, INFO, WARNING or ERROR"),
    Setting("timezone", "OCP_TIMEZONE", "--timezone", "str", "time zone of quota windows (e.g. Europe/Berlin)"),
    Setting("allowed_hosts", "OCP_ALLOWED_HOSTS", "--allowed-hosts", "list",
            "extra host names browsers may use (comma list)"),
    Setting("cors_origins", "OCP_CORS_ORIGINS", "--cors-origins", "list",
            "web origins allowed to call OCP (comma list)"),
    Setting("advertise_anon_key", "PROXY_ADVERTISE_ANON_KEY", "--advertise-anon-key", "bool",
            "show the guest key in /health"),
    Setting("cache_max_entries", "OCP_CACHE_MAX_ENTRIES", "--cache-max-entries", "int", "cached answers kept",
            (1, 1_000_000)),
    Setting("cache_max_bytes", "OCP_CACHE_MAX_BYTES", "--cache-max-bytes", "int", "bytes of cached answers kept",
            (1024, 1 << 34)),
    Setting("plan_only", "OCP_PLAN_ONLY", "--plan-only", "bool", "refuse requests paid from extra usage",
            runtime="planOnly"),
    Setting("log_prompts", "OCP_LOG_PROMPTS", "--log-prompts", "bool", "log prompts and answers"),
    Setting("usage_retention_days", "OCP_USAGE_RETENTION_DAYS", "--usage-retention-days", "int",
            "days usage rows are kept one by one", (1, 36500)),
    Setting("audit_retention_days", "OCP_AUDIT_RETENTION_DAYS", "--audit-retention-days", "int",
            "days audit rows are kept", (1, 36500)),
    Setting("client_tools", "OCP_CLIENT_TOOLS", "--client-tools", "bool",
            "let clients' function tools reach the model (0: tools ignored, text only)"),
    Setting("tool_park_ttl_ms", "OCP_TOOL_PARK_TTL", "--tool-park-ttl", "int",
            "milliseconds a CLI waits parked for a client's tool results", (100, DAY_MS)),
    Setting("tool_park_max", "OCP_TOOL_PARK_MAX", "--tool-park-max", "int", "parked CLIs kept at most (0 = "
            "CLAUDE_MAX_CONCURRENT); the lowest priority, then the oldest goes first", (0, 1024)),
    Setting("tool_park_max_per_key", "OCP_TOOL_PARK_MAX_PER_KEY", "--tool-park-max-per-key", "int",
            "parked CLIs one key may keep (0 = half of OCP_TOOL_PARK_MAX, at least 1); its own oldest goes first",
            (0, 1024)),
    Setting("tool_result_max_chars", "OCP_TOOL_RESULT_MAX_CHARS", "--tool-result-max-chars", "int",
            "characters of one tool result passed to the model (longer: cut, marked)", (1000, 1 << 26)),
    Setting("plan_headers", "OCP_PLAN_HEADERS", "--plan-headers", "bool",
            "send the plan's use to Claude Code and Codex (anthropic-ratelimit-unified-*, x-codex-*)"),
    Setting("pool", "OCP_POOL", "--pool", "bool",
            "keep idle CLI processes warm for the next request, and conversations in their process"),
    Setting("pool_max_mb", "OCP_POOL_MAX_MB", "--pool-max-mb", "int", "MiB of memory the kept CLIs (pooled and "
            "parked) may use (0 = an eighth of the machine's, at least 256)", (0, 1 << 20)),
    Setting("pool_max_clis", "OCP_POOL_MAX_CLIS", "--pool-max-clis", "int",
            "idle CLIs the pool keeps at most, whatever their size (0 = 2 x CLAUDE_MAX_CONCURRENT)", (0, 1024)),
    Setting("pool_idle_ttl_ms", "OCP_POOL_IDLE_TTL", "--pool-idle-ttl", "int",
            "milliseconds an idle warm CLI is kept", (100, 7 * DAY_MS)),
    Setting("pool_spare_after", "OCP_POOL_SPARE_AFTER", "--pool-spare-after", "int", "conversations one key "
            "began with a configuration before a warm spare is kept for it (1: after any; 0: never a spare)",
            (0, 100)),
    Setting("max_connections", "OCP_MAX_CONNECTIONS", "--max-connections", "int", "client connections open at "
            "once (0 = half the open-files limit, 16 to 4096); past it the newest that never sent a keyed request "
            "close first, then members' idle ones", (0, 1 << 20)),
    Setting("wall_status", "OCP_WALL_STATUS", "--wall-status", "str", "auto: a refusal waiting will not fix (a "
            "quota, the plan, a model) is answered so each client stops and shows it; 429: a plain 429 for every "
            "client", choices=("auto", "429"), runtime="wallStatus"),
    Setting("reserve_5h", "OCP_RESERVE_5H", "--reserve-5h", "int", "percent of the 5-hour window kept back: "
            "low-priority keys wait past 100 minus it, normal ones past 100 minus half of it (0 = off)", (0, 100),
            runtime="reserve5h"),
    Setting("reserve_7d", "OCP_RESERVE_7D", "--reserve-7d", "int", "the same for the weekly window", (0, 100),
            runtime="reserve7d"),
    Setting("alert_url", "OCP_ALERT_URL", "", "secret", "http(s) URL alerts are POSTed to as JSON (it may hold a "
            "token: environment only)"),
    Setting("alert_thresholds", "OCP_ALERT_THRESHOLDS", "--alert-thresholds", "list",
            "percents of a plan window that raise an alert (comma list)"),
)
RUNTIME_SETTINGS = {s.runtime: s for s in SETTINGS if s.runtime}  # public name -> Setting


def digits(text: Any) -> bool:
    """True for a non-empty run of ASCII digits: str.isdigit() also takes '²', which int() refuses."""
    return isinstance(text, str) and re.fullmatch(r"[0-9]{1,18}", text) is not None


def load_config(environ: Mapping[str, str], flags: Optional[Mapping[str, Any]] = None) -> Config:
    """Build the Config: flag > env > OCP_HOME/settings.json > default; raise ConfigError."""
    flags = flags or {}
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for setting in SETTINGS:
        raw, source = flags.get(setting.field), setting.flag
        if raw is None and environ.get(setting.env, "") != "":
            raw, source = environ[setting.env], setting.env
        if setting.kind == "secret":
            values[setting.field] = (raw or "").strip()
        elif raw is not None:
            values[setting.field] = setting.parse(source, str(raw))
            sources[setting.field] = source
    user_home = environ.get("HOME") or os.path.expanduser("~")
    values["user_home"] = user_home
    values.setdefault("home", os.path.join(user_home, ".ocp"))
    if values["home"] == "~" or values["home"].startswith("~/"):
        values["home"] = user_home + values["home"][1:]
    values["home"] = os.path.abspath(values["home"])
    for name, value in read_settings_file(os.path.join(values["home"], "settings.json")).items():
        field = RUNTIME_SETTINGS[name].field
        if field not in values:
            values[field] = check_tunable(name, value)
            sources[field] = "settings.json"
    if "auth_mode" not in values:
        values["auth_mode"] = "shared" if values["api_key"] else "none"
    values["environ"] = types.MappingProxyType(dict(environ))
    values["sources"] = types.MappingProxyType(sources)
    config = Config(**values)
    validate_config(config)
    return config


def check_tunable(name: str, value: Any) -> Any:
    """Return a runtime setting's value as its kind; ConfigError naming the problem."""
    if name not in RUNTIME_SETTINGS:
        raise ConfigError(f"unknown setting {name!r}; known: {', '.join(RUNTIME_SETTINGS)}")
    return RUNTIME_SETTINGS[name].check(name, value)


def read_settings_file(path: str) -> Dict[str, Any]:
    """The operator's persisted runtime settings ({} when there are none)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); fix or delete it")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of settings")
    for name in data:
        check_tunable(name, data[name])
    return data


def write_settings_file(path: str, changes: Mapping[str, int]) -> None:
    """Merge `changes` into settings.json (0600), atomically."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    data = read_settings_file(path)
    data.update(changes)
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def settings_view(config: Config) -> Dict[str, Any]:
    """Every runtime setting with its value, where it came from and its range (or choices)."""
    view = {}
    for name, setting in RUNTIME_SETTINGS.items():
        bounds = setting.bounds or (None, None)
        view[name] = {"value": getattr(config, setting.field), "source": config.sources.get(setting.field, "default"),
                      "env": setting.env, "min": bounds[0], "max": bounds[1]}
        if setting.choices:
            view[name]["choices"] = list(setting.choices)
    return view


def validate_config(config: Config) -> None:
    """Raise ConfigError when the settings cannot make a safe daemon."""
    for setting in SETTINGS:
        if setting.choices and getattr(config, setting.field) not in setting.choices:
            raise ConfigError(f"{setting.env}={getattr(config, setting.field)!r} is not one of "
                              f"{', '.join(setting.choices)}")
    if config.auth_mode == "shared" and not config.api_key:
        raise ConfigError("CLAUDE_AUTH_MODE=shared needs PROXY_API_KEY")
    if config.allowed_tools and (config.auth_mode == "multi" or not config.loopback
                                 or config.anonymous_key):
        raise ConfigError("CLAUDE_ALLOWED_TOOLS lets callers run tools on this machine; it is "
                          "refused on a non-loopback bind, in multi mode or with an anonymous key")
    if config.timezone:
        try:
            config.tzinfo
        except (LookupError, ValueError):  # ZoneInfoNotFoundError is a KeyError
            raise ConfigError(f"OCP_TIMEZONE={config.timezone!r} is not a known time zone "
                              "(e.g. Europe/Berlin, America/New_York, UTC)")
    if not config.bind:
        raise ConfigError("CLAUDE_BIND is empty")
    try:
        config.anonymous_expires_at
    except ApiError:
        raise ConfigError(f"PROXY_ANONYMOUS_KEY_EXPIRES={config.anonymous_key_expires!r} is not an ISO 8601 "
                          "date/time (2027-01-31, 2027-01-31T18:00+01:00) or epoch seconds") from None
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"OCP_LOG_LEVEL={config.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    if config.upstream_base_url and not re.match(r"https?://", config.upstream_base_url):
        raise ConfigError("OCP_UPSTREAM_BASE_URL must start with http:// or https://")
    if config.alert_url and not re.match(r"https?://[^\s]+$", config.alert_url):
        raise ConfigError("OCP_ALERT_URL must be an http:// or https:// URL")
    if not all(digits(t) and 1 <= int(t) <= 100 for t in config.alert_thresholds):
        raise ConfigError(f"OCP_ALERT_THRESHOLDS={','.join(config.alert_thresholds)!r} must be percents from 1 to 100")


###############################################################################
# Errors ######################################################################
###############################################################################


class ApiError(Exception):
    """An answer in OpenAI's error shape; raise it from any depth."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, Any]] = None,
                 wall: bool = False, resets_at: int = 0):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, dict(headers or {})
        self.extra = dict(extra or {})
        self.wall = wall  # waiting will not fix it (a quota, the plan, a model refused): see wall_for
        self.resets_at = resets_at  # when a wall falls (epoch seconds; 0: it does not)

    def body(self) -> Dict[str, Any]:
        return {"error": dict({"message": self.message, "type": self.type,
                               "param": self.param, "code": self.code}, **self.extra)}


class ClientGone(Exception):
    """The HTTP client hung up; whatever it asked for is cancelled."""


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "unsupported_parameter", param)


GATEWAY_ADVICE = re.compile(r"\s*If it persists, check your inference gateway \([^)]*\)\.?")
ADDRESS_PATTERN = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)]+|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?|\[[0-9a-fA-F:]+\](?::\d+)?")
PATH_PATTERN = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@%+~-]+){2,}/?")


def scrub_paths(text: str) -> str:
    """Return `text` without file paths or network addresses, for messages that reach clients."""
    text = GATEWAY_ADVICE.sub("", text)
    return PATH_PATTERN.sub("<path>", ADDRESS_PATTERN.sub("<address>", text))


class RandomIds:
    """Hex ids (requests, responses, their items) from os.urandom bought 4 KiB at a time: a
    getrandom call per request was, at 8 connections, a GIL hand-off on every cheap route.
    Each thread has its own buffer (a shared one's lock was the next hand-off)."""

    def __init__(self, chunk: int = 4096):
        self._chunk = chunk
        self._mine = threading.local()

    def hex(self, nbytes: int) -> str:
        mine = self._mine
        buffer, at = getattr(mine, "buffer", b""), getattr(mine, "at", 0)
        if at + nbytes > len(buffer):
            buffer = mine.buffer = os.urandom(max(self._chunk, nbytes))
            at = 0
        mine.at = at + nbytes
        return buffer[at:at + nbytes].hex()


random_hex = RandomIds().hex


###############################################################################
# Models ######################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Model:
    id: str
    created: int
    context_window: int
    max_output: int
    aliases: Tuple[str, ...] = ()
    min_cli: str = ""  # the oldest claude CLI Anthropic serves it to ("": any)


class Models:
    """The registry from models.json: ids, aliases, limits."""

    def __init__(self, models: List[Model]):
        self.models = models
        self._by_name: Dict[str, Model] = {}
        for model in models:
            for name in (model.id,) + model.aliases:
                self._by_name[name.lower()] = model

    @classmethod
    def load(cls, path: str) -> "Models":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        models = [Model(m["id"], int(m["created"]), int(m["context_window"]),
                        int(m["max_output"]), tuple(m.get("aliases", ())), str(m.get("min_cli") or ""))
                  for m in data["models"]]
        return cls(models)

    def find(self, name: str) -> Optional[Model]:
        return self._by_name.get(name.strip().lower())

    def resolve(self, name: Any, fallback: str = "") -> Model:
        """Return the model for an id or alias; 400 listing the valid ids otherwise."""
        if not isinstance(name, str) or not name.strip():
            raise bad_request("'model' is required and must be a string", "model", "missing_model")
        model = self.find(name) or (self.find(fallback) if fallback else None)
        if model is None:
            ids = ", ".join(m.id for m in self.models)
            raise ApiError(400, f"Unknown model {name[:100]!r}. Valid ids: {ids} "
                           "(aliases: opus, sonnet, haiku).", "invalid_request_error",
                           "model_not_found", "model")
        return model


def version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"[0-9]+", text)[:3])


def cli_fits(model: Model, installed: str) -> bool:
    """Whether the installed claude CLI is new enough for the model (an unknown version is given the benefit)."""
    return not (model.min_cli and installed) or version_tuple(installed) >= version_tuple(model.min_cli)


def cli_too_old(model: Model, installed: str) -> ApiError:
    """The model needs a newer claude CLI than OCP's: waiting will not fix it, another model or an update will."""
    return ApiError(400, f"{model.id} needs the claude CLI {model.min_cli or 'in a newer version'} or newer; this OCP "
                    f"has {installed or 'an older one'}. On the OCP machine run `claude update` (or `npm i -g "
                    "@anthropic-ai/claude-code@latest`), or choose another model.", "invalid_request_error",
                    "claude_code_version_too_old", "model", wall=True)


def model_object(model: Model) -> Dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created,
            "owned_by": "anthropic", "context_window": model.context_window,
            "max_output_tokens": model.max_output, "aliases": list(model.aliases)}


###############################################################################
# Store #######################################################################
###############################################################################

KEY_PREFIX_CHARS = 8
KEY_NAME = re.compile(r"(?!\d+$)[^\x00-\x1f\x7f\s][^\x00-\x1f\x7f]{0,63}(?<!\s)")  # all digits would read as an id
PRIORITIES = ("low", "normal", "high")  # who waits first when the plan runs low (OCP_RESERVE_5H/7D)
TOKEN_GUESS = 100  # tokens reserved for a request before any answer gave a better estimate (Store.reserve)


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a per-key field's value is checked (the API's JSON), read from the command line and
    kept in its SQLite column."""

    expects: str  # what a refusal says the value must be
    accepts: Callable[[Any], bool]
    cli: Callable[[str], Any]  # the command line's text -> the JSON value (argparse's type)
    metavar: str = "N"
    sql: str = "INTEGER"  # the column's type, for a field added later (Store.add_key_columns)
    normalize: Callable[[Any, Any, float], Any] = lambda value, registry, now_s: value  # JSON -> the policy's
    load: Callable[[Any], Any] = lambda column: column  # the column -> the policy's value
    dump: Callable[[Any], Any] = lambda value: value  # the policy's value -> the column
    shown: Callable[[Any], Any] = lambda value: value  # the policy's value -> JSON
    cell: Callable[[Any], str] = lambda value: "-" if value is None else str(value)  # -> the `keys` table


def quota_value(text: str) -> Optional[int]:
    if text.lower() in ("none", "unlimited"):
        return None
    if not digits(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'none'")
    return int(text)


def cost_value(text: str) -> Optional[float]:
    if text.lower() in ("none", "unlimited"):
        return None
    if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,6})?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD (e.g. 2.50) or 'none'")
    return float(text)


def priority_value(text: str) -> str:
    if text not in PRIORITIES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(PRIORITIES)}")
    return text


def models_value(text: str) -> Optional[List[str]]:
    return None if text in ("all", "") else text.split(",")


def when_value(text: str) -> Optional[str]:
    return None if text.lower() in ("none", "never") else text


DURATION = re.compile(r"([0-9]{1,6})([mhdw])")
DURATION_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def moment(value: Any, name: str, now_s: float) -> int:
    """Epoch seconds from epoch seconds, a duration from now (30d, 12h, 90m, 2w) or an ISO 8601
    date/time (UTC unless it says otherwise); 400 naming `name`."""
    if type(value) is int:
        return value
    match = DURATION.fullmatch(str(value).strip().lower())
    if match:
        return int(now_s) + int(match.group(1)) * DURATION_S[match.group(2)]
    try:
        return parse_time(str(value), name)
    except ApiError:
        raise bad_request(f"'{name}' must be null (never), epoch seconds, a duration (30d, 12h) or an ISO 8601 "
                          "date/time", name) from None


def utc_time(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def local_time(epoch: Any) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def limit(number: Any, kinds: Tuple[type, ...]) -> bool:
    return number is None or (type(number) in kinds and 0 <= number <= 10 ** 12)


COUNT = Kind("null (unlimited) or a whole number >= 0", lambda v: limit(v, (int,)), quota_value)
USD = Kind("null (unlimited) or a number (USD) >= 0", lambda v: limit(v, (int, float)), cost_value, "USD", "REAL")
PRIORITY = Kind("one of " + ", ".join(PRIORITIES), lambda v: v in PRIORITIES, priority_value, "P",
                "TEXT NOT NULL DEFAULT 'normal'")
MODEL_LIST = Kind(
    "null (all models) or a list of model ids",
    lambda v: v is None or (isinstance(v, list) and all(isinstance(m, str) for m in v)), models_value, "A,B", "TEXT",
    normalize=lambda v, registry, now_s: None if v is None else tuple(sorted({registry.resolve(m).id for m in v})),
    load=lambda column: tuple(json.loads(column)) if column else None,
    dump=lambda value: json.dumps(list(value)) if value is not None else None,
    shown=lambda value: list(value) if value is not None else None,
    cell=lambda value: ",".join(value) if value is not None else "all")
WHEN = Kind("null (never), epoch seconds, a duration (30d, 12h) or an ISO 8601 date/time",
            lambda v: v is None or (type(v) is int and v >= 0) or isinstance(v, str), when_value, "30d|DATE",
            normalize=lambda v, registry, now_s: None if v is None else moment(v, "expires", now_s), cell=local_time)


def key_field(column: str, kind: Kind, heading: str, help: str, default: Any = None,
              window: Optional[Tuple[str, str, str]] = None) -> Any:
    """One row of KeyPolicy: its SQLite column, kind, `keys list` heading and help (the JSON name
    and the flag, --name-with-dashes, are the field's name); a quota's window is (period, the
    counter of Store.window_counts, unit)."""
    return dataclasses.field(default=default, metadata={"column": column, "kind": kind, "heading": heading,
                                                        "help": help, "window": window})


@dataclasses.dataclass(frozen=True)
class KeyPolicy:
    """What a key may do, one row per field. The admin command line's flags, the API's fields,
    their checks, the store's columns and the `keys list` table all come from these rows:
    a new per-key setting is one row here, and the code that acts on it."""

    priority: str = key_field("priority", PRIORITY, "PRIORITY", "who waits first when the plan runs low "
                              "(OCP_RESERVE_5H/7D); default normal", "normal")
    daily: Optional[int] = key_field("quota_daily", COUNT, "DAY", "requests a day", window=("day", "day", "requests"))
    weekly: Optional[int] = key_field("quota_weekly", COUNT, "WEEK", "requests a week",
                                      window=("week", "week", "requests"))
    monthly: Optional[int] = key_field("quota_monthly", COUNT, "MONTH", "requests a month",
                                       window=("month", "month", "requests"))
    tokens_daily: Optional[int] = key_field("quota_tokens_daily", COUNT, "TOKENS/DAY", "tokens a day",
                                            window=("day", "tokens_day", "tokens"))
    tokens_monthly: Optional[int] = key_field("quota_tokens_monthly", COUNT, "TOKENS/MONTH", "tokens a month",
                                              window=("month", "tokens_month", "tokens"))
    cost_daily: Optional[float] = key_field("quota_cost_daily", USD, "USD/DAY", "USD a day (list price)",
                                            window=("day", "cost_day", "USD"))
    cost_weekly: Optional[float] = key_field("quota_cost_weekly", USD, "", "USD a week (list price)",
                                             window=("week", "cost_week", "USD"))
    cost_monthly: Optional[float] = key_field("quota_cost_monthly", USD, "", "USD a month (list price)",
                                              window=("month", "cost_month", "USD"))
    models: Optional[Tuple[str, ...]] = key_field("models", MODEL_LIST, "MODELS", "allowed models ('all' = any)")
    expires: Optional[int] = key_field("expires_at", WHEN, "EXPIRES", "when the key stops working: a duration "
                                       "from now (30d, 12h) or a date/time ('none' = never)")

    def updated(self, body: Mapping[str, Any], registry: Any, now_s: float) -> "KeyPolicy":
        """This policy with a request's changes (JSON names; null clears a limit); 400 naming a field."""
        changes = {}
        for field in KEY_FIELDS:
            if field.name in body:
                kind = field.metadata["kind"]
                if not kind.accepts(body[field.name]):
                    raise bad_request(f"'{field.name}' must be {kind.expects}", field.name)
                changes[field.name] = kind.normalize(body[field.name], registry, now_s)
        unknown = set(body) - {f.name for f in KEY_FIELDS} - {"name"}
        if unknown:
            raise bad_request(f"Unknown field(s): {', '.join(sorted(unknown))[:200]}", sorted(unknown)[0],
                              "unknown_field")
        return dataclasses.replace(self, **changes)

    def as_json(self) -> Dict[str, Any]:
        return {f.name: f.metadata["kind"].shown(getattr(self, f.name)) for f in KEY_FIELDS}

    def columns(self) -> Dict[str, Any]:
        """The store's named parameters: one per column (KEY_COLUMNS_SQL)."""
        return {f.name: f.metadata["kind"].dump(getattr(self, f.name)) for f in KEY_FIELDS}

    @classmethod
    def from_row(cls, row: Any) -> "KeyPolicy":
        return cls(**{f.name: f.metadata["kind"].load(row[f.metadata["column"]]) for f in KEY_FIELDS})


KEY_FIELDS = dataclasses.fields(KeyPolicy)
QUOTA_PERIODS = tuple((f.name,) + f.metadata["window"] for f in KEY_FIELDS if f.metadata["window"])
QUOTA_FIELDS = tuple(field for field, *_ in QUOTA_PERIODS)


MIGRATION_1 = (
    """CREATE TABLE keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER,
        quota_daily INTEGER, quota_weekly INTEGER, quota_monthly INTEGER,
        quota_tokens_daily INTEGER, quota_tokens_monthly INTEGER,
        models TEXT)""",
    """CREATE TABLE usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id INTEGER REFERENCES keys(id),
        key_name TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        http_status INTEGER,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        ttft_ms INTEGER,
        duration_ms INTEGER,
        request_id TEXT,
        created_at INTEGER NOT NULL)""",
    "CREATE INDEX usage_by_key_time ON usage(key_id, created_at)",
    "CREATE INDEX usage_by_time ON usage(created_at)",
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        detail TEXT)""",
)

LEGACY_TABLES = ("usage_log", "response_cache", "api_keys")  # the Node original's, in drop order
MIGRATION_2 = (
    """CREATE TABLE cache (
        hash TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        model TEXT NOT NULL,
        answer TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX cache_by_use ON cache(used_at)",
    "CREATE TABLE state (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

MIGRATION_3 = (
    """CREATE TABLE usage_daily (
        day INTEGER NOT NULL,
        key_id INTEGER REFERENCES keys(id),
        key_name TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL)""",
    "CREATE INDEX usage_daily_by_day ON usage_daily(day)",
    "CREATE INDEX audit_by_time ON audit(at)",
)

MIGRATION_4 = (
    "ALTER TABLE keys ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal'",
    "ALTER TABLE keys ADD COLUMN quota_cost_daily REAL",
    "ALTER TABLE keys ADD COLUMN quota_cost_weekly REAL",
    "ALTER TABLE keys ADD COLUMN quota_cost_monthly REAL",
)

SELECT_LEGACY_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('api_keys', 'usage_log', 'response_cache')"
SELECT_LEGACY_KEYS = "SELECT * FROM legacy_api_keys ORDER BY id"
SELECT_LEGACY_USAGE = "SELECT * FROM legacy_usage_log ORDER BY id"
INSERT_MIGRATED_USAGE = """INSERT INTO usage (key_id, key_name, model, status, duration_ms, created_at)
    VALUES (?, ?, ?, ?, ?, ?)"""
INSERT_LEGACY_KEY = """INSERT INTO keys (name, key_hash, prefix, created_at, revoked_at, quota_daily, quota_weekly,
    quota_monthly, quota_tokens_daily, quota_tokens_monthly, models)
    VALUES (:name, :key_hash, :prefix, :created_at, :revoked_at, :daily, :weekly, :monthly,
            :tokens_daily, :tokens_monthly, :models)"""
INSERT_KEY = f"""INSERT INTO keys (name, key_hash, prefix, created_at, revoked_at,
    {", ".join(f.metadata["column"] for f in KEY_FIELDS)})
    VALUES (:name, :key_hash, :prefix, :created_at, :revoked_at, {", ".join(":" + f.name for f in KEY_FIELDS)})"""
UPDATE_KEY_POLICY = f"""UPDATE keys SET {", ".join(f'{f.metadata["column"]} = :{f.name}' for f in KEY_FIELDS)}
    WHERE id = :id"""
SELECT_KEYS = "SELECT * FROM keys ORDER BY id"
SELECT_KEY_BY_ID = "SELECT * FROM keys WHERE id = ?"
SELECT_KEY_BY_NAME = "SELECT * FROM keys WHERE name = ?"
SELECT_KEY_BY_HASH = "SELECT * FROM keys WHERE key_hash = ?"
REVOKE_KEY = "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
COUNTED = "status IN ('ok', 'partial', 'pending')"  # a pending row holds its request's estimate until it ends
COUNT_WINDOW_USAGE = f"""SELECT
    COALESCE(SUM(created_at >= :day AND {COUNTED}), 0) AS day,
    COALESCE(SUM(created_at >= :week AND {COUNTED}), 0) AS week,
    COALESCE(SUM(created_at >= :month AND {COUNTED}), 0) AS month,
    COALESCE(SUM(CASE WHEN created_at >= :day AND {COUNTED} THEN prompt_tokens + completion_tokens END), 0)
        AS tokens_day,
    COALESCE(SUM(CASE WHEN created_at >= :month AND {COUNTED} THEN prompt_tokens + completion_tokens END), 0)
        AS tokens_month,
    COALESCE(SUM(CASE WHEN created_at >= :day AND {COUNTED} THEN cost_usd END), 0) AS cost_day,
    COALESCE(SUM(CASE WHEN created_at >= :week AND {COUNTED} THEN cost_usd END), 0) AS cost_week,
    COALESCE(SUM(CASE WHEN created_at >= :month AND {COUNTED} THEN cost_usd END), 0) AS cost_month
    FROM usage WHERE key_id = :key_id AND created_at >= :earliest"""
SELECT_KEY_RECENT = """SELECT AVG(prompt_tokens + completion_tokens) AS tokens, AVG(cost_usd) AS cost FROM (
    SELECT prompt_tokens, completion_tokens, cost_usd FROM usage
    WHERE key_id = ? AND status = 'ok' ORDER BY created_at DESC LIMIT 20)"""  # (usage_by_key_time)
SELECT_ANYONE_RECENT = """SELECT AVG(prompt_tokens + completion_tokens) AS tokens, AVG(cost_usd) AS cost FROM (
    SELECT prompt_tokens, completion_tokens, cost_usd FROM usage WHERE status = 'ok' ORDER BY id DESC LIMIT 20)"""
INSERT_PENDING_USAGE = """INSERT INTO usage (key_id, key_name, model, status, request_id, created_at,
    prompt_tokens, completion_tokens, cost_usd) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?)"""
FINISH_USAGE = """UPDATE usage SET status = ?, http_status = ?, prompt_tokens = ?, completion_tokens = ?,
    cached_tokens = ?, cost_usd = ?, ttft_ms = ?, duration_ms = ? WHERE id = ?"""
CANCEL_STALE_PENDING = "UPDATE usage SET status = 'cancelled' WHERE status = 'pending'"
SELECT_USAGE_ROWS = """SELECT id, key_name, model, status, http_status, prompt_tokens, completion_tokens,
    cached_tokens, cost_usd, ttft_ms, duration_ms, request_id, created_at FROM usage
    WHERE (:everyone OR (key_id IS :key_id AND key_name = :key_name))
      AND created_at >= :since AND created_at < :until
    ORDER BY id DESC LIMIT :limit"""
SELECT_USAGE_BY_KEY = """SELECT key_id, key_name, SUM(requests) AS requests, SUM(ok) AS ok, SUM(errors) AS errors,
    SUM(cancelled) AS cancelled, SUM(cached) AS cached, SUM(refused) AS refused, SUM(prompt_tokens) AS prompt_tokens,
    SUM(completion_tokens) AS completion_tokens, ROUND(SUM(cost_usd), 4) AS cost_usd,
    CAST(AVG(duration_ms) AS INTEGER) AS avg_ms, MAX(at) AS last_at FROM (
        SELECT key_id, key_name, 1 AS requests, status IN ('ok', 'partial') AS ok, status = 'error' AS errors,
            status = 'cancelled' AS cancelled, status = 'cached' AS cached, status = 'refused' AS refused,
            prompt_tokens, completion_tokens, cost_usd, duration_ms, created_at AS at
        FROM usage WHERE created_at >= :since AND created_at < :until
        UNION ALL
        SELECT key_id, key_name, requests, CASE WHEN status IN ('ok', 'partial') THEN requests ELSE 0 END,
            CASE WHEN status = 'error' THEN requests ELSE 0 END,
            CASE WHEN status = 'cancelled' THEN requests ELSE 0 END,
            CASE WHEN status = 'cached' THEN requests ELSE 0 END,
            CASE WHEN status = 'refused' THEN requests ELSE 0 END, prompt_tokens, completion_tokens,
            cost_usd, NULL, day
        FROM usage_daily WHERE day >= :since AND day < :until)
    GROUP BY key_id, key_name ORDER BY requests DESC"""
INSERT_REFUSED_USAGE = """INSERT INTO usage (key_id, key_name, model, status, http_status, request_id, created_at)
    VALUES (?, ?, ?, 'refused', ?, ?, ?)"""
INSERT_CACHED_USAGE = """INSERT INTO usage (key_id, key_name, model, status, http_status, prompt_tokens,
    completion_tokens, cached_tokens, duration_ms, request_id, created_at)
    VALUES (?, ?, ?, 'cached', 200, ?, ?, ?, ?, ?, ?)"""
SELECT_CACHE_ANSWER = "SELECT answer FROM cache WHERE hash = ? AND expires_at > ?"
TOUCH_CACHE = "UPDATE cache SET used_at = ?, hits = hits + 1 WHERE hash = ?"
UPSERT_CACHE = """INSERT INTO cache (hash, owner, model, answer, bytes, created_at, expires_at, used_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(hash) DO UPDATE SET answer = excluded.answer, bytes = excluded.bytes,
        created_at = excluded.created_at, expires_at = excluded.expires_at, used_at = excluded.used_at"""
DELETE_EXPIRED_CACHE = "DELETE FROM cache WHERE expires_at <= ?"
SELECT_CACHE_TOTALS = "SELECT COUNT(*) AS entries, COALESCE(SUM(bytes), 0) AS bytes, COALESCE(SUM(hits), 0) AS hits FROM cache"
DELETE_LEAST_USED_CACHE = "DELETE FROM cache WHERE hash = (SELECT hash FROM cache ORDER BY used_at, created_at LIMIT 1)"
DELETE_ALL_CACHE = "DELETE FROM cache"
SELECT_STATE = "SELECT value FROM state WHERE name = ?"
UPSERT_STATE = "INSERT INTO state (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"
FOLD_OLD_USAGE = """INSERT INTO usage_daily (day, key_id, key_name, model, status, requests, prompt_tokens,
    completion_tokens, cached_tokens, cost_usd)
    SELECT created_at / 86400 * 86400, key_id, key_name, model, status, COUNT(*), SUM(prompt_tokens),
        SUM(completion_tokens), SUM(cached_tokens), SUM(cost_usd)
    FROM usage WHERE created_at < ? AND status != 'pending'
    GROUP BY created_at / 86400, key_id, key_name, model, status"""
DELETE_OLD_USAGE = "DELETE FROM usage WHERE created_at < ? AND status != 'pending'"
DELETE_OLD_AUDIT = "DELETE FROM audit WHERE at < ?"
INSERT_AUDIT = "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"
SELECT_AUDIT = "SELECT * FROM audit ORDER BY id DESC LIMIT ?"
SELECT_MODEL_STATS = """SELECT model, COUNT(*) AS requests, SUM(status = 'error') AS errors,
    SUM(http_status = 504) AS timeouts, SUM(status = 'cached') AS cached,
    CAST(AVG(CASE WHEN status = 'ok' THEN duration_ms END) AS INTEGER) AS avg_ms,
    MAX(CASE WHEN status = 'ok' THEN duration_ms END) AS max_ms,
    CAST(AVG(CASE WHEN status = 'ok' THEN ttft_ms END) AS INTEGER) AS avg_ttft_ms,
    SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,
    ROUND(SUM(cost_usd), 4) AS cost_usd
    FROM usage WHERE created_at >= ? GROUP BY model ORDER BY requests DESC"""
SELECT_STATUS_COUNTS = "SELECT status, COUNT(*) AS n FROM usage WHERE created_at >= ? GROUP BY status"
SELECT_USAGE_SERIES = """SELECT (created_at - :since) / :bucket AS slot, COUNT(*) AS requests,
    SUM(status = 'error') AS errors, CAST(AVG(CASE WHEN status = 'ok' THEN duration_ms END) AS INTEGER) AS avg_ms,
    CAST(AVG(CASE WHEN status = 'ok' THEN ttft_ms END) AS INTEGER) AS avg_ttft_ms
    FROM usage WHERE created_at >= :since AND (:key_id IS NULL OR key_id = :key_id) GROUP BY slot"""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    created_at: int
    revoked_at: Optional[int]
    policy: KeyPolicy

    @classmethod
    def from_row(cls, row: Any) -> "ApiKey":
        return cls(row["id"], row["name"], row["prefix"], row["created_at"], row["revoked_at"],
                   KeyPolicy.from_row(row))

    @property
    def priority(self) -> str:
        return self.policy.priority

    @property
    def models(self) -> Optional[Tuple[str, ...]]:
        return self.policy.models

    def status(self, now_s: float) -> str:
        """"active", or why the key opens OCP no more ("revoked", "expired")."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.policy.expires is not None and now_s >= self.policy.expires else "active"

    def usable(self, now_s: float) -> bool:
        """Whether the key opens OCP at `now_s`: the one test of every place that admits a key
        (its secret, a dashboard session) or counts the live ones."""
        return self.status(now_s) == "active"

    def public(self, now_s: float) -> Dict[str, Any]:
        """The key as admin routes show it: never the secret. Its quotas (and, as always, its
        priority) under "quota"; every other policy field beside them."""
        policy = self.policy.as_json()
        return dict({"id": self.id, "name": self.name, "prefix": self.prefix, "created_at": self.created_at,
                     "revoked_at": self.revoked_at, "status": self.status(now_s),
                     "quota": {name: policy[name] for name in QUOTA_FIELDS + ("priority",)}},
                    **{name: value for name, value in policy.items() if name not in QUOTA_FIELDS})


class QuotaExceeded(Exception):
    def __init__(self, breach: Dict[str, Any]):
        super().__init__(breach["period"])
        self.breach = breach


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key_secret() -> str:
    return "ocp_" + secrets.token_urlsafe(24)  # 32 url-safe characters


def sqlite_time(text: Any) -> int:
    """Return epoch seconds for the original's `datetime('now')` text (UTC)."""
    try:
        return int(calendar.timegm(time.strptime(str(text)[:19], "%Y-%m-%d %H:%M:%S")))
    except ValueError:
        return 0


@dataclasses.dataclass
class Usage:
    """What an answer used, in no wire format's terms (each encoder renders its own)."""

    input: int = 0  # prompt tokens read fresh
    output: int = 0
    cache_read: int = 0  # prompt tokens read from Anthropic's prompt cache
    cache_write: int = 0  # prompt tokens written to it
    cost_usd: float = 0.0  # the CLI's estimate

    @property
    def prompt(self) -> int:
        """Every prompt token, cached or not (OpenAI's prompt_tokens)."""
        return self.input + self.cache_read + self.cache_write

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.input + other.input, self.output + other.output, self.cache_read + other.cache_read,
                     self.cache_write + other.cache_write, self.cost_usd + other.cost_usd)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Usage":
        """Usage from `dataclasses.asdict` (the cache); missing fields are 0."""
        return cls(**{f.name: data.get(f.name) or 0 for f in dataclasses.fields(cls)})


class Store:
    """OCP's SQLite database: keys (hashed), usage (which doubles as quota reservations), audit.

    One connection, one lock: every statement runs through `_execute` with the
    lock held, and a read-modify-write (reserving quota) is one method inside
    one IMMEDIATE transaction. Thread-safe.
    """

    def __init__(self, path: str):
        self.path = path
        self.legacy_imported = False
        self._lock = threading.RLock()
        fresh = not os.path.exists(path)
        if fresh:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self.db.row_factory = sqlite3.Row
        self._execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL cannot corrupt the file; a power cut may lose the last usage rows,
        # which beats an fsync per request on a Raspberry Pi's SD card.
        self._execute("PRAGMA synchronous = NORMAL")
        self._execute("PRAGMA foreign_keys = ON")
        self._execute("PRAGMA busy_timeout = 10000")
        self.migrate()
        tighten(path, 0o600)

    def _execute(self, sql: str, params: Any = ()) -> List[Any]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- schema ----------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION; each step and its version bump in one transaction."""
        version = self._execute("PRAGMA user_version")[0][0]
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                step(self)
                self._execute(f"PRAGMA user_version = {int(number)}")
        with self.transaction():
            self.add_key_columns()
        if self.legacy_imported:
            self.scrub_free_pages()

    def add_key_columns(self) -> None:
        """A KeyPolicy field newer than the numbered migrations gets its column (its kind's SQL type,
        NULL or its default for the keys already there): a new per-key field needs no migration."""
        have = {row["name"] for row in self._execute("PRAGMA table_info(keys)")}
        for field in KEY_FIELDS:
            if field.metadata["column"] not in have:
                self._execute(f"ALTER TABLE keys ADD COLUMN {field.metadata['column']} {field.metadata['kind'].sql}")

    def create_schema_2(self) -> None:
        for statement in MIGRATION_2:
            self._execute(statement)

    def create_schema_3(self) -> None:
        for statement in MIGRATION_3:
            self._execute(statement)

    def create_schema_4(self) -> None:
        for statement in MIGRATION_4:
            self._execute(statement)

    def create_schema_1(self) -> None:
        legacy = {row[0] for row in self._execute(SELECT_LEGACY_TABLES)}
        if "api_keys" in legacy:
            self._execute("PRAGMA secure_delete = ON")
            for name in legacy:
                self._execute(f"ALTER TABLE {name} RENAME TO legacy_{name}")
        for statement in MIGRATION_1:
            self._execute(statement)
        if "api_keys" in legacy:
            self.import_legacy(legacy)

    def import_legacy(self, legacy: set) -> None:
        """Take over the Node original's database: keys hashed, history kept, plaintext gone."""
        ids: Dict[int, int] = {}
        taken: set = set()
        for row in self._execute(SELECT_LEGACY_KEYS):
            old = dict(row)  # older releases lack some columns (quotas, revoked)
            name = unique_name(str(old.get("name") or "key"), taken)
            created = sqlite_time(old.get("created_at"))
            self._execute(INSERT_LEGACY_KEY, {
                "name": name, "key_hash": hash_key(old["key"]), "prefix": old["key"][:KEY_PREFIX_CHARS],
                "created_at": created, "revoked_at": created if old.get("revoked") else None,
                "daily": old.get("quota_daily"), "weekly": old.get("quota_weekly"),
                "monthly": old.get("quota_monthly"), "tokens_daily": None, "tokens_monthly": None,
                "models": None})
            ids[row["id"]] = self._execute("SELECT last_insert_rowid()")[0][0]
        if "usage_log" in legacy:
            for row in self._execute(SELECT_LEGACY_USAGE):
                old = dict(row)
                self._execute(INSERT_MIGRATED_USAGE, (
                    ids.get(old.get("key_id")), old.get("key_name") or "anonymous", old.get("model") or "?",
                    "ok" if old.get("success", 1) else "error", old.get("elapsed_ms"),
                    sqlite_time(old.get("created_at"))))
        for name in LEGACY_TABLES:  # usage_log refers to api_keys: children first
            if name in legacy:
                self._execute(f"DROP TABLE legacy_{name}")
        self._execute(INSERT_AUDIT, (int(time.time()), "ocp", "migrate", "ocp.db",
                                     f"imported {len(ids)} keys from the Node original"))
        self.legacy_imported = True

    def scrub_free_pages(self) -> None:
        """Rewrite the file so no page of the old plaintext keys survives anywhere in it."""
        with self._lock:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- keys ------------------------------------------------------------------

    def add_key(self, name: str, policy: KeyPolicy, now_s: float) -> Tuple[ApiKey, str]:
        """Create a key; return it and its secret, which is shown once and never stored."""
        secret = new_key_secret()
        try:
            with self.transaction():
                self._execute(INSERT_KEY, dict(policy.columns(), name=name, key_hash=hash_key(secret), revoked_at=None,
                                               prefix=secret[:KEY_PREFIX_CHARS], created_at=int(now_s)))
                row = self._execute(SELECT_KEY_BY_NAME, (name,))[0]
        except sqlite3.IntegrityError:
            raise ApiError(409, f"A key named {name!r} already exists.", code="key_exists", param="name")
        return ApiKey.from_row(row), secret

    def keys(self) -> List[ApiKey]:
        return [ApiKey.from_row(row) for row in self._execute(SELECT_KEYS)]

    def find_key(self, ref: str) -> ApiKey:
        """Return the key with id `ref` (all digits) or named `ref` (names are never all digits)."""
        ref = str(ref).strip()
        rows = self._execute(SELECT_KEY_BY_ID if digits(ref) else SELECT_KEY_BY_NAME,
                             (int(ref) if digits(ref) else ref,))
        if not rows:
            raise ApiError(404, f"No key named {ref[:64]!r}.", code="key_not_found")
        return ApiKey.from_row(rows[0])

    def key_with_secret(self, secret: str) -> Optional[ApiKey]:
        """Return the key a presented secret belongs to, usable or not (constant-time compare of the hash)."""
        digest = hash_key(secret)
        rows = self._execute(SELECT_KEY_BY_HASH, (digest,))
        if not rows or not hmac.compare_digest(rows[0]["key_hash"], digest):
            return None
        return ApiKey.from_row(rows[0])

    def key_by_secret(self, secret: str, now_s: float) -> Optional[ApiKey]:
        """Return the usable key for a presented secret."""
        key = self.key_with_secret(secret)
        return key if key is not None and key.usable(now_s) else None

    def revoke_key(self, key: ApiKey, now_s: float) -> bool:
        with self.transaction():
            self._execute(REVOKE_KEY, (int(now_s), key.id))
            return self._execute("SELECT changes()")[0][0] > 0

    def set_policy(self, key: ApiKey, policy: KeyPolicy) -> ApiKey:
        with self.transaction():
            self._execute(UPDATE_KEY_POLICY, dict(policy.columns(), id=key.id))
            return ApiKey.from_row(self._execute(SELECT_KEY_BY_ID, (key.id,))[0])

    # -- usage -----------------------------------------------------------------

    def window_counts(self, key: ApiKey, bounds: Dict[str, Tuple[int, int]]) -> Dict[str, int]:
        starts = {p: bounds[p][0] for p in ("day", "week", "month")}
        row = self._execute(COUNT_WINDOW_USAGE, dict(starts, key_id=key.id, earliest=min(starts.values())))[0]
        return dict(row)

    def reserve(self, key: Optional[ApiKey], name: str, model: str, request_id: str, now_s: float,
                bounds: Dict[str, Tuple[int, int]], floor_tokens: int = 0) -> Tuple[int, Dict[str, Any]]:
        """Admit one request against the key's quotas; return (usage row id, counts after it).

        Counting and the pending row happen in one IMMEDIATE transaction, so N
        concurrent requests against R remaining admit exactly R. The pending row holds
        the request's estimate — the key's average of its last 20 answers (TOKEN_GUESS
        tokens before it has one), at least `floor_tokens` (the prompt and max_tokens) —
        until `finish` puts the real figures: token and cost quotas hold under
        concurrency up to what requests use beyond their estimates. Raises QuotaExceeded.
        (Before a key has answers, everyone's last 20 are its estimate; a key without token or
        cost quotas needs none.)
        """
        with self.transaction():
            counts = self.window_counts(key, bounds) if key else {}
            metered = key is not None and any(getattr(key.policy, f) is not None for f, _, _, unit in QUOTA_PERIODS
                                              if unit != "requests")
            estimate = self.estimate(key, floor_tokens) if metered else {"tokens": 0, "USD": 0.0}
            breach = quota_breach(key, counts, bounds, estimate) if key else None
            if breach:
                raise QuotaExceeded(breach)
            self._execute(INSERT_PENDING_USAGE, (key.id if key else None, name, model, request_id, int(now_s),
                                                 int(estimate["tokens"]), 0, estimate["USD"]))
            row_id = self._execute("SELECT last_insert_rowid()")[0][0]
        for period in ("day", "week", "month"):
            if period in counts:
                counts[period] += 1
        return row_id, counts

    def estimate(self, key: ApiKey, floor_tokens: int) -> Dict[str, float]:
        recent = self._execute(SELECT_KEY_RECENT, (key.id,))[0]
        if recent["tokens"] is None:
            recent = self._execute(SELECT_ANYONE_RECENT)[0]
        tokens = recent["tokens"] if recent["tokens"] is not None else TOKEN_GUESS
        return {"tokens": max(int(tokens), floor_tokens), "USD": round(float(recent["cost"] or 0), 6)}

    def finish(self, row_id: int, status: str, http_status: int, usage: Optional[Usage] = None,
               ttft_ms: Optional[int] = None, duration_ms: int = 0) -> None:
        """Record how an admitted request ended; error and cancelled rows stop counting."""
        usage = usage or Usage()
        self._execute(FINISH_USAGE, (status, http_status, usage.prompt, usage.output, usage.cache_read,
                                     usage.cost_usd, ttft_ms, duration_ms, row_id))

    def cancel_stale(self) -> None:
        """Reservations of a daemon that died are released at the next start."""
        self._execute(CANCEL_STALE_PENDING)

    def usage_rows(self, key_id: Optional[int], key_name: Optional[str], since: int, until: int,
                   limit: int) -> List[Dict[str, Any]]:
        """Rows of one caller (key id, or a keyless caller's name), or everyone's when key_name is None."""
        rows = self._execute(SELECT_USAGE_ROWS, {"everyone": key_name is None, "key_id": key_id,
                                                 "key_name": key_name, "since": since, "until": until,
                                                 "limit": limit})
        return [dict(row) for row in rows]

    def usage_by_key(self, since: int, until: int) -> List[Dict[str, Any]]:
        return [dict(row) for row in self._execute(SELECT_USAGE_BY_KEY, {"since": since, "until": until})]

    def record_refusal(self, key: Optional[ApiKey], name: str, model: str, request_id: str, http_status: int,
                       now_s: float) -> None:
        """A known caller's request refused before admission (400, 403, 429): it counts against
        nothing, but the owner sees who is being turned away."""
        self._execute(INSERT_REFUSED_USAGE, (key.id if key else None, name, model, http_status, request_id, int(now_s)))

    def record_cached(self, key: Optional[ApiKey], name: str, model: str, request_id: str,
                      usage: Usage, duration_ms: int, now_s: float) -> None:
        """Log a cache hit: a finished row that counts against no quota."""
        self._execute(INSERT_CACHED_USAGE, (key.id if key else None, name, model, usage.prompt, usage.output,
                                            usage.cache_read, duration_ms, request_id, int(now_s)))

    # -- response cache ------------------------------------------------------------

    def cache_get(self, digest: str, now_s: float) -> Optional[Dict[str, Any]]:
        with self.transaction():
            rows = self._execute(SELECT_CACHE_ANSWER, (digest, int(now_s)))
            if rows:
                self._execute(TOUCH_CACHE, (int(now_s), digest))
        return json.loads(rows[0]["answer"]) if rows else None

    def cache_put(self, digest: str, owner: str, model: str, answer: Dict[str, Any], now_s: float,
                  ttl_s: float, max_entries: int, max_bytes: int) -> None:
        """Store an answer; expired rows go first, then the least recently used past the bounds."""
        text = json.dumps(answer, ensure_ascii=False)
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            return
        with self.transaction():
            self._execute(DELETE_EXPIRED_CACHE, (int(now_s),))
            self._execute(UPSERT_CACHE, (digest, owner, model, text, size, int(now_s), int(now_s + ttl_s), int(now_s)))
            while True:
                totals = self._execute(SELECT_CACHE_TOTALS)[0]
                if totals["entries"] <= max_entries and totals["bytes"] <= max_bytes:
                    break
                self._execute(DELETE_LEAST_USED_CACHE)

    def cache_totals(self, now_s: float) -> Dict[str, int]:
        self._execute(DELETE_EXPIRED_CACHE, (int(now_s),))
        return dict(self._execute(SELECT_CACHE_TOTALS)[0])

    def cache_clear(self) -> int:
        with self.transaction():
            count = self._execute(SELECT_CACHE_TOTALS)[0]["entries"]
            self._execute(DELETE_ALL_CACHE)
        return count

    # -- small persistent state (plan windows) --------------------------------------

    def load_state(self, name: str) -> Optional[Any]:
        rows = self._execute(SELECT_STATE, (name,))
        return json.loads(rows[0]["value"]) if rows else None

    def save_state(self, name: str, value: Any) -> None:
        self._execute(UPSERT_STATE, (name, json.dumps(value)))

    def audit(self, actor: str, action: str, target: str, detail: str, now_s: float) -> None:
        self._execute(INSERT_AUDIT, (int(now_s), actor, action, target, detail))

    def model_stats(self, since: int) -> List[Dict[str, Any]]:
        return [dict(row) for row in self._execute(SELECT_MODEL_STATS, (since,))]

    def usage_series(self, since: int, bucket_s: int, buckets: int, key_id: Optional[int]) -> List[Dict[str, Any]]:
        """Requests, errors, mean latency and TTFT per time bucket, oldest first, gaps as zeros."""
        rows = {row["slot"]: dict(row) for row in self._execute(
            SELECT_USAGE_SERIES, {"since": since, "bucket": bucket_s, "key_id": key_id})}
        empty = {"requests": 0, "errors": 0, "avg_ms": None, "avg_ttft_ms": None}
        return [dict(rows.get(i, empty), t=since + i * bucket_s, slot=i) for i in range(buckets)]

    def status_counts(self, since: int) -> Dict[str, int]:
        return {row["status"]: row["n"] for row in self._execute(SELECT_STATUS_COUNTS, (since,))}

    def prune(self, now_s: float, usage_days: int, audit_days: int) -> Tuple[int, int]:
        """Fold usage rows older than `usage_days` into daily totals and drop audit rows older than
        `audit_days`; return (usage rows folded, audit rows dropped). Totals are never lost."""
        usage_cutoff, audit_cutoff = int(now_s) - usage_days * 86400, int(now_s) - audit_days * 86400
        with self.transaction():
            self._execute(FOLD_OLD_USAGE, (usage_cutoff,))
            self._execute(DELETE_OLD_USAGE, (usage_cutoff,))
            folded = self._execute("SELECT changes()")[0][0]
            self._execute(DELETE_OLD_AUDIT, (audit_cutoff,))
            dropped = self._execute("SELECT changes()")[0][0]
        return folded, dropped

    def audit_trail(self, limit: int = 50) -> List[Dict[str, Any]]:
        return [dict(row) for row in self._execute(SELECT_AUDIT, (limit,))]


MIGRATIONS: Tuple[Callable[[Store], None], ...] = (Store.create_schema_1, Store.create_schema_2,
                                                   Store.create_schema_3, Store.create_schema_4)


def unique_name(name: str, taken: set) -> str:
    """Return `name`, or `name-2`, `name-3`…: the original allowed duplicate names."""
    base = name.strip()[:56] or "key"
    if not KEY_NAME.fullmatch(base):
        base = "key-" + re.sub(r"[\x00-\x1f\x7f]", "-", base)[:52]
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


def tighten(path: str, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as e:
        log.warning("cannot set mode %o on %s: %s", mode, path, e.strerror)


###############################################################################
# Auth & quotas ###############################################################
###############################################################################

PERIOD_WORDS = {"day": "today", "week": "this week", "month": "this month"}


RESERVED_KEY_NAMES = ("admin", "anonymous", "shared", "local", "public")  # the built-in callers' names


def account_label(key_id: Optional[int], name: str) -> str:
    """A key's name, or "name#id" for a key made before its name was reserved: its figures never
    merge with the built-in caller's of that name."""
    return f"{name}#{key_id}" if key_id is not None and name.lower() in RESERVED_KEY_NAMES else name


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is asking: a key from the store, the shared or anonymous key, the admin, or nobody."""

    name: str
    key: Optional[ApiKey] = None
    admin: bool = False

    @property
    def label(self) -> str:
        """Whose share of the plan this is: the name, kept apart from a built-in caller's."""
        return account_label(self.key.id if self.key else None, self.name)

    @property
    def priority(self) -> str:
        """The owner (admin key, or anyone in auth mode none) is high, a guest low, a key what it
        was given, the shared key normal."""
        if self.admin or self.name == "local":
            return "high"
        if self.key is not None:
            return self.key.priority
        return "low" if self.name == "anonymous" else "normal"


def period_bounds(now_s: float, tz: Optional[datetime.tzinfo]) -> Dict[str, Tuple[int, int]]:
    """Return {day|week|month: (start, reset)} in epoch seconds for the operator's time zone.

    Days start at midnight, weeks on Monday, months on the 1st. `tz` None is the
    machine's local zone.
    """
    # Arithmetic on wall-clock datetimes, then .timestamp(): a DST change moves the epoch, not the midnight.
    now = datetime.datetime.fromtimestamp(now_s, tz)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = day - datetime.timedelta(days=day.weekday())
    month = day.replace(day=1)
    next_month = month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)
    return {"day": (int(day.timestamp()), int((day + datetime.timedelta(days=1)).timestamp())),
            "week": (int(week.timestamp()), int((week + datetime.timedelta(days=7)).timestamp())),
            "month": (int(month.timestamp()), int(next_month.timestamp()))}


def quota_breach(key: ApiKey, counts: Dict[str, Any], bounds: Dict[str, Tuple[int, int]],
                 estimate: Optional[Dict[str, float]] = None) -> Optional[Dict[str, Any]]:
    """Return the first quota the next request would exceed, or None. `counts` hold what the
    window used, pending requests' estimates included; `estimate` ({"tokens", "USD"}) is the
    next request's own, which must fit too (a request counts 1 of a request quota)."""
    for field, period, counter, unit in QUOTA_PERIODS:
        limit = getattr(key.policy, field)
        used = counts.get(counter, 0)
        need = 1 if unit == "requests" else (estimate or {}).get(unit, 0)
        if limit is not None and (used >= limit if unit == "requests" else used + need > limit):
            return {"period": period, "unit": unit, "limit": limit, "used": round(used, 4) if unit == "USD" else used,
                    "resets_at": bounds[period][1], "estimate": need}
    return None


def format_wait(seconds: float) -> str:
    """Return '6h 12m', '3d 4h', '45s' for a wait."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def quota_error(breach: Dict[str, Any], now_s: float) -> ApiError:
    wait = breach["resets_at"] - now_s
    message = (f"Quota exceeded: {breach['used']}/{breach['limit']} {breach['unit']} "
               f"{PERIOD_WORDS[breach['period']]}. Resets in {format_wait(wait)}.")
    if breach["unit"] != "requests":
        message += (f" (Running requests count at their estimates; this one is estimated at about "
                    f"{breach['estimate']:g} {breach['unit']}.)")
    message += " For more, ask the owner of this OCP to raise this key's quota."
    quota = {k: breach[k] for k in ("period", "limit", "used", "resets_at")}
    quota["unit"] = breach["unit"]
    headers = {"Retry-After": str(max(1, int(wait)))}
    if wait > 60:  # the SDKs (and the agents built on them) would otherwise retry a wall for minutes
        headers["x-should-retry"] = "false"
    return ApiError(429, message, "insufficient_quota", "quota_exceeded", headers=headers, extra={"quota": quota},
                    wall=wait > 60, resets_at=int(breach["resets_at"]))


def ratelimit_headers(key: Optional[ApiKey], counts: Dict[str, Any],
                      bounds: Dict[str, Tuple[int, int]], now_s: float) -> Dict[str, str]:
    """OpenAI's x-ratelimit-*-requests and -tokens headers for the key's tightest request and
    token quotas (tokens: with the requests still running at their estimates), and
    x-ocp-ratelimit-*-usd for a cost quota."""
    if key is None:
        return {}
    tightest: Dict[str, Tuple[Any, Any, int]] = {}
    for field, period, counter, unit in QUOTA_PERIODS:
        limit = getattr(key.policy, field)
        if limit is not None:
            remaining = max(0, limit - counts.get(counter, 0))
            if unit not in tightest or remaining < tightest[unit][1]:
                tightest[unit] = (limit, remaining, bounds[period][1])
    headers = {}
    for unit, (limit, remaining, reset) in tightest.items():
        name = {"requests": "x-ratelimit-%s-requests", "tokens": "x-ratelimit-%s-tokens",
                "USD": "x-ocp-ratelimit-%s-usd"}[unit]
        shown = (lambda v: f"{v:.4f}") if unit == "USD" else str
        headers.update({name % "limit": shown(limit), name % "remaining": shown(remaining),
                        name % "reset": f"{max(0, int(reset - now_s))}s"})
    return headers


def presented_key(headers: Mapping[str, str]) -> str:
    """Return the key a request carries (`Authorization: Bearer` or `x-api-key`), or ""."""
    bearer = headers.get("Authorization") or ""
    if bearer[:7].lower() == "bearer ":
        return bearer[7:].strip()
    return (headers.get("x-api-key") or "").strip()


def same_secret(given: str, expected: str) -> bool:
    return bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())


UNKNOWN_KEY = "Invalid or missing API key. Send it as 'Authorization: Bearer <key>'."


SESSION_COOKIE = "ocp_session"
SESSION_TTL_S = 12 * 3600


class DashboardSessions:
    """Browser sessions after a login with a key; only the token's hash is kept. Thread-safe.

    A session remembers whether it is the admin's or which key's; a revoked key's
    session stops working at once.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._sessions: Dict[str, Tuple[Optional[int], float]] = {}  # hash -> (key id or None=admin, expiry)

    def create(self, caller: Caller, now_s: float) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions = {h: e for h, e in self._sessions.items() if e[1] > now_s}
            self._sessions[hash_key(token)] = (None if caller.admin else caller.key.id, now_s + SESSION_TTL_S)
        return token

    def resolve(self, token: str, store: Store, now_s: float) -> Optional[Caller]:
        with self._lock:
            entry = self._sessions.get(hash_key(token))
        if entry is None or entry[1] <= now_s:
            return None
        if entry[0] is None:
            return Caller("admin", admin=True)
        try:
            key = store.find_key(str(entry[0]))
        except ApiError:
            return None
        return Caller(key.name, key) if key.usable(now_s) else None

    def drop(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(hash_key(token), None)


LOGIN_FAILURES_ALLOWED = 10  # failed dashboard logins per address per window
LOGIN_FAILURE_WINDOW_S = 60
LOGIN_ADDRESSES_TRACKED = 4096


class LoginThrottle:
    """Failed logins per client address: past the allowance an address waits (429), and
    writes no more audit rows, until its window has passed. Bounded; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._failures: "collections.OrderedDict[str, collections.deque]" = collections.OrderedDict()

    def wait_s(self, address: str, now_s: float) -> int:
        """Seconds this address must wait before it may try again (0: it may)."""
        with self._lock:
            times = self._failures.get(address)
            while times and times[0] <= now_s - LOGIN_FAILURE_WINDOW_S:
                times.popleft()
            if not times or len(times) < LOGIN_FAILURES_ALLOWED:
                return 0
            return max(1, int(times[0] + LOGIN_FAILURE_WINDOW_S - now_s) + 1)

    def failed(self, address: str, now_s: float) -> None:
        with self._lock:
            times = self._failures.pop(address, None) or collections.deque(maxlen=LOGIN_FAILURES_ALLOWED)
            times.append(now_s)
            self._failures[address] = times  # most recent last
            while len(self._failures) > LOGIN_ADDRESSES_TRACKED:
                self._failures.popitem(last=False)


def cookie_value(header: str, name: str) -> str:
    """The value of cookie `name` in a Cookie header, or ""."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip()
    return ""


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise ApiError(403, "This route needs the admin key (OCP_ADMIN_KEY, or the file admin-key "
                       "in OCP_HOME).", "permission_error", "admin_required")


def model_allowed(caller: Caller, model: Model) -> bool:
    """True when the caller's key has no model allowlist, or lists this model by id or alias."""
    allowed = caller.key.models if caller.key else None
    return allowed is None or model.id in allowed or bool(set(model.aliases) & set(allowed))


def check_model_allowed(caller: Caller, model: Model) -> None:
    allowed = caller.key.models if caller.key else None
    if not model_allowed(caller, model):
        raise ApiError(403, f"This key may not use {model.id}; allowed: {', '.join(allowed) or 'none'}. "
                       "Pick one of those, or ask the owner of this OCP to allow it.",
                       "permission_error", "model_not_allowed", "model", wall=True)


def check_key_name(name: Any) -> str:
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name.strip()):
        raise bad_request("'name' must be 1-64 printable characters, not all digits, without leading "
                          "or trailing spaces", "name", "invalid_name")
    if name.strip().lower() in RESERVED_KEY_NAMES:
        raise bad_request(f"'{name.strip()}' is the name of a built-in caller; choose another "
                          f"(reserved: {', '.join(RESERVED_KEY_NAMES)})", "name", "reserved_name")
    return name.strip()


def quota_report(store: Store, key: ApiKey, now_s: float, tz: Optional[datetime.tzinfo]) -> Dict[str, Any]:
    """A key's quotas with what each window has used and when it resets."""
    bounds = period_bounds(now_s, tz)
    counts = store.window_counts(key, bounds)
    windows = []
    for field, period, counter, unit in QUOTA_PERIODS:
        windows.append({"quota": field, "period": period, "unit": unit, "limit": getattr(key.policy, field),
                        "used": counts[counter], "resets_at": bounds[period][1],
                        "resets_in": format_wait(bounds[period][1] - now_s)})
    return dict(key.public(now_s), windows=windows)


def parse_time(value: str, name: str) -> int:
    """Epoch seconds from a number or an ISO 8601 date/time (UTC unless it says otherwise)."""
    value = value.strip()
    if re.fullmatch(r"\d{1,12}", value):
        return int(value)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"'{name}' must be epoch seconds or an ISO 8601 date/time", name)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


def parse_usage_query(query: Mapping[str, List[str]], now_s: float) -> Tuple[int, int, int, bool]:
    """Return (since, until, limit, all) from /api/usage's query; 400 on anything unusable."""
    def one(name: str) -> Optional[str]:
        values = query.get(name)
        return values[-1] if values else None

    hours, limit, everyone = one("hours"), one("limit"), (one("all") or "false").lower()
    if hours is not None and not (digits(hours) and 1 <= int(hours) <= 24 * 366):
        raise bad_request("'hours' must be a whole number from 1 to 8784", "hours")
    if limit is not None and not (digits(limit) and 1 <= int(limit) <= 1000):
        raise bad_request("'limit' must be a whole number from 1 to 1000", "limit")
    if everyone not in ("true", "false", "1", "0"):
        raise bad_request("'all' must be true or false", "all")
    until = parse_time(one("until"), "until") if one("until") else int(now_s) + 1
    since = parse_time(one("since"), "since") if one("since") else \
        until - 1 - int(hours or 24) * 3600
    if since >= until:
        raise bad_request("'since' must be before 'until'", "since")
    return since, until, int(limit or 100), everyone in ("true", "1")


def load_admin_key(config: Config, create: bool) -> str:
    """Return the admin key: OCP_ADMIN_KEY, else OCP_HOME/admin-key (made 0600 when `create`)."""
    if config.admin_key:
        return config.admin_key
    path = os.path.join(config.home, "admin-key")
    try:
        with open(path, encoding="utf-8") as f:
            tighten(path, 0o600)
            return f.read().strip()
    except FileNotFoundError:
        if not create:
            return ""
    secret = new_key_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    log.warning("created the admin key in %s (read it there; it is not logged)", path)
    return secret


HOST_HEADER = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::[0-9]{1,5})?")


def host_allowed(host_header: str, config: Config, own_names: Tuple[str, ...]) -> bool:
    """Refuse DNS rebinding: the Host must be an IP literal, localhost, this machine or listed."""
    if not host_header:
        return True  # HTTP/1.0 clients send none; a browser always does
    match = HOST_HEADER.fullmatch(host_header.strip().lower())
    if match is None:
        return False  # e.g. evil.example.com:1:2, or an IPv6 address without its brackets
    host = match.group("ip6") or match.group("name")
    if match.group("ip6") or re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", host):
        return True
    host = host.rstrip(".")
    return host in ("localhost",) + own_names or host.endswith(".localhost") \
        or host in config.allowed_hosts


def same_origin(origin: str, headers: Mapping[str, str]) -> bool:
    """True when the browser's Origin is this server: scheme, host and port all match.

    OCP speaks plain http; https counts only behind a TLS proxy that says so
    (X-Forwarded-Proto: https).
    """
    scheme = "https" if (headers.get("X-Forwarded-Proto") or "").strip().lower() == "https" else "http"
    try:
        parsed = urllib.parse.urlsplit(origin)
        host = urllib.parse.urlsplit("//" + (headers.get("Host") or "").strip())
        return (parsed.scheme.lower() == scheme and not parsed.path.strip("/") and bool(parsed.hostname)
                and parsed.hostname == host.hostname
                and (parsed.port or DEFAULT_PORTS[scheme]) == (host.port or DEFAULT_PORTS[scheme]))
    except ValueError:  # a port that is not a number
        return False


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_verdict(headers: Mapping[str, str], config: Config) -> Tuple[bool, str]:
    """Return (allowed, origin to echo in CORS headers) for a browser's cross-site markers."""
    origin = (headers.get("Origin") or "").strip()
    if origin and origin != "null":
        if same_origin(origin, headers):
            return True, ""
        if origin in config.cors_origins or "*" in config.cors_origins:
            return True, origin
        return False, ""
    if origin == "null" or (headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
        return False, ""
    return True, ""


###############################################################################
# Claude runner ###############################################################
###############################################################################

HEARTBEAT = object()  # what Lease.exchange yields after each silent heartbeat interval
EOF = object()  # the end of a CLI's stdout, on ClaudeProcess.events
KILL_GRACE_S = 5.0
ARGV_PROMPT_LIMIT = 32 * 1024  # larger system prompts go through a 0600 file
PIPE_WRITE_INLINE = 16 * 1024  # bigger stdin is written by a helper thread
SCRUBBED_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "CLAUDECODE",
                "PROXY_API_KEY", "OCP_ADMIN_KEY", "PROXY_ANONYMOUS_KEY")
OCP_KEY_SHAPE = re.compile(r"ocp_[A-Za-z0-9_-]{32}")
TOKEN_FRESH_S = 300
CLAUDE_SEARCH_PATHS = ("~/.local/bin/claude", "~/.claude/local/claude", "~/.npm-global/bin/claude",
                       "/opt/homebrew/bin/claude", "/usr/local/bin/claude", "/usr/bin/claude")


@dataclasses.dataclass(frozen=True)
class Job:
    """One CLI run: what to start and what to feed it."""

    model: str
    system_prompt: str
    blocks: Tuple[Dict[str, Any], ...]
    effort: str = ""
    max_tokens: int = 0
    request_id: str = ""
    owner: str = ""  # who asked (a key name): shown by GET /sessions
    tools: Tuple[Dict[str, Any], ...] = ()  # the client's function tools: served as MCP server "ocp"
    account: str = ""  # the API key it runs for (its id): a pooled CLI never serves another
    priority: str = "normal"  # its key's priority: kept (parked, pooled) CLIs of higher keys stay longer


@dataclasses.dataclass(frozen=True)
class Credentials:
    """How a child authenticates: `isolated` children get a scratch HOME."""

    source: str  # env | login | refresh | none
    token: str = dataclasses.field(default="", repr=False)

    @property
    def isolated(self) -> bool:
        return self.source != "refresh"


def find_claude(config: Config) -> Optional[str]:
    """Return the claude executable's path, or None when it is not installed."""
    if config.claude_bin:
        path = os.path.expanduser(config.claude_bin)
        if os.sep not in path:
            path = shutil.which(path, path=config.environ.get("PATH")) or path
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    found = shutil.which("claude", path=config.environ.get("PATH", os.defpath))
    if found:
        return found
    for candidate in CLAUDE_SEARCH_PATHS:
        path = candidate.replace("~", config.user_home, 1)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


MCP_SERVER_CONFIG = '{"mcpServers":{"ocp":{"type":"sdk","name":"ocp"}}}'  # served on the CLI's own pipes


def claude_argv(binary: str, job: Job, system_arg: Tuple[str, str], tools: str = "") -> List[str]:
    """Return the argv for one headless stream-json run (no shell, prompt on stdin).

    A job with client tools gets them from OCP's MCP server "ocp" over stdin/stdout
    (AGENTS-SPEC §1.2) and no tool of its own: `--tools ""` whatever CLAUDE_ALLOWED_TOOLS says.
    """
    argv = [binary, "-p", "--output-format", "stream-json", "--verbose",
            "--include-partial-messages", "--input-format", "stream-json",
            "--model", job.model, "--tools", "" if job.tools else tools, "--no-session-persistence",
            system_arg[0], system_arg[1]]
    if job.tools:
        argv += ["--mcp-config", MCP_SERVER_CONFIG, "--strict-mcp-config", "--allowedTools", "mcp__ocp__*"]
    if job.effort:
        argv += ["--effort", job.effort]
    return argv


def stdin_line(blocks: Union[str, Tuple[Dict[str, Any], ...]]) -> bytes:
    """Return the one stream-json user line the CLI reads from stdin (a str: a command, /clear)."""
    content = blocks if isinstance(blocks, str) else list(blocks)
    message = {"type": "user", "message": {"role": "user", "content": content}}
    return json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n"


def child_env(environ: Mapping[str, str], config: Config, creds: Credentials,
              scratch: Optional[Dict[str, str]], max_tokens: int = 0) -> Dict[str, str]:
    """Return the child's environment: API keys and OCP's secrets removed.

    `scratch` holds home/config/tmp directories for an isolated child; None
    keeps the real HOME (so the CLI can refresh its own login).
    """
    secrets_ = {v for v in (config.api_key, config.admin_key, config.anonymous_key) if v}
    env = {k: v for k, v in environ.items()
           if k not in SCRUBBED_ENV and v not in secrets_ and not OCP_KEY_SHAPE.search(v)}
    env.pop("CLAUDE_CODE_OAUTH_TOKEN", None)
    if creds.token:
        env["CLAUDE_CODE_OAUTH_TOKEN"] = creds.token
    if config.upstream_base_url:
        env["ANTHROPIC_BASE_URL"] = config.upstream_base_url
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    env["DISABLE_AUTOUPDATER"] = "1"
    # The client owns the history: a CLI that summarised it on its own would spend ~176K tokens
    # a time (measured: 55 upstream requests for a 52-round tool session, 52 with this).
    env["DISABLE_AUTO_COMPACT"] = "1"
    env.setdefault("CLAUDE_CODE_MAX_RETRIES", "3")
    if max_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(max_tokens)
    else:
        env.pop("CLAUDE_CODE_MAX_OUTPUT_TOKENS", None)
    if scratch:
        env["HOME"] = scratch["home"]
        env["CLAUDE_CONFIG_DIR"] = scratch["config"]
    else:
        env.pop("CLAUDE_CONFIG_DIR", None)
    return env


def read_login(user_home: str, platform: str = sys.platform,
               keychain: Optional[Callable[[], str]] = None) -> Tuple[str, int]:
    """Return (access token, expiry ms) of the owner's CLI login, or ("", 0). Read-only. The
    file is read again only when it changed (every spawn and every continued turn asks)."""
    path = os.path.join(user_home, ".claude", ".credentials.json")
    try:
        stat = os.stat(path)
        return login_from_file(path, stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        return login_from_text(keychain() if platform == "darwin" and keychain else "")


@functools.lru_cache(maxsize=8)
def login_from_file(path: str, mtime_ns: int, size: int, inode: int) -> Tuple[str, int]:
    """The login in the credentials file as of that change (the CLI rewrites it on refresh)."""
    try:
        with open(path, encoding="utf-8") as f:
            return login_from_text(f.read())
    except OSError:
        return "", 0


def login_from_text(raw: str) -> Tuple[str, int]:
    try:
        oauth = json.loads(raw).get("claudeAiOauth") or {}
        return str(oauth.get("accessToken") or ""), int(oauth.get("expiresAt") or 0)
    except (ValueError, AttributeError, TypeError):
        return "", 0


def macos_keychain() -> str:
    """Return the CLI's keychain entry (JSON text) on macOS, or ""."""
    for flag, name in (("-s", "Claude Code-credentials"), ("-l", "claude-code-credentials")):
        try:
            out = subprocess.run(["security", "find-generic-password", flag, name, "-w"],
                                 capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return ""
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return ""


class KeptFor:
    """A function's answer kept for `ttl_s`: the macOS keychain, read by starting `security`,
    was asked on every spawn and every continued turn; a login the CLI refreshed is seen
    within KEYCHAIN_TTL_S (its old token stays good until near its expiry). Thread-safe."""

    def __init__(self, fn: Callable[[], Any], ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.fn, self.ttl_s, self.clock = fn, ttl_s, clock
        self._lock = threading.Lock()
        self._kept: Optional[Tuple[float, Any]] = None

    def __call__(self) -> Any:
        with self._lock:
            kept = self._kept
        if kept is not None and self.clock() - kept[0] < self.ttl_s:
            return kept[1]
        value = self.fn()
        with self._lock:
            self._kept = (self.clock(), value)
        return value


KEYCHAIN_TTL_S = 10.0
recent_keychain = KeptFor(macos_keychain, KEYCHAIN_TTL_S)  # (runs nothing until a request asks, on macOS)


def resolve_credentials(environ: Mapping[str, str], user_home: str, now_s: float,
                        platform: str = sys.platform,
                        keychain: Optional[Callable[[], str]] = None) -> Credentials:
    """Pick how the next child logs in (SPEC §3.1); OCP itself never refreshes tokens."""
    token = environ.get("CLAUDE_CODE_OAUTH_TOKEN", "").strip()
    if token:
        return Credentials("env", token)
    access, expires_ms = read_login(user_home, platform, keychain)
    if access and expires_ms / 1000 - now_s > TOKEN_FRESH_S:
        return Credentials("login", access)
    if access:
        return Credentials("refresh")
    return Credentials("none")


class SlotTurn(threading.Event):
    """A place in the slot queue: set when the slot is handed over, or when shutdown refuses it."""

    refused = False
    holder: Any = None


class Slots:
    """A FIFO semaphore for CLI processes with a bounded waiting line.

    `waiting` raises ApiError 429 when the line is full or the deadline passes,
    ClientGone when `cancelled()` turns true while waiting. A slot is taken for a
    `holder` (a Lease) and `release(holder)` gives it back once: a second release
    of the same holder is a no-op, so no path can give back a slot twice or keep
    one for good by releasing "the wrong one". `leaked()` counts slots whose
    holder has ended — a bug, reported by /health, never a silent queue_full.
    """

    def __init__(self, limit: int, max_queue: int):
        self.limit, self.max_queue = limit, max_queue
        self._lock = threading.Lock()
        self._running = 0
        self._waiting: "collections.deque[SlotTurn]" = collections.deque()
        self._holders: List[Any] = []  # who holds each running slot (None: an anonymous taker)
        self._finishing: List[Any] = []  # holders that answered: their process is exiting (finishing)
        self.closed = False

    def close(self) -> int:
        """Shutting down: refuse every waiting request (503) and every later one; return how many waited."""
        with self._lock:  # marked under the lock: a waiter giving up at that moment sees it
            self.closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            for turn in waiting:
                turn.refused = True
                turn.set()
        return len(waiting)

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return {"running": self._running, "queued": len(self._waiting), "limit": self.limit}

    def leaked(self) -> int:
        """Slots held by a holder that has ended (its `ended` is set) and is not finishing (being
        reaped): each one lost for good."""
        with self._lock:
            return sum(1 for holder in self._holders
                       if getattr(holder, "ended", "") and holder not in self._finishing)

    def _grant(self, holder: Any) -> None:
        self._running += 1
        self._holders.append(holder)

    def _hand_over(self) -> None:
        turn = self._waiting.popleft()
        self._holders.append(turn.holder)
        turn.set()

    def resize(self, limit: int, max_queue: int) -> None:
        """Take new limits now: a higher limit lets waiting requests in at once."""
        with self._lock:
            self.limit, self.max_queue = limit, max_queue
            while self._running < self.limit and self._waiting:
                self._running += 1
                self._hand_over()

    def waiting(self, deadline: float, cancelled: Callable[[], bool],
                clock: Callable[[], float] = time.monotonic, tick_s: float = 0,
                holder: Any = None) -> Iterator[None]:
        """Take a slot for `holder`, yielding after each `tick_s` spent in the line (for heartbeats).

        However the wait ends — given up, refused, or the generator closed while it
        waits — the place in the line is left, or a slot handed over meanwhile is passed on.
        """
        with self._lock:
            if self.closed:
                raise shutting_down()
            if self._running < self.limit and not self._waiting:
                self._grant(holder)
                return
            if len(self._waiting) >= self.max_queue + len(self._finishing):
                raise queue_full("all CLI slots are busy and the queue is full")
            turn = SlotTurn()
            turn.holder = holder
            self._waiting.append(turn)
        taken = False
        try:
            next_tick = clock() + tick_s
            while not turn.wait(min(0.25, tick_s or 0.25, max(0.0, deadline - clock()))):
                if tick_s and clock() >= next_tick:
                    next_tick = clock() + tick_s
                    yield
                if turn.is_set():
                    break
                if cancelled():
                    raise ClientGone()
                if clock() >= deadline:
                    raise queue_full("waited too long for a free CLI slot")
            if turn.refused:
                raise shutting_down()
            taken = True
        finally:
            if not taken:
                self._give_up(turn)

    def try_take(self, holder: Any = None) -> bool:
        """A slot now if one is free and nobody waits (the pool's speculative spawns), else False."""
        with self._lock:
            if self.closed or self._running >= self.limit or self._waiting:
                return False
            self._grant(holder)
            return True

    def _give_up(self, turn: SlotTurn) -> None:
        with self._lock:
            if turn.refused:
                return  # shutdown emptied the line: no slot was handed over
            if not turn.is_set():
                self._waiting.remove(turn)
                return
        self.release(turn.holder)  # handed a slot while giving up: pass it on

    def finishing(self, holder: Any) -> None:
        """`holder` has answered and its process is exiting: its slot comes back in moments, so a
        request may wait for it even when the line is full (a client asking again at once, with
        CLAUDE_MAX_QUEUE=0, is not refused for a CLI that is only exiting)."""
        with self._lock:
            if holder in self._holders and holder not in self._finishing:
                self._finishing.append(holder)

    def release(self, holder: Any = None) -> bool:
        """Give back `holder`'s slot; False (nothing happens) when it holds none."""
        with self._lock:
            if holder not in self._holders:
                return False
            self._holders.remove(holder)
            if holder in self._finishing:
                self._finishing.remove(holder)
            if self._waiting and self._running <= self.limit:
                self._hand_over()  # hand the slot over, FIFO
            else:
                self._running -= 1
            return True


def shutting_down() -> ApiError:
    return ApiError(503, "OCP is shutting down; retry in a moment.", "proxy_error", "shutting_down",
                    headers={"Retry-After": "5"})


def stopped(reason: str) -> ApiError:
    """The error of a run that OCP itself ended: shutdown, or the owner's DELETE /sessions."""
    if reason == "shutdown":
        return shutting_down()
    return ApiError(503, "The operator stopped this request (DELETE /sessions).", "proxy_error",
                    "stopped_by_operator")


def queue_full(why: str) -> ApiError:
    return ApiError(429, f"OCP is busy: {why}. Retry shortly.", "rate_limit_error",
                    "queue_full", headers={"Retry-After": "5"})


def parse_event(line: bytes) -> Optional[Dict[str, Any]]:
    """Return one stream-json event, or None for a blank or unparsable line."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        log.debug("unparsable CLI line (%d bytes)", len(line))
        return None
    return event if isinstance(event, dict) else None


def control_response(request_id: Any, response: Optional[Dict[str, Any]] = None, error: str = "") -> bytes:
    """One stdin line answering a control_request, echoing its request_id."""
    if error:
        body = {"subtype": "error", "request_id": request_id, "error": error}
    else:
        body = {"subtype": "success", "request_id": request_id, "response": response or {}}
    return json.dumps({"type": "control_response", "response": body}).encode("utf-8") + b"\n"


def refuse_control(proc: ClaudeProcess, event: Dict[str, Any]) -> None:
    """Answer a control_request nobody handles (AGENTS-SPEC §1.3): the CLI must not wait for ever."""
    proc.send(control_response(event.get("request_id"), error="unsupported"))


class Workers:
    """Threads kept for the next task: `run(fn, *args)` wakes an idle one, or starts one (a task
    never waits for a thread). Thread.start waits until the new thread has run, which under the
    GIL cost a request ~0.3–0.5 ms for each of its connection, CLI reader and reap (profiled with
    bench/bench.py's load); waking an idle worker costs the caller a lock release. At most
    `idle_max` wait, each for `idle_s`; a task's exception is logged, the worker goes on."""

    def __init__(self, name: str, idle_max: int = 32, idle_s: float = 60.0):
        self.name, self.idle_max, self.idle_s = name, idle_max, idle_s
        self._lock = threading.Lock()
        self._idle: List[List[Any]] = []  # [task, wake lock (held while idle)], the last used last

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = [(fn, args), threading.Lock()]
            worker[1].acquire()
            threading.Thread(target=self._work, args=(worker,), name=self.name, daemon=True).start()
        else:
            worker[0] = (fn, args)
            worker[1].release()

    def _work(self, worker: List[Any]) -> None:
        while True:
            (fn, args), worker[0] = worker[0], None
            try:
                fn(*args)
            except Exception:
                log.exception("%s: a task failed", self.name)
            del fn, args  # an idle worker holds nothing of its last task (a lease, a socket)
            with self._lock:
                if len(self._idle) >= self.idle_max:
                    return
                self._idle.append(worker)
            if not worker[1].acquire(timeout=self.idle_s):
                with self._lock:
                    if worker in self._idle:
                        self._idle.remove(worker)
                        return
                worker[1].acquire()  # handed a task as it timed out: it is on its way

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)


WORKERS = Workers("ocp-worker")  # connections, CLI readers, reaps (no thread until the first task)


class ClaudeProcess:
    """One running CLI: its own process group, stdin kept open, stdout read by its own thread.

    `send` writes a stdin line under one writer lock (a malformed or interleaved
    line would kill the CLI). The reader thread turns stdout lines into events on
    `events` (a list per read), ending with EOF; `control_request` lines go to `on_control` instead,
    which answers them with `send`. `close()` ends it for good (SIGTERM to the
    group, SIGKILL after KILL_GRACE_S) and is safe to call more than once.
    """

    def __init__(self, argv: List[str], env: Dict[str, str], cwd: str, scratch: str,
                 grace_s: float = KILL_GRACE_S,
                 on_control: Optional[Callable[["ClaudeProcess", Dict[str, Any]], None]] = None):
        self.stderr = tempfile.TemporaryFile(dir=scratch)  # a chatty CLI can't fill a pipe nobody reads
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self.stderr, cwd=cwd, env=env, bufsize=0,
                                          start_new_session=True, close_fds=True)
        except OSError:
            self.stderr.close()
            raise
        self.pid = self.popen.pid
        self.grace_s = grace_s
        self.started = time.monotonic()
        self.cancelled = False
        self.stop_reason = ""
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.on_control = on_control or refuse_control
        self._write_lock = threading.Lock()
        self._read_done = threading.Event()
        WORKERS.run(self._read)

    def send(self, data: bytes) -> None:
        """Write to stdin under the writer lock; a big write goes from a helper thread, so a CLI
        that reads late never blocks the request's thread."""
        if len(data) <= PIPE_WRITE_INLINE:
            self._write(data)
        else:
            threading.Thread(target=self._write, args=(data,), daemon=True).start()

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self.popen.stdin.write(data)
            except (BrokenPipeError, ValueError, OSError):
                pass  # the CLI died before reading; its exit status tells why

    def close_stdin(self, wait: bool = True) -> None:
        """No more input: the CLI finishes what it was asked and exits. With `wait=False` a
        write still under way (a CLI that does not read) is not waited for."""
        if not self._write_lock.acquire(timeout=-1 if wait else 0):
            return
        try:
            with contextlib.suppress(OSError, ValueError):
                self.popen.stdin.close()
        finally:
            self._write_lock.release()

    def _read(self) -> None:
        try:
            buffer = b""
            fd = self.popen.stdout.fileno()
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                *lines, buffer = (buffer + chunk).split(b"\n")
                self._route(lines)
            self._route([buffer])
            self.events.put(EOF)
        finally:
            self._read_done.set()

    def _route(self, lines: List[bytes]) -> None:
        """Queue the events of one read together (one wake-up for the request, not one per line)."""
        events = []
        for line in lines:
            event = parse_event(line)
            if event is None:
                continue
            if event.get("type") != "control_request":
                events.append(event)
                continue
            try:
                self.on_control(self, event)
            except Exception:  # a handler's bug must not stop the reader: the CLI would block
                log.exception("control_request handler failed")
        if events:
            self.events.put(events)

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - limit))
            return self.stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, reason: str = "", hard: bool = False) -> None:
        """End the run now: SIGTERM to the group, SIGKILL if it lingers — or at once when `hard`.

        `reason` ("client", "shutdown", "operator") says who ended it; the
        request then says so instead of "ended without an answer".
        """
        if self.popen.poll() is None:
            self.cancelled = True
            self.stop_reason = self.stop_reason or reason
            self.signal_group(signal.SIGKILL if hard else signal.SIGTERM)
            self.events.put(EOF)  # whoever reads stops now, even if the CLI ignores SIGTERM

    def wait(self, timeout_s: float) -> int:
        """Popen.wait, but woken by the exit itself where Linux offers a pidfd (Popen's own
        wait polls with sleeps of up to 50 ms). Raises subprocess.TimeoutExpired."""
        fd = -1
        if self.popen.poll() is None and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(self.pid)
        if fd < 0:
            return self.popen.wait(timeout=timeout_s)
        try:  # poll, not select: a descriptor past 1023 (many connections) is beyond select
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            exited = poller.poll(max(0, timeout_s) * 1000)
        finally:
            os.close(fd)
        if not exited:
            raise subprocess.TimeoutExpired(self.popen.args, timeout_s)
        return self.popen.wait()

    def close(self) -> Optional[int]:
        """Make sure the process group is gone and reaped; return the exit code."""
        self.close_stdin(wait=False)
        if self.popen.poll() is None:
            try:
                self.wait(2 if not self.cancelled else self.grace_s)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGTERM)
                try:
                    self.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    pass
        if self.popen.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.popen.wait()
        # Anything the CLI left in its group goes too; the group id stays reserved while a
        # member lives, so this cannot reach an unrelated process.
        self.signal_group(signal.SIGKILL)
        self.close_stdin()  # a blocked writer fails now that no one reads
        self._read_done.wait(timeout=5)
        streams = [self.stderr] + ([self.popen.stdout] if self._read_done.is_set() else [])
        for stream in streams:  # (a reader still blocked by an escaped grandchild keeps its fd)
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        return self.popen.returncode


def exposed_name(name: str) -> str:
    """The name OCP's MCP server gives a client tool: as it is, or for one over 54 characters
    (over 64 once the CLI prefixes mcp__ocp__) the first 45 and 8 hex of its SHA-256."""
    if len(name) <= 54:
        return name
    return name[:45] + "_" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def rpc_result(rpc_id: Any, result: Dict[str, Any]) -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


class ToolBridge:
    """OCP's MCP server "ocp" for one CLI, spoken on the CLI's own stdin/stdout (the `sdk`
    transport, AGENTS-SPEC §1.3). Used as the lease's control_request handler.

    It answers the handshake and `tools/list` with the client's tools, and holds each
    `tools/call` until the client's result arrives (`answer`, from the request's
    thread; a result that comes before its call waits for it). Thread-safe.
    """

    def __init__(self, tools: Tuple[Dict[str, Any], ...]):
        self.tools = tools
        self.client_names = {"mcp__ocp__" + exposed_name(t["name"]): t["name"] for t in tools}
        self._lock = threading.Lock()
        self._held: Dict[str, Tuple[Any, Any]] = {}  # tool_use id -> (control request_id, JSON-RPC id)
        self._early: Dict[str, Dict[str, Any]] = {}  # tool_use id -> a result that came first
        self.proc: Optional[ClaudeProcess] = None

    def __call__(self, proc: ClaudeProcess, event: Dict[str, Any]) -> None:
        self.proc = proc
        request = event.get("request") or {}
        if request.get("subtype") != "mcp_message" or request.get("server_name") != "ocp":
            return refuse_control(proc, event)
        message = request.get("message") or {}
        reply = self.reply(event.get("request_id"), message)
        if reply is not None:
            proc.send(control_response(event.get("request_id"), {"mcp_response": reply}))

    def reply(self, request_id: Any, message: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The JSON-RPC answer to one MCP message; None for a call held for the client."""
        method, rpc_id = message.get("method"), message.get("id")
        params = message.get("params") or {}
        if method == "initialize":
            return rpc_result(rpc_id, {"protocolVersion": params.get("protocolVersion"),
                                       "capabilities": {"tools": {"listChanged": False}},
                                       "serverInfo": {"name": "ocp", "version": __version__}})
        if rpc_id is None:  # a notification: answered all the same, or the CLI waits
            return {"jsonrpc": "2.0", "result": {}, "id": 0}
        if method == "tools/list":
            return rpc_result(rpc_id, {"tools": [
                {"name": exposed_name(t["name"]), "description": t["description"], "inputSchema": t["parameters"],
                 "annotations": {"readOnlyHint": True}} for t in self.tools]})
        if method == "tools/call":
            return self.hold(request_id, rpc_id, params)
        if method == "ping":
            return rpc_result(rpc_id, {})
        return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32601, "message": "Method not found"}}

    def hold(self, request_id: Any, rpc_id: Any, params: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        tool_use_id = str((params.get("_meta") or {}).get("claudecode/toolUseId") or "")
        with self._lock:
            early = self._early.pop(tool_use_id, None)
            if early is None:
                self._held[tool_use_id] = (request_id, rpc_id)
                return None
        return rpc_result(rpc_id, early)

    def answer(self, tool_use_id: str, result: Dict[str, Any]) -> None:
        """The client's result for one call: to the CLI now, or when its tools/call arrives."""
        with self._lock:
            held = self._held.pop(tool_use_id, None)
            if held is None:
                self._early[tool_use_id] = result
                return
        self.proc.send(control_response(held[0], {"mcp_response": rpc_result(held[1], result)}))


CHILD_FILE, SYSTEM_PROMPT_FILE = "child", "system-prompt.txt"  # what OCP puts in a run directory, beside tmp/
RUN_DIR_FILES = (CHILD_FILE, SYSTEM_PROMPT_FILE)


def remove_run_dir(path: str) -> None:
    """Remove a run directory: what OCP put there and an empty tmp/ in a few calls, else (the CLI
    left files) shutil.rmtree, whose walk in Python cost the busy daemon a tenth of its CPU."""
    for name in RUN_DIR_FILES:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(os.path.join(path, name))
    try:
        os.rmdir(os.path.join(path, "tmp"))
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


class Sweeper:
    """Removes finished runs' scratch directories on its own thread, off the request's path.

    The CLI keeps pasted images and temp files there, so removal is prompt;
    `drain` waits for the queue (tests, shutdown).
    """

    def __init__(self, on_removed: Callable[[str], None]):
        self._queue: "queue.Queue[str]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._on_removed = on_removed

    def remove(self, path: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="ocp-sweeper", daemon=True)
                self._thread.start()
        self._queue.put(path)

    def _work(self) -> None:
        while True:
            path = self._queue.get()
            remove_run_dir(path)
            self._on_removed(path)
            self._queue.task_done()

    def drain(self) -> None:
        self._queue.join()


KEEPER_SOURCE = r"""
import os, shutil, signal, sys, time
groups, dirs = set(), set()
for line in sys.stdin:  # what OCP tells it, one line each: see Keeper
    op, arg = line[:1], line[1:].rstrip("\n")
    if op in "+-" and arg.isdigit():
        (groups.add if op == "+" else groups.discard)(int(arg))
    elif op in "dx" and arg:
        (dirs.add if op == "d" else dirs.discard)(arg)
def signal_all(sig):
    alive = []
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
            alive.append(pgid)
        except OSError:
            pass
    return alive
deadline = time.monotonic() + 3
while signal_all(signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL):
    if time.monotonic() > deadline + 3:
        break  # what is left is a zombie nobody reaps (the group outlives its members then): done
    time.sleep(0.1)
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""


class Keeper:
    """A tiny watchdog process that ends OCP's CLI processes when OCP itself dies.

    It holds the read end of a pipe: OCP tells it each run directory before
    making it (`claim`, line "dPATH") and after removing it (`let_go`, "xPATH"),
    and each process group it starts (`add`, "+PGID") and reaps (`remove`,
    "-PGID"). However OCP ends — even kill -9, at any moment — the pipe closes,
    and the keeper ends every group still listed (SIGTERM, SIGKILL after 3 s)
    and removes every directory still listed. A clean shutdown has reaped and
    removed everything first, so the keeper just exits. Thread-safe.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._popen: Optional[subprocess.Popen] = None
        self.closed = False  # shutdown: spawns are refused by then, and no keeper starts again

    def _ensure(self) -> Optional[subprocess.Popen]:
        if self.closed:
            return None
        if self._popen is None or self._popen.poll() is not None:
            try:  # -I -S: no site, no user paths; a new session, so a terminal's Ctrl-C is OCP's alone
                self._popen = subprocess.Popen([sys.executable, "-I", "-S", "-c", KEEPER_SOURCE],
                                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True,
                                               close_fds=True)
            except OSError as e:
                log.warning("cannot start the process keeper: %s", e.strerror)
                self._popen = None
        return self._popen

    def _tell(self, line: str) -> None:
        with self._lock:
            if line[:1] in "-x" and (self._popen is None or self._popen.poll() is not None):
                return  # a keeper that is gone knew of it; a new one would not: nothing to tell
            popen = self._ensure()
            if popen is None:
                return
            try:
                popen.stdin.write(line.encode("utf-8") + b"\n")
                popen.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                log.warning("the process keeper is gone; a new one takes over from the next run")
                self._popen = None

    def claim(self, path: str) -> None:
        self._tell(f"d{path}")

    def let_go(self, path: str) -> None:
        self._tell(f"x{path}")

    def add(self, pgid: int) -> None:
        self._tell(f"+{pgid}")

    def remove(self, pgid: int) -> None:
        self._tell(f"-{pgid}")

    def close(self) -> None:
        """Shutdown: everything was reaped, so the keeper exits with nothing to do."""
        with self._lock:
            self.closed = True
            if self._popen is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._popen.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(timeout=5)
                self._popen = None


def process_identity(pid: int) -> str:
    """Return what tells this process apart from a later one with the same pid: its start time
    (Linux /proc) or its start time and command (ps elsewhere); "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return "start:" + f.read().rsplit(b")", 1)[1].split()[19].decode()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return ""
    except (OSError, IndexError):
        return ""
    try:
        out = subprocess.run(["ps", "-o", "lstart=,command=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return "ps:" + out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else ""


def end_leftover(run_dir: str) -> bool:
    """A run directory left by a daemon that died: end its CLI if that very process still runs."""
    try:
        with open(os.path.join(run_dir, CHILD_FILE), encoding="utf-8") as f:
            pid, pgid, identity = f.read().split(" ", 2)
    except (OSError, ValueError):
        return False
    if not identity or process_identity(int(pid)) != identity:
        return False  # gone, or the pid now belongs to another process
    with contextlib.suppress(OSError):
        os.killpg(int(pgid), signal.SIGKILL)
        log.warning("ended a claude process (pid %s) left running by an earlier OCP", pid)
        return True
    return False


def claude_missing() -> ApiError:
    return ApiError(503, "The claude CLI is not installed on the OCP server. Install it with "
                    "`npm i -g @anthropic-ai/claude-code`, then run `claude setup-token` (or "
                    "`claude auth login`) and restart OCP.", "proxy_error", "claude_not_installed")


def timeout_error() -> ApiError:
    return ApiError(504, "The claude CLI did not finish within CLAUDE_TIMEOUT.", "timeout", "timeout")


class LeaseEnded(RuntimeError):
    """A lease that has ended was asked to run again: a bug in its caller, never a request's fault."""


class Lease:
    """A CLI process lent to one request, which may carry it through several exchanges.

    `acquire()` waits for a slot (yielding after each heartbeat interval in the
    line) and starts the process; `exchange(blocks)` writes one user turn and
    yields the CLI's events up to and including its `result`, HEARTBEAT after
    each silent interval. A lease ends in exactly one `release()` (the CLI
    finished: stdin closed, process reaped) or `kill()`; `park()` gives the slot
    back while the process waits for a later exchange, `resume()` takes one again.
    An ended lease cannot be resumed (LeaseEnded), and a slot it took is given back
    whatever state it is in: ending it twice, or being ended while it waits in line.
    """

    def __init__(self, runner: "Runner", job: Job, cancelled: Callable[[], bool],
                 on_control: Optional[Callable[[ClaudeProcess, Dict[str, Any]], None]] = None,
                 adopt: Optional["Lease"] = None):
        self.runner, self.job, self.cancelled = runner, job, cancelled
        self.on_control = on_control
        self.adopt = adopt  # a pooled CLI holding this request's conversation: it answers, nothing starts
        self.proc: Optional[ClaudeProcess] = None
        self.run_dir = ""
        self.deadline = 0.0
        self.has_slot = False
        self.has_refresh_lock = False
        self.held: List[Dict[str, Any]] = []  # events read after a `result`, for the next exchange
        self.ended = ""  # "released" | "killed" | "handed over" (to a lease that adopted its CLI)
        self.key = ""  # spawn_key() when its CLI may be pooled, else ""
        self.spawn_job, self.creds = job, Credentials("none")  # what its CLI was started for, and as whom
        self.spent_usd = 0.0  # its CLI's total_cost_usd so far
        self.pooled = ""  # while idle in the pool: "warm" (no conversation) or "conversation"
        self.spare = False  # started by the pool ahead of a request (a warm spare), not used yet
        self.continued = 0  # how often the conversation it holds was continued in it (0: it began one)
        self.parked_round = False  # while it waits in Parks for its client's tool results
        self.rss_mb = 0.0  # measured when it last went idle: idle CLIs outside the pool count in its budget

    def acquire(self) -> Iterator[None]:
        """Take a slot, then a pooled CLI or a new one; yields while queued. Raises 429/503/504/ClientGone."""
        runner = self.runner
        if not runner.claude:
            raise claude_missing()
        try:
            yield from self._take_slot()
        except BaseException:
            if self.adopt is not None:  # the conversation's CLI goes with the request that claimed it
                self.adopt.kill()
            raise
        try:
            creds = runner.credentials()
            key = spawn_key(self.job, creds) if creds.isolated and runner.pool.enabled() else ""
            warm = self.adopt or runner.pool.take(key)
            if warm is not None:
                self._adopt(warm)
            else:
                self.start(creds, key)
        except BaseException:
            if self.adopt is not None and not self.adopt.ended:
                self.adopt.kill()
            self.kill()
            raise

    def start(self, creds: Credentials, key: str = "") -> None:
        """Start a new CLI for this lease (it holds a slot)."""
        runner = self.runner
        self.key, self.creds = key, creds
        if not creds.isolated:  # one child at a time may refresh the owner's login
            self._take_refresh_lock()
        self.run_dir = runner.make_run_dir(self.job.request_id)
        self.proc = runner.spawn(self, creds)
        if self.cancelled():  # the request left while it started (Turn.cancel found no process yet)
            self.proc.cancel("client")

    def _adopt(self, warm: "Lease") -> None:
        """Take over a pooled CLI: it answers this lease's request now, and the pooled lease ends."""
        self.proc, self.run_dir, self.held = warm.proc, warm.run_dir, warm.held
        self.spent_usd, self.spare, self.continued = warm.spent_usd, warm.spare, warm.continued
        self.key, self.spawn_job, self.creds = warm.key, warm.spawn_job, warm.creds
        self.proc.on_control = self.on_control or refuse_control
        self.runner.hand_over(warm, self)
        if self.cancelled():
            self.proc.cancel("client")

    def reset(self) -> bool:
        """/clear: the CLI forgets its conversation. Measured on 2.1.330 (stream_input_clear,
        warm_sdk_turns): conversation_reset, init and a result, no upstream request, ~20 ms.
        False (the caller ends the CLI) when it did not answer exactly so."""
        self.deadline = self.runner.clock() + RESET_TIMEOUT_S
        seen = set()
        try:
            for event in self.exchange(CLEAR_COMMAND):
                if event is not HEARTBEAT:
                    seen.add(event.get("type"))
        except (ApiError, ClientGone):
            return False
        return {"conversation_reset", "result"} <= seen and not seen & {"assistant", "stream_event"}

    def _take_slot(self) -> Iterator[None]:
        runner = self.runner
        if self.ended:
            raise LeaseEnded(f"lease {self.job.request_id} has ended ({self.ended})")
        now = runner.clock()
        self.deadline = now + runner.config.timeout_ms / 1000
        queue_deadline = min(self.deadline, now + runner.config.queue_timeout_ms / 1000)
        yield from runner.slots.waiting(queue_deadline, self.cancelled, runner.clock,
                                        runner.config.heartbeat_ms / 1000, self)
        with runner.live_lock:  # against a kill() meanwhile: it ends the lease under this lock
            ended = self.ended
            self.has_slot = not ended
        if ended:
            runner.slots.release(self)
            raise LeaseEnded(f"lease {self.job.request_id} ended while it waited for a slot")

    def take_free_slot(self) -> bool:
        """A slot now, if one is free and nobody waits (the pool's speculative spawns)."""
        self.has_slot = self.runner.slots.try_take(self)
        return self.has_slot

    def _take_refresh_lock(self) -> None:
        while not self.runner.refresh_lock.acquire(timeout=0.25):
            if self.cancelled():
                raise ClientGone()
            if self.runner.clock() >= self.deadline:
                raise timeout_error()
        self.has_refresh_lock = True

    def exchange(self, blocks: Union[None, str, Tuple[Dict[str, Any], ...]] = None) -> Iterator[Any]:
        """Send one user turn (when given) and yield events up to and including `result`.

        Ends early at EOF (the CLI exited: the caller sees no `result`). Raises
        ApiError 504 at CLAUDE_TIMEOUT, `stopped(...)` when OCP ended the run and
        ClientGone when the request cancelled it.
        """
        proc = self.proc
        if blocks is not None:
            proc.send(stdin_line(blocks))
        heartbeat_s = self.runner.config.heartbeat_ms / 1000
        clock = self.runner.clock
        last = clock()
        while True:
            now = clock()
            if now >= self.deadline:
                raise timeout_error()
            wait = self.deadline - now
            if heartbeat_s:
                wait = min(wait, max(0.0, last + heartbeat_s - now))
            try:
                events, self.held = (self.held, []) if self.held else (proc.events.get(timeout=wait), [])
            except queue.Empty:
                if heartbeat_s and clock() - last >= heartbeat_s:
                    last = clock()
                    yield HEARTBEAT
                continue
            if events is EOF:
                proc.events.put(EOF)  # a later exchange sees the end too
                if proc.stop_reason == "client":
                    raise ClientGone()
                if proc.stop_reason:
                    raise stopped(proc.stop_reason)
                return
            last = clock()
            for index, event in enumerate(events):
                if event.get("type") == "result":
                    yield self.own_cost(event)
                    self.held = events[index + 1:]  # what follows belongs to the next exchange
                    return
                yield event

    def own_cost(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """The result with this exchange's cost: a CLI's total_cost_usd sums every turn it
        answered since it started or was last reset (measured: stream_input_multiturn, _clear)."""
        total = result.get("total_cost_usd")
        if not isinstance(total, (int, float)):
            return result
        spent, self.spent_usd = self.spent_usd, float(total)
        return dict(result, total_cost_usd=total - spent if total >= spent else total)

    def cancel(self, reason: str) -> None:
        """Ask the CLI to end (another thread may call this); the exchange then raises. An idle
        one (parked on a tool round, pooled) is killed outright: on SIGTERM the real CLI answers
        its pending tool call as interrupted and asks the model to go on — one more upstream
        request, billed for nothing (measured, 2.1.330); idle, it has nothing to flush."""
        if self.proc is not None:
            self.proc.cancel(reason, hard=not self.has_slot)

    def park(self) -> None:
        """The process waits for a later exchange: its slot goes to the next request meanwhile."""
        self.has_slot = False
        self.runner.slots.release(self)

    def resume(self) -> Iterator[None]:
        """Take a slot again for the next exchange (yields while queued); a fresh deadline.
        Raises LeaseEnded for a lease that has ended: its process is gone."""
        yield from self._take_slot()

    def release(self, wait: bool = True) -> bool:
        """The CLI answered: close its stdin, let it exit, clean up. False if already ended.
        `wait=False`: its exit is waited for on a thread of its own (see Runner.retire_later)."""
        return self._end("released", wait)

    def keep(self, conversation: str) -> bool:
        """The CLI answered: pool it, holding `conversation` for its follow-up ("": not worth
        keeping), or release it — reaped off the request's path; either way its configuration
        gets a warm CLI again (spawn-after-use). True when it was pooled."""
        kept = bool(conversation) and self.runner.pool.keep(self, conversation)
        if not kept:
            self.release(wait=False)
        self.runner.pool.replenish(self)
        return kept

    def kill(self, reason: str = "", wait: bool = True) -> bool:
        """End the CLI now (stop sequence, max_tokens, error, hang-up; an idle one outright, see
        `cancel`). False if already ended. `wait=False`: reaped on a thread of its own."""
        if self.proc is not None and not self.ended:
            self.cancel(reason)
        return self._end("killed", wait)

    def _end(self, how: str, wait: bool = True) -> bool:
        with self.runner.live_lock:
            ended, self.ended = self.ended, self.ended or how
        if ended:
            self.has_slot = False
            self.runner.slots.release(self)  # (none held: a no-op) — never a slot kept for good
            return False
        if wait:
            self.runner.retire(self)
        else:
            self.runner.retire_later(self)
        return True


# -- the warm pool ---------------------------------------------------------------------------

CLEAR_COMMAND = "/clear"  # the CLI's own command: it forgets the conversation (no upstream request)
RESET_TIMEOUT_S = 10.0
POOL_RSS_GUESS_MB = 180.0  # a warm CLI 2.1.330 before one is measured (bench/pool.py: 170–190 MiB)
POOL_MAX_CLI_MB = 400.0  # a CLI grows ~0.6 MiB a turn (measured): one this big is not kept (~350 turns)


def machine_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return 0


def default_pool_mb(memory_mb: int) -> int:
    """The pool's budget unless OCP_POOL_MAX_MB says: an eighth of the machine's memory, at least
    256 MiB — one warm CLI on a 1 GB Pi, two on 4 GB, about ten on 16 GB."""
    return max(256, memory_mb // 8)


def rss_mb(pid: int) -> float:
    """A process's resident memory in MiB (Linux /proc, else ps); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return 0.0
    except (OSError, ValueError, IndexError):
        return 0.0
    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip() or 0) / 1024
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0.0


USES_REMEMBERED = 1024  # spawn keys whose uses the pool counts (a warm spare only for one that recurs)
UNCONTINUED_AFTER_S = 120  # a kept conversation not continued this long is likely done (an agent's title call)


def spawn_key(job: Job, creds: Credentials) -> str:
    """Everything a CLI is fixed to when it starts (argv, environment, whose key): a pooled CLI
    serves only a job with the same spawn key."""
    text = json.dumps([job.model, job.system_prompt, job.tools, job.effort, job.max_tokens, job.account,
                       creds.source, creds.token], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(eq=False)  # each is its own: compared by identity
class Warm:
    """An idle CLI in the pool."""

    lease: Lease
    conversation: str  # "" when it holds none (fresh, or reset)
    since: float  # idle since (monotonic)
    rss_mb: float

    def unpromising(self, now: Optional[float]) -> bool:
        """A conversation its CLI never continued though its client had a while to (an agent's
        one-shot title call, a question asked once): the first of its key's to go."""
        return (bool(self.conversation) and not self.lease.continued and now is not None
                and now - self.since >= UNCONTINUED_AFTER_S)

    @property
    def account(self) -> str:
        return self.lease.job.account

    @property
    def rank(self) -> int:
        return PRIORITIES.index(self.lease.job.priority)


def pool_to_end(entries: List[Warm], room_mb: float, max_count: int, now: Optional[float] = None) -> List[Warm]:
    """Which pooled CLIs end so that the rest fit in `room_mb` and number at most `max_count`
    (`entries` least recently used first). Each key has a fair share — the room over the keys
    present — and the key furthest over its share loses its own least recently used first,
    among the keys of the lowest priority present: a high key's CLIs outlast a low key's; within a
    key, a conversation not continued within UNCONTINUED_AFTER_S (at `now`) goes before the rest."""
    rest, ending = list(entries), []
    while rest and (len(rest) > max_count or sum(w.rss_mb for w in rest) > room_mb):
        share = room_mb / len({w.account for w in rest})
        used = collections.Counter()
        for warm in rest:
            used[warm.account] += warm.rss_mb
        lowest = min(w.rank for w in rest)
        victim = min((w for w in rest if w.rank == lowest),
                     key=lambda w: (-(used[w.account] - share), not w.unpromising(now), rest.index(w)))
        rest.remove(victim)
        ending.append(victim)
    return ending


class Pool:
    """Idle CLI processes kept for the next request, within a memory budget (OCP_POOL_MAX_MB).

    A CLI comes here *warm* — spawned after a use of its configuration (`replenish`)
    and warmed with /clear — or *holding the conversation* its last turn ended,
    for the follow-up that continues it (`claim`). `take(key)` lends a warm one,
    else resets (/clear) the least recently used holder with that spawn key; the
    key includes the API key, so nothing crosses keys. Idle ones end after
    OCP_POOL_IDLE_TTL. The budget is shared with the parked tool rounds, which come
    first (Runner.idle_mb); over it, or past OCP_POOL_MAX_CLIS, pool_to_end says who goes
    (each key a fair share, a high key's kept over a low key's). A pooled CLI holds no
    slot and makes no upstream request; an ended one is killed outright. Thread-safe.
    """

    def __init__(self, runner: "Runner"):
        self.runner = runner
        self.may_spawn: Callable[[str], bool] = lambda model_id: True  # the server's word: not while the plan
        # holds that model's requests
        self.memory_mb = machine_memory_mb()
        self._cond = threading.Condition()
        self._entries: List[Warm] = []  # least recently used first
        self._spawning: Dict[str, float] = {}  # spawn key -> MiB guessed, while a warm CLI starts
        self._thread: Optional[threading.Thread] = None
        self.closed = False
        self.largest_mb = 0.0  # the largest pooled CLI measured: the guess for the next one
        self.hits = {"warm": 0, "reset": 0, "continued": 0}
        self.evictions = {"budget": 0, "idle": 0, "exited": 0, "cleared": 0}
        self.misses = self.spawned = 0
        self.spares = {"used": 0, "unused": 0}  # warm spares a request took, or that ended untouched
        self._uses: "collections.OrderedDict[str, int]" = collections.OrderedDict()  # spawn key -> uses seen

    def enabled(self) -> bool:
        return self.runner.config.pool and not self.closed

    def budget_mb(self) -> int:
        """MiB the kept CLIs — pooled and parked — may use together."""
        return self.runner.config.pool_max_mb or default_pool_mb(self.memory_mb)

    def max_count(self) -> int:
        """Idle CLIs kept at most: each costs the daemon a reader thread and descriptors."""
        return self.runner.config.pool_max_clis or 2 * self.runner.config.max_concurrent

    def room_mb(self) -> float:
        """What the pool may use: the budget less the idle CLIs' outside it (parked, or taken by a
        request still waiting for a slot)."""
        return self.budget_mb() - self.runner.idle_mb()

    def fit(self) -> int:
        """End pooled CLIs until the pool fits its room and count (a park just took some)."""
        with self._cond:  # (the room is read under the pool's lock: see keep)
            evicted = self._shed(self.room_mb())
        for warm in evicted:
            warm.lease.kill("evicted")
        return len(evicted)

    def _shed(self, room_mb: float) -> List[Warm]:
        """(under the lock) Take out what pool_to_end names; return it for the caller to end."""
        evicted = pool_to_end(self._entries, room_mb - sum(self._spawning.values()), self.max_count(),
                              self.runner.clock())
        for warm in evicted:
            self._entries.remove(warm)
        self.evictions["budget"] += len(evicted)
        self.spares["unused"] += sum(w.lease.spare for w in evicted)
        return evicted

    # -- lending -------------------------------------------------------------

    def take(self, key: str) -> Optional[Lease]:
        """A pooled CLI for a new conversation with spawn key `key`: a warm one, else the least
        recently used holder of another conversation, reset; None when there is neither."""
        if not key:
            return None
        while True:
            with self._cond:
                same = [w for w in self._entries if w.lease.key == key]
                if not same:
                    self.misses += 1
                    return None
                found = min(same, key=lambda w: bool(w.conversation))  # warm first, else the oldest holder
                self._entries.remove(found)
                self.spares["used"] += found.lease.spare
                found.lease.spare, found.lease.continued = False, 0
            lease = found.lease
            if lease.proc.popen.poll() is None and (not found.conversation or lease.reset()):
                with self._cond:
                    self.hits["reset" if found.conversation else "warm"] += 1
                lease.pooled = ""
                return lease
            log.warning("a pooled CLI had exited or did not confirm /clear: ended")
            lease.kill("reset")

    def holds(self, conversation: str, account: str) -> bool:
        with self._cond:
            return any(w.conversation == conversation and w.lease.job.account == account for w in self._entries)

    def claim(self, conversation: str, account: str) -> Optional[Lease]:
        """The CLI holding `conversation` for `account`, taken out of the pool; None if there is
        none, or if it runs on a login that is no longer the current one (it could not refresh it)."""
        with self._cond:
            found = [w for w in self._entries if w.conversation == conversation and w.lease.job.account == account]
            if found:
                self._entries.remove(found[0])
        if not found:
            return None
        lease = found[0].lease
        if lease.creds != self.runner.credentials():
            log.info("a pooled conversation's CLI runs on an older login: ended, the history goes as text")
            lease.kill("login changed")
            return None
        with self._cond:
            self.hits["continued"] += 1
        lease.continued += 1
        lease.pooled, lease.rss_mb = "", found[0].rss_mb  # until it runs, it counts as idle outside the pool
        return lease

    # -- keeping -------------------------------------------------------------

    def keep(self, lease: Lease, conversation: str) -> bool:
        """Pool an idle CLI; False (the caller ends it) when the pool is off or closed, the CLI
        may not be pooled, exited, or grew past POOL_MAX_CLI_MB or the budget. Older ones make room."""
        if not (self.enabled() and lease.key and lease.proc.popen.poll() is None):
            return False
        rss = rss_mb(lease.proc.pid)
        with self._cond:
            # The room is read under the lock: a park put meanwhile is seen here, or its fit() sees this CLI.
            room = self.room_mb()
            if self.closed or rss > min(room, POOL_MAX_CLI_MB):
                return False
            self.largest_mb = max(self.largest_mb, rss)
            warm = Warm(lease, conversation, self.runner.clock(), rss)
            if warm in pool_to_end(self._entries + [warm], room - sum(self._spawning.values()), self.max_count(),
                                   warm.since):
                return False  # it would push out a higher key's CLI, or a fairer share: it goes itself
            self._entries.append(warm)
            evicted = self._shed(room)
            lease.park()
            lease.pooled = "conversation" if conversation else "warm"
            if self._thread is None:
                self._thread = threading.Thread(target=self._reap, name="ocp-pool", daemon=True)
                self._thread.start()
            self._cond.notify()
        for warm in evicted:
            warm.lease.kill("evicted")
        return True

    def _used_mb(self) -> float:
        return sum(w.rss_mb for w in self._entries) + sum(self._spawning.values())

    def replenish(self, lease: Lease) -> None:
        """Spawn-after-use: a lease that began a conversation of this configuration ended and the
        configuration recurs (this key began conversations with it before: an agent's system
        prompt names its project, so a spare for a one-off shape would wait for nothing), so a warm
        CLI for it starts in the background — unless one is there or starting, it would not fit,
        a slot is not free, or the plan is held."""
        if lease.continued or not (lease.key and self.enabled() and self.recurs(lease.key)
                                   and self.may_spawn(lease.spawn_job.model) and not self.runner.stopping):
            return  # (a continued conversation took no spare: none is owed)
        guess = self.largest_mb or POOL_RSS_GUESS_MB
        with self._cond:
            if lease.key in self._spawning or any(w.lease.key == lease.key and not w.conversation
                                                  for w in self._entries):
                return
            if self._used_mb() + guess > self.room_mb() or len(self._entries) >= self.max_count():
                return
            self._spawning[lease.key] = guess
        threading.Thread(target=self._warm_up, args=(lease.spawn_job, lease.creds, lease.key),
                         name="ocp-pool-spawn", daemon=True).start()

    def recurs(self, key: str) -> bool:
        """Count a conversation begun with spawn key `key`; True once OCP_POOL_SPARE_AFTER were (the
        last USES_REMEMBERED keys counted)."""
        with self._cond:
            uses = self._uses.pop(key, 0) + 1
            self._uses[key] = uses
            while len(self._uses) > USES_REMEMBERED:
                self._uses.popitem(last=False)
        after = self.runner.config.pool_spare_after
        return bool(after) and uses >= after

    def _warm_up(self, job: Job, creds: Credentials, key: str) -> None:
        runner = self.runner
        job = dataclasses.replace(job, blocks=(), request_id="warm-" + secrets.token_hex(4))
        lease = runner.lease(job, lambda: self.closed, ToolBridge(job.tools) if job.tools else None)
        kept = False
        try:
            if not self.closed and lease.take_free_slot():  # a busy machine gets no speculative spawn
                lease.start(creds, key)
                ready = lease.reset()
                self._started(key)  # from now on its measured size counts, not the guess
                lease.spare = True
                kept = ready and self.keep(lease, "")
        except (ApiError, OSError) as e:
            log.info("no warm CLI: %s", getattr(e, "message", None) or e)
        finally:
            self._started(key)
            with self._cond:
                self.spawned += kept
            if not kept:
                lease.kill()

    def _started(self, key: str) -> None:
        with self._cond:
            self._spawning.pop(key, None)

    # -- ending --------------------------------------------------------------

    def _reap(self) -> None:
        """End the CLIs idle past the TTL and forget those that exited; measure the rest."""
        while True:
            with self._cond:
                now, ttl = self.runner.clock(), self.runner.config.pool_idle_ttl_ms / 1000
                gone = [w for w in self._entries if w.since + ttl <= now or w.lease.proc.popen.poll() is not None]
                for warm in gone:
                    self._entries.remove(warm)
                    self.evictions["idle" if warm.since + ttl <= now else "exited"] += 1
                    self.spares["unused"] += warm.lease.spare
                entries = list(self._entries)
            for warm in gone:
                warm.lease.kill("idle")
            for warm in entries:
                warm.rss_mb = rss_mb(warm.lease.proc.pid) or warm.rss_mb
            if entries:
                self.fit()  # CLIs grow: measured past the room, the fair order says who goes
            with self._cond:
                if self.closed:
                    return
                if not self._entries:
                    self._cond.wait()
                    continue
                wait = min(w.since + ttl for w in self._entries) - self.runner.clock()
                self._cond.wait(min(max(wait, 0.05), 5.0))

    def clear(self, reason: str = "cleared") -> int:
        """End every pooled CLI (DELETE /sessions, shutdown); return how many."""
        with self._cond:
            entries, self._entries = self._entries, []
            self.evictions["cleared"] += len(entries)
            self.spares["unused"] += sum(w.lease.spare for w in entries)
            self._cond.notify()
        for warm in entries:
            warm.lease.kill(reason)
        return len(entries)

    def close(self) -> int:
        """Shutdown: nothing more is pooled or spawned, every pooled CLI ends."""
        with self._cond:
            self.closed = True
        return self.clear("shutdown")

    def snapshot(self) -> Dict[str, Any]:
        with self._cond:
            return {"warm": sum(1 for w in self._entries if not w.conversation),
                    "conversations": sum(1 for w in self._entries if w.conversation),
                    "starting": len(self._spawning), "rss_mb": round(sum(w.rss_mb for w in self._entries), 1),
                    "budget_mb": self.budget_mb() if self.runner.config.pool else 0,
                    "hits": dict(self.hits), "misses": self.misses, "spawned": self.spawned,
                    "spares": dict(self.spares),
                    "evictions": dict(self.evictions)}


def lease_state(lease: Lease) -> str:
    """What a live CLI is doing: running (it holds a slot), parked (on a tool round), warm or
    conversation (pooled), or waiting (taken from the pool or a park by a request still in line)."""
    if lease.pooled:
        return lease.pooled
    if lease.has_slot:
        return "running"
    return "parked" if lease.parked_round else "waiting"


class Runner:
    """Starts CLI processes for jobs: slots, credentials, scratch dirs, live set, warm pool."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.config = config
        self.clock, self.wall = clock, wall
        self.slots = Slots(config.max_concurrent, config.max_queue)
        self.claude = find_claude(config)
        self.refresh_lock = threading.Lock()  # one child at a time may refresh the login
        self.live_lock = threading.Lock()
        self._live: Dict[str, Lease] = {}
        self.leases_made = self.leases_ended = 0  # every lease ends once: equal when idle
        self.reaping = 0  # leases whose process is being reaped off the request's path (retire_later)
        self._version: Optional[str] = None
        self.kill_grace_s = KILL_GRACE_S
        self.keeper = Keeper()
        self.sweeper = Sweeper(self.keeper.let_go)
        self.stopping = False
        self.pool = Pool(self)

    # -- setup ---------------------------------------------------------------

    def prepare(self) -> None:
        """Create the scratch area and remove what earlier runs left behind."""
        os.makedirs(self.config.spawn_dir, mode=0o700, exist_ok=True)
        for name in os.listdir(self.config.spawn_dir):
            if name.startswith("run-"):
                end_leftover(os.path.join(self.config.spawn_dir, name))
                shutil.rmtree(os.path.join(self.config.spawn_dir, name), ignore_errors=True)
        for sub in ("home", os.path.join("home", ".claude"), "work"):
            os.makedirs(os.path.join(self.config.spawn_dir, sub), mode=0o700, exist_ok=True)

    def version(self) -> str:
        """Return `claude --version` (cached), or "" when it cannot run."""
        if self._version is None and self.claude:
            try:
                out = subprocess.run([self.claude, "--version"], capture_output=True, text=True,
                                     timeout=15, env=dict(self.config.environ))
                self._version = out.stdout.strip().split(" ")[0] if out.returncode == 0 else ""
            except (OSError, subprocess.SubprocessError):
                self._version = ""
        return self._version or ""

    def live(self) -> List[Dict[str, Any]]:
        now = time.monotonic()
        with self.live_lock:
            return [{"id": rid, "pid": lease.proc.pid, "key": lease.job.owner, "model": lease.job.model,
                     "age_s": round(now - lease.proc.started, 1), "parked": lease.parked_round,
                     "state": lease_state(lease)} for rid, lease in self._live.items()]

    def idle_mb(self) -> float:
        """MiB of the live CLIs that hold no slot and are not pooled: parked on a tool round, or
        taken from the pool or a park by a request still in line."""
        with self.live_lock:
            return sum(lease.rss_mb for lease in self._live.values() if not lease.has_slot and not lease.pooled)

    def cancel(self, run_id: str, reason: str = "operator") -> bool:
        with self.live_lock:
            lease = self._live.get(run_id)
        if lease:
            lease.cancel(reason)
        return lease is not None

    def apply(self, config: Config) -> None:
        """Runtime settings changed: the next run uses them, the slots resize now."""
        self.config = config
        self.slots.resize(config.max_concurrent, config.max_queue)

    def cancel_all(self, reason: str = "operator") -> int:
        with self.live_lock:
            leases = list(self._live.values())
        for lease in leases:
            lease.cancel(reason)
        return len(leases)

    def stop(self) -> int:
        """Shutting down: start nothing more, refuse the queue; return how many were waiting."""
        with self.live_lock:  # a spawn registering after this sees it and cancels itself
            self.stopping = True
        return self.slots.close()

    # -- leases --------------------------------------------------------------

    def lease(self, job: Job, cancelled: Callable[[], bool] = lambda: False,
              on_control: Optional[Callable[[ClaudeProcess, Dict[str, Any]], None]] = None,
              adopt: Optional[Lease] = None) -> Lease:
        """A lease for `job`: nothing starts until its `acquire()`. `cancelled()` is the
        request's word that its client left (checked while queued); `adopt` is a CLI claimed
        from the pool that holds the request's conversation."""
        with self.live_lock:
            self.leases_made += 1
        return Lease(self, job, cancelled, on_control, adopt)

    def credentials(self) -> Credentials:
        """How the next child logs in, as of now."""
        return resolve_credentials(self.config.environ, self.config.user_home, self.wall(), keychain=recent_keychain)

    def hand_over(self, old: Lease, new: Lease) -> None:
        """`new` adopted `old`'s CLI (from the pool): the live set names the new request, `old` ends."""
        with self.live_lock:
            self._live.pop(old.job.request_id or str(old.proc.pid), None)
            self._live[new.job.request_id or str(new.proc.pid)] = new
            old.ended = "handed over"
            self.leases_ended += 1

    def spawn(self, lease: Lease, creds: Credentials) -> ClaudeProcess:
        """Start the lease's CLI in its run dir and register it (live set, keeper, run dir record)."""
        job, run_dir = lease.job, lease.run_dir
        isolate = creds.isolated and self.config.no_context
        scratch = None
        if isolate:
            home = os.path.join(self.config.spawn_dir, "home")
            scratch = {"home": home, "config": os.path.join(home, ".claude")}
        env = child_env(self.config.environ, self.config, creds, scratch, job.max_tokens)
        env["TMPDIR"] = os.path.join(run_dir, "tmp")
        if job.tools:  # OCP cuts results itself; the CLI's own limit would hide them in a file
            env["MAX_MCP_OUTPUT_TOKENS"] = "500000"
        argv = claude_argv(self.claude, job, self._system_arg(job, run_dir), self.config.allowed_tools)
        # One working directory for every child: the CLI tells the model its cwd, and a
        # per-request path would make that text differ on every request.
        cwd = os.path.join(self.config.spawn_dir, "work")
        if self.stopping:
            raise shutting_down()
        try:
            proc = ClaudeProcess(argv, env, cwd, run_dir, self.kill_grace_s, lease.on_control)
        except OSError as e:
            log.error("cannot start claude: %s", e.strerror)
            raise ApiError(503, "The claude CLI could not be started. Check that it is "
                           "installed (npm i -g @anthropic-ai/claude-code).", "proxy_error",
                           "claude_unavailable") from None
        lease.proc = proc
        self.keeper.add(proc.pid)
        with open(os.path.join(run_dir, CHILD_FILE), "w", encoding="utf-8") as f:
            f.write(f"{proc.pid} {proc.pid} {process_identity(proc.pid)}")  # found again after a crash
        with self.live_lock:
            self._live[job.request_id or str(proc.pid)] = lease
            stopping = self.stopping
        if stopping:  # shutdown began while it started: cancel_all may not have seen it
            proc.cancel("shutdown")
        return proc

    def make_run_dir(self, request_id: str) -> str:
        """Make a fresh run directory, told to the keeper before it exists: a kill -9 at any
        moment leaves none behind (the sweeper lets the keeper go of it once removed)."""
        while True:
            path = os.path.join(self.config.spawn_dir, f"run-{request_id}-{secrets.token_hex(6)}")
            self.keeper.claim(path)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # another run's: it is claimed by that run too, and let go by it
            os.mkdir(os.path.join(path, "tmp"), 0o700)
            return path

    def retire_later(self, lease: Lease) -> None:
        """A request's lease ended: its answer goes out now, and a thread of its own waits for the
        CLI to exit (the real CLI takes ~50 ms after its stdin closes: measured, 2.1.330). Until
        then the process keeps its slot and its place in the live set (shutdown waits for it);
        a request in line for that slot is let in even past a full line (Slots.finishing)."""
        if lease.proc is not None:
            lease.proc.close_stdin(wait=False)  # it starts exiting now
        self.slots.finishing(lease)
        with self.live_lock:
            self.reaping += 1
        WORKERS.run(self._reap, lease)

    def _reap(self, lease: Lease) -> None:
        try:
            self.retire(lease)
        finally:
            with self.live_lock:
                self.reaping -= 1

    def retire(self, lease: Lease) -> None:
        """A lease ended (Lease._end, once): reap its process, give back its slot and lock."""
        proc = lease.proc
        try:
            if proc is not None:
                code = proc.close()
                self.keeper.remove(proc.pid)
                if code not in (0, 1, None) and not proc.cancelled:
                    log.warning("claude exited %s: %s", code, scrub_paths(proc.stderr_tail(300)))
        finally:
            with self.live_lock:
                if proc is not None:
                    self._live.pop(lease.job.request_id or str(proc.pid), None)
                self.leases_ended += 1
            if lease.has_refresh_lock:
                lease.has_refresh_lock = False
                self.refresh_lock.release()
            lease.has_slot = False
            self.slots.release(lease)  # whatever has_slot said: a slot it holds is given back
            if lease.run_dir:
                self.sweeper.remove(lease.run_dir)

    def _system_arg(self, job: Job, run_dir: str) -> Tuple[str, str]:
        if len(job.system_prompt.encode("utf-8")) <= ARGV_PROMPT_LIMIT:
            return ("--system-prompt", job.system_prompt)
        path = os.path.join(run_dir, SYSTEM_PROMPT_FILE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(job.system_prompt)
        return ("--system-prompt-file", path)


###############################################################################
# Requests (wire formats → TurnRequest) #######################################
###############################################################################

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium",
           "high": "high", "xhigh": "xhigh", "max": "max"}
MAX_STOP_SEQUENCES = 4


@dataclasses.dataclass(frozen=True)
class TurnRequest:
    """One request in no wire format's terms: each API's parser builds one.

    `turns` are {"role": "user" | "assistant" | "tool", "content": [block, ...]}
    with neutral blocks: {"type": "text", "text"}, {"type": "image", "url"},
    {"type": "tool_call", "id", "name", "arguments"} and {"type": "tool_result",
    "id", "content"}. `system` holds the system texts in order.
    """

    model: Model
    turns: Tuple[Dict[str, Any], ...]
    system: Tuple[str, ...] = ()
    tools: Tuple[Dict[str, Any], ...] = ()
    stream: bool = False
    include_usage: bool = False  # a usage report at the end of the stream
    stop: Tuple[str, ...] = ()
    max_tokens: int = 0
    effort: str = ""
    response_format: str = "text"  # text | json_object | json_schema
    json_schema: Optional[Dict[str, Any]] = None
    user: str = ""
    owner: str = ""  # whose request (a key id or name): set once the caller is known
    sampling: Tuple[Tuple[str, Any], ...] = ()  # answer-affecting knobs the CLI has no flag for
    no_cache: str = ""  # why it must not be cached or shared, "" when it may be
    tool_choice: str = "auto"  # auto | none
    parallel_tool_calls: bool = True
    legacy_functions: bool = False  # OpenAI's older functions/function_call form: one call, no ids
    show_reasoning: bool = True  # the client wants the model's thinking (Anthropic: when it enabled it)
    tools_ignored: bool = False  # the client sent tools, the operator turned client tools off


def check_type(body: Mapping[str, Any], name: str, kinds: Tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"'{name}' must be {what}", name, "invalid_type")
    if not isinstance(value, kinds):
        raise bad_request(f"'{name}' must be {what}", name, "invalid_type")
    return value


# -- OpenAI chat completions → TurnRequest ---------------------------------------------


def parse_chat_request(body: Any, models: Models, config: Config) -> TurnRequest:
    """Validate an OpenAI chat completion body; raise ApiError 400 on the first problem."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", None, "invalid_json")
    model = models.resolve(body.get("model"), config.default_model)
    messages = check_type(body, "messages", (list,), "an array of messages")
    if not messages:
        raise bad_request("'messages' must be a non-empty array", "messages", "empty_messages")
    for index, message in enumerate(messages):
        check_message(message, index)
    for name in SAMPLING_FIELDS:
        check_type(body, name, (int, float), "a number")
    stream = bool(check_type(body, "stream", (bool,), "a boolean"))
    options = check_type(body, "stream_options", (dict,), "an object") or {}
    check_unsupported(body)
    format_type, schema = parse_response_format(body.get("response_format"))
    legacy = bool(check_type(body, "functions", (list,), "an array of functions")) and not body.get("tools")
    tools = parse_tools([{"type": "function", "function": f} for f in body["functions"]] if legacy
                        else body.get("tools"))
    parallel = check_type(body, "parallel_tool_calls", (bool,), "a boolean")
    choice = body.get("function_call") if legacy else body.get("tool_choice")
    return TurnRequest(
        model=model, turns=tuple(chat_turn(m) for m in messages if m["role"] not in ("system", "developer")),
        system=tuple(part_text(m.get("content")) for m in messages if m["role"] in ("system", "developer")),
        stream=stream, include_usage=stream and options.get("include_usage") is True,
        stop=parse_stop(body.get("stop")), max_tokens=parse_max_tokens(body, model),
        effort=parse_effort(body.get("reasoning_effort")), response_format=format_type,
        json_schema=schema, user=str(check_type(body, "user", (str,), "a string") or ""),
        sampling=tuple((f, body.get(f)) for f in SAMPLING_FIELDS), no_cache=cache_bypass(body),
        tools=tools if config.client_tools else (), tool_choice=choice or "auto",
        parallel_tool_calls=parallel is not False and not legacy, legacy_functions=legacy,
        tools_ignored=bool(tools) and not config.client_tools)


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_tools(tools: Any) -> Tuple[Dict[str, Any], ...]:
    """The client's function tools as {name, description, parameters}; other kinds are dropped.
    Names must be 1-64 of [A-Za-z0-9_-] and distinct (400 naming the tool)."""
    parsed: List[Dict[str, Any]] = []
    for index, tool in enumerate(tools or []):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise bad_request(f"{param} must be an object", param, "invalid_type")
        if tool.get("type") != "function":
            log.info("a %s tool was dropped: only function tools reach the model", str(tool.get("type"))[:40])
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad_request(f"{param}.function.name must be 1-64 letters, digits, '_' or '-'",
                              f"{param}.function.name", "invalid_tool_name")
        if any(t["name"] == name for t in parsed):
            raise bad_request(f"Two tools are named {name!r}", f"{param}.function.name", "duplicate_tool_name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"{param}.function.parameters must be a JSON Schema object",
                              f"{param}.function.parameters", "invalid_type")
        description = function.get("description")
        parsed.append({"name": name, "description": description if isinstance(description, str) else "",
                       "parameters": parameters or {"type": "object", "properties": {}}})
    return tuple(parsed)


def image_url(part: Dict[str, Any]) -> str:
    image = part["image_url"]
    return image["url"] if isinstance(image, dict) else image


def part_text(content: Any) -> str:
    """Return the text of an OpenAI message's content (string or parts), images left out."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = [p.get("text") or p.get("refusal") or "" for p in content
             if isinstance(p, dict) and p.get("type") in ("text", "refusal")]
    return "\n".join(texts)


def chat_turn(message: Dict[str, Any]) -> Dict[str, Any]:
    """One checked OpenAI message as a neutral turn."""
    role, content = message["role"], message.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
    if role in ("tool", "function"):
        call_id = str(message.get("tool_call_id") or message.get("name") or "")
        return {"role": "tool", "content": [{"type": "tool_result", "id": call_id, "content": part_text(content)}]}
    blocks: List[Dict[str, Any]] = []
    for part in parts:
        if part["type"] == "image_url":
            blocks.append({"type": "image", "url": image_url(part)})
        else:
            blocks.append({"type": "text", "text": part.get("text") or part.get("refusal") or ""})
    legacy = [{"id": "", "function": message["function_call"]}] if message.get("function_call") else []
    for call in (message.get("tool_calls") or []) + legacy:
        function = call["function"]
        blocks.append({"type": "tool_call", "id": call.get("id", ""), "name": function["name"],
                       "arguments": function.get("arguments", "")})
    return {"role": role, "content": blocks}


SESSION_FIELDS = ("session_id", "conversation_id", "thread_id", "previous_response_id")
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


def cache_bypass(body: Mapping[str, Any]) -> str:
    """Return why a request must not be cached or shared ("" when it may be)."""
    if body.get("tools") or body.get("functions"):
        return "tools"
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    if any(body.get(f) or metadata.get(f) for f in SESSION_FIELDS):
        return "session"
    for message in body.get("messages") or ():  # (a message's or a content block's marker)
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(message, dict) and "cache_control" in message or isinstance(content, list) and any(
                isinstance(block, dict) and "cache_control" in block for block in content):
            return "cache_control"
    return ""


# -- Anthropic messages → TurnRequest -------------------------------------------------------

ANTHROPIC_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "max"}
BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's first system block, different each request


def parse_messages_request(body: Any, models: Models, config: Config) -> TurnRequest:
    """Validate an Anthropic Messages body (AGENTS-SPEC §3.2); what Claude Code sends and OCP
    has no use for (temperature, metadata, context_management, …) is accepted and ignored."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", None, "invalid_json")
    try:
        model = models.resolve(body.get("model"), config.default_model)
    except ApiError as e:
        raise ApiError(404, f"model: {str(body.get('model'))[:100]}", "not_found_error", "model_not_found",
                       "model") if e.code != "missing_model" else e
    messages = check_type(body, "messages", (list,), "an array of messages")
    if not messages:
        raise bad_request("'messages' must be a non-empty array", "messages", "empty_messages")
    turns = tuple(anthropic_turn(m, i) for i, m in enumerate(messages))
    stream = bool(check_type(body, "stream", (bool,), "a boolean"))
    max_tokens = check_type(body, "max_tokens", (int,), "a positive integer") or 0
    if max_tokens < 0 or max_tokens > model.max_output:
        raise bad_request(f"max_tokens: {max_tokens} is more than {model.id} can produce ({model.max_output})",
                          "max_tokens")
    stops = check_type(body, "stop_sequences", (list,), "an array of strings") or []
    if not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop_sequences must be non-empty strings", "stop_sequences")
    tools = parse_tools([{"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                                          "parameters": t.get("input_schema")}}
                         for t in check_type(body, "tools", (list,), "an array of tools") or []
                         if isinstance(t, dict) and t.get("type") in (None, "custom")])
    choice = anthropic_tool_choice(body.get("tool_choice"))
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    effort = ((body.get("output_config") or {}) if isinstance(body.get("output_config"), dict) else {}).get("effort")
    return TurnRequest(
        model=model, turns=turns, system=anthropic_system(body.get("system")), stream=stream,
        stop=tuple(stops), max_tokens=max_tokens, effort=ANTHROPIC_EFFORTS.get(effort, ""),
        tools=tools if config.client_tools else (), tool_choice=choice,
        parallel_tool_calls=not (body.get("tool_choice") or {}).get("disable_parallel_tool_use")
        if isinstance(body.get("tool_choice"), dict) else True,
        tools_ignored=bool(tools) and not config.client_tools,
        show_reasoning=thinking.get("type") in ("enabled", "adaptive"),
        no_cache="tools" if tools else ("cache_control" if '"cache_control"' in json.dumps(messages) else ""))


def anthropic_system(system: Any) -> Tuple[str, ...]:
    if isinstance(system, str):
        return (system,)
    if not isinstance(system, list):
        return ()
    texts = [b.get("text") for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return tuple(t for t in texts if not t.startswith(BILLING_HEADER))


def anthropic_tool_choice(choice: Any) -> str:
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if kind in (None, "auto"):
        return "auto"
    if kind == "none":
        return "none"
    if kind in ("any", "tool"):
        raise unsupported("tool_choice", "Forcing a tool call is not supported: nothing can make the model call "
                          "one; use tool_choice auto or none.")
    raise bad_request("tool_choice.type must be auto, any, tool or none", "tool_choice")


def anthropic_turn(message: Any, index: int) -> Dict[str, Any]:
    """One Anthropic message as a neutral turn: tool results make a "tool" turn (other text in
    that message is added to the last result, as Claude Code's reminders), thinking is dropped."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
        raise bad_request(f"{param}.role must be user or assistant", f"{param}.role", "invalid_role")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise bad_request(f"{param}.content must be a string or an array of blocks", f"{param}.content", "invalid_type")
    blocks = [anthropic_block(b, f"{param}.content[{i}]") for i, b in enumerate(content)]
    blocks = [b for b in blocks if b is not None]
    results = [b for b in blocks if b["type"] == "tool_result"]
    if results:
        extra = "\n".join(b["text"] for b in blocks if b["type"] == "text")
        if extra:
            results[-1] = dict(results[-1], content=(results[-1]["content"] + "\n" + extra).strip("\n"))
        return {"role": "tool", "content": results}
    return {"role": message["role"], "content": blocks}


def anthropic_block(block: Any, param: str) -> Optional[Dict[str, Any]]:
    if not isinstance(block, dict):
        raise bad_request(f"{param} must be an object", param, "invalid_type")
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise bad_request(f"{param}.text must be a string", f"{param}.text", "invalid_type")
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        source = block.get("source") if isinstance(block.get("source"), dict) else {}
        if source.get("type") == "base64":
            return {"type": "image", "url": f"data:{source.get('media_type')};base64,{source.get('data')}"}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return {"type": "image", "url": source["url"]}
        raise bad_request(f"{param}.source must be a base64 or url image source", param, "invalid_image")
    if kind == "tool_use":
        if not isinstance(block.get("name"), str):
            raise bad_request(f"{param}.name must be a string", param, "invalid_type")
        return {"type": "tool_call", "id": str(block.get("id") or ""), "name": block["name"],
                "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}
    if kind == "tool_result":
        content = block.get("content")
        parts = [b for b in (content if isinstance(content, list) else []) if isinstance(b, dict)]
        text = content if isinstance(content, str) else "\n".join(b.get("text", "") for b in parts if b.get("type") == "text")
        images = [anthropic_block(b, param)["url"] for b in parts if b.get("type") == "image"]
        return {"type": "tool_result", "id": str(block.get("tool_use_id") or ""), "content": text,
                "is_error": block.get("is_error") is True, "images": images}
    if kind in ("thinking", "redacted_thinking"):
        return None  # their signatures bind to a prefix the CLI builds itself
    if kind == "document":
        raise unsupported(param, "document blocks are not supported yet; send the text.")
    raise bad_request(f"Content block type {str(kind)[:40]!r} is not supported in {param}", param,
                      "unsupported_content_part")


# -- OpenAI responses → TurnRequest ---------------------------------------------------------


def parse_responses_request(body: Any, models: Models, config: Config) -> TurnRequest:
    """Validate an OpenAI Responses body (AGENTS-SPEC §2.1): Codex's and the SDKs'. OCP keeps no
    responses, so a `previous_response_id` or an item reference is a clear 400."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", None, "invalid_json")
    model = models.resolve(body.get("model"), config.default_model)
    if body.get("previous_response_id"):
        raise ApiError(400, "OCP does not store responses; send the whole input instead of previous_response_id.",
                       "invalid_request_error", "previous_response_not_found", "previous_response_id")
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a string or a non-empty array of items", "input", "invalid_type")
    system = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
    turns: List[Dict[str, Any]] = []
    for index, item in enumerate(items):
        responses_item(item, f"input[{index}]", system, turns)
    tools = parse_tools([{"type": "function", "function": t} for t in check_type(body, "tools", (list,), "an array") or []
                         if isinstance(t, dict) and t.get("type") == "function"])
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        raise unsupported("tool_choice", "Forcing a tool call is not supported: nothing can make the model call "
                          "one; use tool_choice auto or none.")
    max_tokens = check_type(body, "max_output_tokens", (int,), "a positive integer") or 0
    text_format = check_type(check_type(body, "text", (dict,), "an object") or {}, "format", (dict,),
                             "an object") or {}
    format_type, schema = parse_response_format({"type": text_format.get("type"), "json_schema": {
        "schema": text_format.get("schema")}} if text_format.get("type") else None)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    return TurnRequest(
        model=model, turns=tuple(turns), system=tuple(system),
        stream=bool(check_type(body, "stream", (bool,), "a boolean")), max_tokens=min(max_tokens, model.max_output),
        effort=parse_effort((reasoning or {}).get("effort")), response_format=format_type, json_schema=schema,
        tools=tools if config.client_tools else (), tool_choice=choice or "auto",
        parallel_tool_calls=body.get("parallel_tool_calls") is not False,
        tools_ignored=bool(tools) and not config.client_tools, show_reasoning=reasoning is not None,
        no_cache="tools" if tools else "")


def responses_item(item: Any, param: str, system: List[str], turns: List[Dict[str, Any]]) -> None:
    """One input item into the system texts or the neutral turns (consecutive tool results
    make one "tool" turn); reasoning and other items OCP cannot use are dropped."""
    if not isinstance(item, dict):
        raise bad_request(f"{param} must be an object", param, "invalid_type")
    kind = item.get("type") or "message"
    if kind == "item_reference":
        raise ApiError(400, "OCP does not store responses; send the whole input instead of item references.",
                       "invalid_request_error", "previous_response_not_found", param)
    if kind == "function_call":
        call = {"type": "tool_call", "id": str(item.get("call_id") or ""), "name": str(item.get("name") or ""),
                "arguments": item.get("arguments") if isinstance(item.get("arguments"), str) else "{}"}
        if turns and turns[-1]["role"] == "assistant":
            turns[-1]["content"].append(call)
        else:
            turns.append({"role": "assistant", "content": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else part_text(
            [dict(p, type="text") for p in output or [] if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")])
        result = {"type": "tool_result", "id": str(item.get("call_id") or ""), "content": text}
        if turns and turns[-1]["role"] == "tool":
            turns[-1]["content"].append(result)
        else:
            turns.append({"role": "tool", "content": [result]})
    elif kind == "message":
        role, content = item.get("role"), item.get("content")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad_request(f"{param}.role must be user, assistant, system or developer", f"{param}.role", "invalid_role")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise bad_request(f"{param}.content must be a string or an array of parts", f"{param}.content", "invalid_type")
        blocks = [responses_part(p, f"{param}.content[{i}]") for i, p in enumerate(parts)]
        if role in ("system", "developer"):
            system.append("\n".join(b["text"] for b in blocks if b["type"] == "text"))
        elif turns and turns[-1]["role"] == role == "assistant":
            turns[-1]["content"] = blocks + turns[-1]["content"]
        else:
            turns.append({"role": role, "content": blocks})
    else:
        log.debug("a %s input item was dropped", str(kind)[:40])


def responses_part(part: Any, param: str) -> Dict[str, Any]:
    if not isinstance(part, dict):
        raise bad_request(f"{param} must be an object", param, "invalid_type")
    if part.get("type") in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if part.get("type") == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image", "url": part["image_url"]}
    raise bad_request(f"Content part type {str(part.get('type'))[:40]!r} is not supported in {param}", param,
                      "unsupported_content_part")


def check_message(message: Any, index: int) -> None:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object", param, "invalid_type")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(f"{param}.role must be one of {', '.join(MESSAGE_ROLES)}",
                          f"{param}.role", "invalid_role")
    if role == "assistant" and message.get("tool_calls") is not None:
        check_tool_calls(message["tool_calls"], f"{param}.tool_calls")
    if role == "assistant" and message.get("function_call") is not None:  # the legacy form of one call
        check_tool_calls([{"function": message["function_call"]}], f"{param}.function_call")
    content = message.get("content")
    if content is None and role in ("assistant", "tool", "function"):
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad_request(f"{param}.content must be a string or an array of content parts",
                          f"{param}.content", "invalid_type")
    for part_index, part in enumerate(content):
        check_part(part, f"{param}.content[{part_index}]", role)


def check_tool_calls(calls: Any, param: str) -> None:
    """An assistant's earlier tool calls: a list of {id, type, function: {name, arguments}}."""
    if not isinstance(calls, list):
        raise bad_request(f"{param} must be an array of tool calls", param, "invalid_type")
    for index, call in enumerate(calls):
        where = f"{param}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where} must be an object with a 'function' object naming the function",
                              where, "invalid_type")
        if not isinstance(function.get("arguments", ""), str) or not isinstance(call.get("id", ""), str):
            raise bad_request(f"{where}.function.arguments and {where}.id must be strings", where,
                              "invalid_type")


def check_part(part: Any, param: str, role: str) -> None:
    if not isinstance(part, dict):
        raise bad_request(f"{param} must be an object", param, "invalid_type")
    kind = part.get("type")
    allowed = ("text", "refusal") if role == "assistant" else ("text", "image_url")
    if role in ("system", "developer", "tool"):
        allowed = ("text",)
    if kind not in allowed:
        raise bad_request(f"Content part type {str(kind)[:40]!r} is not supported in {param} "
                          f"(supported: {', '.join(allowed)})", param, "unsupported_content_part")
    field = "refusal" if kind == "refusal" else "text"
    if kind in ("text", "refusal") and not isinstance(part.get(field), str):
        raise bad_request(f"{param}.{field} must be a string", f"{param}.{field}", "invalid_type")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}.image_url.url must be a string", param, "invalid_image")


def check_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise bad_request("'n' must be a positive integer", "n", "invalid_type")
    if n is not None and n > 1:
        raise unsupported("n", "Only n=1 is supported: the claude CLI produces one answer per run.")
    if body.get("logprobs") is True or body.get("top_logprobs"):
        raise unsupported("logprobs", "logprobs are not available through the claude CLI.")
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        raise unsupported("tool_choice", "Forcing a tool call is not supported: nothing can make the model "
                          "call one; use tool_choice 'auto' or 'none'.")
    if choice not in (None, "auto", "none", "required") and not isinstance(choice, dict):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or an object",
                          "tool_choice", "invalid_type")
    if isinstance(body.get("function_call"), dict):
        raise unsupported("function_call", "Forcing a function call is not supported: nothing can make the "
                          "model call one; use function_call 'auto' or 'none'.")
    if body.get("function_call") not in (None, "auto", "none") and not isinstance(body.get("function_call"), dict):
        raise bad_request("'function_call' must be 'none', 'auto' or an object", "function_call", "invalid_type")
    check_type(body, "tools", (list,), "an array")


def parse_stop(stop: Any) -> Tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad_request("'stop' must be a non-empty string or an array of up to 4 "
                          "non-empty strings", "stop")
    return tuple(stops)


def parse_max_tokens(body: Mapping[str, Any], model: Model) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = check_type(body, name, (int,), "a positive integer")
        if value is None:
            continue
        if value < 1:
            raise bad_request(f"'{name}' must be a positive integer", name)
        if value > model.max_output:
            raise bad_request(f"'{name}' is {value}, more than {model.id} can produce "
                              f"({model.max_output})", name)
        return value
    return 0


def parse_effort(effort: Any) -> str:
    if effort is None:
        return ""
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise bad_request("'reasoning_effort' must be one of " + ", ".join(EFFORTS),
                          "reasoning_effort")
    return EFFORTS[effort]


def parse_response_format(value: Any) -> Tuple[str, Optional[Dict[str, Any]]]:
    if value is None:
        return "text", None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return kind, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be an object",
                              "response_format")
        return kind, schema
    raise bad_request("response_format.type must be text, json_object or json_schema",
                      "response_format")


###############################################################################
# Cache & singleflight ########################################################
###############################################################################


def cache_key(request: TurnRequest) -> str:
    """SHA-256 of a canonical JSON of who asks, the model, the conversation and every
    answer-affecting parameter. Neutral turns make a string and one text part the same."""
    canonical = {"owner": request.owner, "model": request.model.id, "system": request.system,
                 "turns": request.turns, "stop": request.stop, "max_tokens": request.max_tokens,
                 "effort": request.effort, "format": request.response_format, "schema": request.json_schema,
                 "sampling": dict(request.sampling)}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Flight:
    """One CLI run that identical concurrent requests share.

    The leader publishes the finished answer (an Outcome) or the error;
    followers wait for it. When the leader's own client has left, the run goes
    on only while followers want it: the last one to leave calls `cancel`.
    """

    def __init__(self):
        self.done = threading.Event()
        self.answer: Optional[Any] = None  # the leader's Outcome
        self.error: Optional[ApiError] = None
        self.followers = 0
        self.leader_gone = False
        self.cancel: Callable[[], None] = lambda: None


class Flights:
    """The flights in the air, by cache key. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flights: Dict[str, Flight] = {}
        self.counters = {"hits": 0, "misses": 0, "shared": 0}

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def join(self, key: str) -> Tuple[Flight, bool]:
        """Return (flight, leader?): the first caller leads, later identical ones follow."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = Flight()
                return flight, True
            flight.followers += 1
            self.counters["shared"] += 1
            return flight, False

    def land(self, key: str, flight: Flight, answer: Optional[Any], error: Optional[ApiError]) -> None:
        """The leader is done: publish, and let the next identical request start afresh."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.answer, flight.error = answer, error
        flight.done.set()

    def wanted(self, flight: Flight) -> bool:
        """Does anyone but the leader still want this run's answer?"""
        with self._lock:
            return flight.followers > 0

    def leader_left(self, flight: Flight) -> bool:
        """The leader's client hung up; return True while followers still want the answer."""
        with self._lock:
            flight.leader_gone = True
            return flight.followers > 0

    def leave(self, flight: Flight) -> None:
        """A follower stops waiting; the last one out ends a run nobody wants any more."""
        with self._lock:
            flight.followers -= 1
            abandoned = flight.leader_gone and flight.followers == 0 and not flight.done.is_set()
        if abandoned:
            flight.cancel()

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.counters, in_flight=len(self._flights))


###############################################################################
# CLI translation (TurnRequest → CLI → events) ################################
###############################################################################

IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHARS_PER_TOKEN = 4  # the prompt budget guess when CLAUDE_MAX_PROMPT_CHARS is not set
DATA_URL = re.compile(r"data:([\w/+.-]+);base64,(.*)", re.S)
FALLBACK_SENTENCE = ("Earlier tool calls and their results are shown as text; they are final. "
                     "Call a tool again only if you need more.")




def turn_text(turn: Dict[str, Any]) -> str:
    """A neutral turn's words: its text blocks and tool results, images left out."""
    return "\n".join(b["text"] if b["type"] == "text" else b["content"]
                     for b in turn["content"] if b["type"] in ("text", "tool_result"))


def image_block(url: str, config: Config, fetch: Optional[Callable[[str, int], Tuple[str, bytes]]]) -> Dict[str, Any]:
    """Return an Anthropic base64 image block for an image_url; 400/413 when unusable."""
    match = DATA_URL.fullmatch(url.strip())
    if match:
        media_type, encoded = match.group(1).lower(), match.group(2)
        try:
            data = base64.b64decode(re.sub(r"\s+", "", encoded), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("An image data URL is not valid base64", "messages", "invalid_image")
    elif re.match(r"https?://", url):
        if not config.allow_image_urls or fetch is None:
            raise bad_request("Image URLs are disabled on this server; send the image as a "
                              "data: URL (base64), or the operator sets OCP_ALLOW_IMAGE_URLS=1",
                              "messages", "image_url_not_allowed")
        media_type, data = fetch(url, config.max_image_bytes)
    else:
        raise bad_request("image_url must be a data: URL or an http(s) URL", "messages", "invalid_image")
    if media_type == "image/jpg":
        media_type = "image/jpeg"
    if media_type not in IMAGE_TYPES:
        raise bad_request(f"Image type {media_type[:40]!r} is not supported (jpeg, png, gif, webp)",
                          "messages", "unsupported_image_type")
    if len(data) > config.max_image_bytes:
        raise ApiError(413, f"An image is {len(data)} bytes; the limit is {config.max_image_bytes}",
                       "invalid_request_error", "image_too_large", "messages")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode("ascii")}}


def fetch_image(url: str, limit: int) -> Tuple[str, bytes]:
    """Download an image (opt-in, OCP_ALLOW_IMAGE_URLS); return (media type, bytes)."""
    import urllib.error
    import urllib.request  # opt-in feature: not loaded into every daemon
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ocp"}),
                                    timeout=15) as response:
            media_type = response.headers.get_content_type()
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError):
        raise bad_request("The image URL could not be fetched", "messages", "image_fetch_failed")
    return media_type, data


def turn_tag(request: TurnRequest, secret: bytes) -> str:
    """Return a turn-marker tag no caller can predict and no message contains.

    Derived from a per-daemon secret and the conversation's first message: it
    stays the same from request to request of one conversation, so the input's
    prefix is stable and Anthropic's prompt cache can hit.
    """
    first = json.dumps([request.system[:1], request.turns[:1]], sort_keys=True,
                       ensure_ascii=False).encode("utf-8")
    texts = list(request.system) + [json.dumps(t, ensure_ascii=False) for t in request.turns]
    for counter in range(100):
        digest = hmac.new(secret, first + bytes([counter]), hashlib.sha256).hexdigest()
        tag = "turn_" + digest[:12]
        if not any(tag in text for text in texts):
            return tag
    raise bad_request("The conversation could not be framed unambiguously", "messages")


def turn_block(turn: Dict[str, Any], tag: str) -> str:
    """An earlier turn as one labelled text: tool calls and results as plain lines."""
    role = turn["role"]
    attrs = f'role="{role}"'
    if role == "tool":
        ids = [b["id"] for b in turn["content"] if b["type"] == "tool_result"]
        attrs += f' tool_call_id="{(ids or [""])[0][:80]}"'
    lines = [turn_text(turn)]
    for call in turn["content"]:
        if call["type"] == "tool_call":
            lines.append(f"[tool call {call['id']}: {call['name']}({call['arguments']})]")
    body = "\n".join(line for line in lines if line)
    return f"<{tag} {attrs}>\n{body}\n</{tag}>"


def messages_to_input(request: TurnRequest, config: Config, secret: bytes,
                      fetch: Optional[Callable] = None) -> Tuple[str, Tuple[Dict[str, Any], ...]]:
    """Return (system prompt, content blocks) for the CLI: one block per earlier turn."""
    turns = request.turns
    if not turns:
        raise bad_request("'messages' needs at least one user message", "messages", "empty_messages")
    history, final = turns[:-1], turns[-1]
    if final["role"] != "user":
        history, final = turns, None
    blocks: List[Dict[str, Any]] = []
    tag = turn_tag(request, secret) if history else ""
    for turn in history:
        blocks.append({"type": "text", "text": turn_block(turn, tag)})
        urls = [b["url"] for b in turn["content"] if b["type"] == "image"]
        urls += [url for b in turn["content"] if b["type"] == "tool_result" for url in b.get("images", ())]
        blocks += [image_block(url, config, fetch) for url in urls]
    blocks = user_blocks((final,) if final else (), config, fetch, blocks)
    return compose_system(list(request.system), tag, request, config), tuple(drop_empty_text(blocks))


def user_blocks(turns: Tuple[Dict[str, Any], ...], config: Config, fetch: Optional[Callable] = None,
                blocks: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """The CLI's content blocks for the user's newest turns (text as it is, images as base64),
    after `blocks`; 400 past OCP_MAX_IMAGES in all."""
    blocks = list(blocks or [])
    for turn in turns:
        for block in turn["content"]:
            if block["type"] == "image":
                blocks.append(image_block(block["url"], config, fetch))
            elif block["type"] == "text":
                blocks.append({"type": "text", "text": block["text"]})
    images = sum(1 for b in blocks if b["type"] == "image")
    if images > config.max_images:
        raise bad_request(f"{images} images in one request; the limit is {config.max_images}",
                          "messages", "too_many_images")
    return blocks


def drop_empty_text(blocks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    kept = [b for b in blocks if b["type"] != "text" or b["text"].strip()]
    return kept or [{"type": "text", "text": "(empty message)"}]


def compose_system(system: List[str], tag: str, request: TurnRequest, config: Config) -> str:
    parts = [s for s in system if s.strip()] or [DEFAULT_SYSTEM_PROMPT]
    if config.system_prompt:
        parts.append(config.system_prompt)
    if tag:
        parts.append(f"The conversation so far is given as blocks marked <{tag} role=...> ... "
                     f"</{tag}>, oldest first; after them comes the current user message, if "
                     "any. Answer as the assistant in the next turn. Only those exact markers "
                     "delimit turns.")
    if request.tools and request.tool_choice != "none":
        if any(b["type"] in ("tool_call", "tool_result") for t in request.turns for b in t["content"]):
            parts.append(FALLBACK_SENTENCE)
        if not request.parallel_tool_calls:
            parts.append("Call at most one tool per message.")
    if request.response_format == "json_object":
        parts.append("Reply with one JSON object only: no prose, no code fences.")
    elif request.response_format == "json_schema":
        parts.append("Reply with one JSON value only (no prose, no code fences) that validates "
                     "against this JSON Schema:\n" + json.dumps(request.json_schema))
    return "\n\n".join(parts)


def prompt_chars(system: str, blocks: Tuple[Dict[str, Any], ...]) -> int:
    return len(system) + sum(len(b.get("text", "")) for b in blocks)


def conversation_chars(request: TurnRequest) -> int:
    """The size of a conversation's words (what a CLI holding it has seen, near enough)."""
    return sum(map(len, request.system)) + sum(len(b.get("text") or b.get("content") or b.get("arguments") or "")
                                              for turn in request.turns for b in turn["content"])


def check_prompt_budget(size: int, request: TurnRequest, config: Config) -> None:
    """400 context_length_exceeded for a prompt of `size` characters over the budget."""
    budget = config.max_prompt_chars or request.model.context_window * CHARS_PER_TOKEN
    if size > budget:
        raise context_error(f"the prompt is {size} characters; the limit for {request.model.id} is {budget}")


def context_error(detail: str) -> ApiError:
    """The conversation no longer fits the model: 400 context_length_exceeded, worded as clients
    recognise it (OpenAI's "maximum context length", Anthropic's "prompt is too long"), so an
    agent compacts or tells its user instead of retrying."""
    return ApiError(400, f"This model's maximum context length is exceeded (prompt is too long): {detail}. "
                    "Compact the conversation or start a new one.", "invalid_request_error",
                    "context_length_exceeded", "messages")


# -- the CLI's events → deltas -------------------------------------------------


class Answer:
    """Builds one answer from the CLI's events; `feed` returns the new deltas.

    Deltas are ("content" | "reasoning", text), or for a client tool call
    ("tool_call", {index, id, name}) and ("tool_args", {index, arguments}). The text comes from stream
    deltas as they arrive, or from finished `assistant` blocks when a message
    was not streamed. After a dropped connection the CLI repeats the abandoned
    text in its retry; that repeat is swallowed so the client sees it once.
    """

    def __init__(self, tool_names: Optional[Mapping[str, str]] = None):
        self.tool_names = tool_names or {}  # the CLI's name of a client tool -> the client's
        self.tool_calls: List[Dict[str, Any]] = []  # {"index", "id", "name", "arguments"}
        self._calls: Dict[Tuple[str, int], Dict[str, Any]] = {}
        self.round_done = False  # a model call ended asking for client tools: the answer stops here
        self.content: List[str] = []
        self.reasoning: List[str] = []
        self.result: Optional[Dict[str, Any]] = None
        self.api_error: Optional[Dict[str, Any]] = None
        self.rate_limits: List[Dict[str, Any]] = []  # the plan as the CLI reported it (Turn.on_rate_limit)
        self.stop_reasons: List[str] = []
        self.stream_usage = {"input_tokens": 0, "output_tokens": 0,
                             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        self.failure: Optional[ApiError] = None  # set by whoever runs the turn
        self._streamed: set = set()
        self._blocks: Dict[Tuple[str, int], List[Any]] = {}
        self._replay = {"content": "", "reasoning": ""}

    @property
    def text(self) -> str:
        return "".join(self.content)

    def feed(self, event: Dict[str, Any]) -> List[Tuple[str, str]]:
        kind = event.get("type")
        if kind == "stream_event":
            abandoned = event.get("abandoned_blocks")
            if isinstance(abandoned, dict):
                self._abandon(event.get("api_message_id", ""),
                              int(abandoned.get("from_block_index") or 0))
            return self._stream_event(event.get("event") or {}, event.get("api_message_id", ""))
        if kind == "assistant":
            return self._assistant(event)
        if kind == "result":
            self.result = event
        return []

    def _stream_event(self, event: Dict[str, Any], message_id: str) -> List[Tuple[str, str]]:
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                self.stream_usage[name] += int(usage.get(name) or 0)
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                return self._tool_call(block, message_id, event.get("index", 0))
            block_kind = {"text": "content", "thinking": "reasoning"}.get(block.get("type"))
            self._blocks[(message_id, event.get("index", 0))] = [block_kind, ""]
        elif kind == "content_block_delta":
            return self._delta(event, message_id)
        elif kind == "message_delta":
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self.stop_reasons.append(reason)
            if reason == "tool_use" and any(c["message"] == message_id for c in self.tool_calls):
                self.round_done = True
            self.stream_usage["output_tokens"] += int((event.get("usage") or {}).get("output_tokens") or 0)
        return []

    def _tool_call(self, block: Dict[str, Any], message_id: str, index: int) -> List[Tuple[str, Any]]:
        """A client tool call starts (the CLI's own tools are not the client's business)."""
        self._streamed.add(message_id)
        name = self.tool_names.get(str(block.get("name")))
        if name is None:
            return []
        call = {"index": len(self.tool_calls), "id": str(block.get("id") or ""), "name": name,
                "arguments": "", "message": message_id}
        self.tool_calls.append(call)
        self._calls[(message_id, index)] = call
        return [("tool_call", {"index": call["index"], "id": call["id"], "name": name})]

    def _delta(self, event: Dict[str, Any], message_id: str) -> List[Tuple[str, Any]]:
        delta = event.get("delta") or {}
        if delta.get("type") == "input_json_delta":
            call = self._calls.get((message_id, event.get("index", 0)))
            piece = delta.get("partial_json") or ""
            if call is None or not piece:
                return []
            call["arguments"] += piece
            return [("tool_args", {"index": call["index"], "arguments": piece})]
        if delta.get("type") == "text_delta":
            kind, text = "content", delta.get("text") or ""
        elif delta.get("type") == "thinking_delta":
            kind, text = "reasoning", delta.get("thinking") or ""
        else:
            return []
        self._streamed.add(message_id)
        block = self._blocks.setdefault((message_id, event.get("index", 0)), [kind, ""])
        block[1] += text
        return self._emit(kind, text)

    def _abandon(self, message_id: str, from_index: int) -> None:
        """The CLI gave up these blocks and will send them again: expect the repeat."""
        for (mid, index), (kind, text) in sorted(self._blocks.items(), key=lambda kv: kv[0][1]):
            if mid == message_id and index >= from_index and kind:
                self._replay[kind] += text

    def _assistant(self, event: Dict[str, Any]) -> List[Tuple[str, str]]:
        message = event.get("message") or {}
        if event.get("is_api_error_message") or message.get("model") == "<synthetic>":
            self.api_error = {"status": event.get("api_error_status"), "error": event.get("error"),
                              "api_error": event.get("api_error"),
                              "params": event.get("api_error_params") or {},
                              "text": part_text(message.get("content"))}
            return []
        if message.get("id") in self._streamed:
            return []  # already forwarded delta by delta
        deltas: List[Tuple[str, str]] = []
        for block in message.get("content") or []:
            if block.get("type") == "text":
                deltas += self._emit("content", block.get("text") or "")
            elif block.get("type") == "thinking":
                deltas += self._emit("reasoning", block.get("thinking") or "")
        return deltas

    def _emit(self, kind: str, text: str) -> List[Tuple[str, str]]:
        replay = self._replay[kind]
        if replay:
            same = 0
            limit = min(len(replay), len(text))
            while same < limit and replay[same] == text[same]:
                same += 1
            if same < limit:
                log.info("retried answer diverges from what was sent; sending the rest")
                self._replay[kind] = ""
            else:
                self._replay[kind] = replay[same:]
            text = text[same:]
        if not text:
            return []
        (self.content if kind == "content" else self.reasoning).append(text)
        return [(kind, text)]

    # -- the outcome ---------------------------------------------------------

    def hit_max_tokens(self) -> bool:
        return "max_tokens" in self.stop_reasons

    def finish(self) -> str:
        """The neutral finish: "max_tokens" when the last model call hit the limit, else "end_turn"."""
        return "max_tokens" if self.stop_reasons[-1:] == ["max_tokens"] else "end_turn"

    def usage(self) -> Usage:
        """This run's usage: the result's, or what the model calls reported when no result came.
        A run with client tools counts its own model calls only: a parked CLI's result sums the
        calls of every request it served."""
        usage = (self.result or {}).get("usage") if not self.tool_names else None
        usage = usage or self.stream_usage
        return Usage(input=int(usage.get("input_tokens") or 0), output=int(usage.get("output_tokens") or 0),
                     cache_read=int(usage.get("cache_read_input_tokens") or 0),
                     cache_write=int(usage.get("cache_creation_input_tokens") or 0),
                     cost_usd=float((self.result or {}).get("total_cost_usd") or 0))

    def error(self, now_s: float) -> Optional[ApiError]:
        """Return the ApiError this run ended in, or None when it answered."""
        result = self.result
        if result is None:
            return ApiError(502, "The claude CLI ended without an answer (see the OCP log).",
                            "proxy_error", "cli_failed")
        if not result.get("is_error"):
            return None
        if result.get("api_error") == "max_output_tokens" and self.hit_max_tokens():
            return None  # the CLI gave up continuing past the limit: what came is the answer
        return result_error(result, self.api_error or {}, self.rate_limits, now_s)


def result_error(result: Dict[str, Any], api_error: Dict[str, Any],
                 rate_limits: List[Dict[str, Any]], now_s: float) -> ApiError:
    """Map a failed CLI result to the HTTP error of SPEC §3.3."""
    status = result.get("api_error_status") or api_error.get("status")
    kind = result.get("api_error") or api_error.get("api_error")
    text = scrub_paths(str(result.get("result") or api_error.get("text") or
                           "; ".join(result.get("errors") or []) or "unknown error"))[:500]
    if kind == "usage_limit_reached":
        return plan_limit_error(f"The Claude subscription's usage limit is reached: {text}",
                                plan_reset(api_error, rate_limits), now_s)
    if any("claude_code_version_too_old" in part for part in (str(kind), text, str(api_error.get("error")))):
        return ApiError(400, f"Anthropic refused this claude CLI as too old for the model ({text})",
                        "invalid_request_error", "claude_code_version_too_old", "model", wall=True)
    if status == 429:
        return ApiError(429, f"Anthropic is rate limiting requests: {text}", "rate_limit_error",
                        "upstream_rate_limited", headers={"Retry-After": "10"})
    if status in (401, 403) or api_error.get("error") == "authentication_failed" \
            or text.startswith("Not logged in"):
        return ApiError(503, f"OCP's Claude login is not working ({text}). On the OCP server run "
                        "`claude setup-token` and set CLAUDE_CODE_OAUTH_TOKEN, or run "
                        "`claude auth login`.", "upstream_auth_error", "upstream_auth_error",
                        headers={"x-should-retry": "false"})  # the caller's key is fine: retrying cannot help
    if result.get("terminal_reason") in ("prompt_too_long", "blocking_limit") or (
            not status and text.lower().startswith("prompt is too long")):
        return context_error(f"the claude CLI refused it ({text})")
    if status == 529:
        return ApiError(502, f"Anthropic is overloaded: {text}", "upstream_error", "overloaded")
    if status == 400:
        return ApiError(400, f"Anthropic rejected the request: {text}", "invalid_request_error",
                        "upstream_invalid_request")
    if status == 404:
        return ApiError(404, f"Anthropic does not know this model: {text}",
                        "invalid_request_error", "model_not_found", "model")
    return ApiError(502, f"Anthropic returned an error: {text}", "upstream_error", "server_error")


def plan_reset(api_error: Dict[str, Any], rate_limits: List[Dict[str, Any]]) -> int:
    info = (api_error.get("params") or {}).get("rate_limit_info") or {}
    if info.get("resetsAt"):
        return int(info["resetsAt"])
    rejected = [r for r in rate_limits if r.get("status") == "rejected" and r.get("resetsAt")]
    return int(rejected[-1]["resetsAt"]) if rejected else 0


def plan_scope(api_error: Dict[str, Any], rate_limits: List[Dict[str, Any]]) -> str:
    """Whose requests a plan-limit refusal holds: a per-model window's family, else every one ("*")."""
    info = (api_error.get("params") or {}).get("rate_limit_info") or {}
    rejected = [r for r in rate_limits if r.get("status") == "rejected"]
    name = str(info.get("rateLimitType") or (rejected[-1].get("rateLimitType") if rejected else "") or "")
    return plan_window(name).models or "*" if name else "*"


def plan_limit_error(message: str, resets_at: int, now_s: float) -> ApiError:
    wait = max(1, int(resets_at - now_s)) if resets_at else 3600
    headers = {"Retry-After": str(wait)}
    if wait > 60:
        headers["x-should-retry"] = "false"
    return ApiError(429, message, "rate_limit_error", "usage_limit_reached", headers=headers,
                    wall=wait > 60, resets_at=int(resets_at or now_s + wait))


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back possible prefixes."""

    def __init__(self, stops: Tuple[str, ...]):
        self.stops = stops
        self.held = ""
        self.stopped = False
        self.matched = ""  # the stop sequence that cut the text

    def feed(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        text = self.held + text
        found = [(i, s) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held


# -- structured output ---------------------------------------------------------


def extract_json(text: str) -> Any:
    """Return the JSON value in a reply (code fences tolerated); raise ValueError."""
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    return json.loads(fenced.group(1) if fenced else text)


JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool,
              "null": type(None), "number": (int, float), "integer": int}


def schema_errors(value: Any, schema: Any, path: str = "$") -> List[str]:
    """Return where `value` breaks `schema` (the common JSON Schema keywords)."""
    if not isinstance(schema, dict):
        return []
    errors: List[str] = []
    types_ = schema.get("type")
    if types_ is not None:
        names = types_ if isinstance(types_, list) else [types_]
        if not any(type_matches(value, name) for name in names):
            return [f"{path} should be {' or '.join(map(str, names))}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path} should be one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path} should be {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        if key in schema and all(schema_errors(value, s, path) for s in schema[key]):
            errors.append(f"{path} matches none of {key}")
    if isinstance(value, dict):
        errors += object_errors(value, schema, path)
    if isinstance(value, list):
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path} needs at least {schema['minItems']} items")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        errors.append(f"{path} is shorter than {schema['minLength']}")
    return errors


def type_matches(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES.get(name, object))


def object_errors(value: Dict[str, Any], schema: Dict[str, Any], path: str) -> List[str]:
    errors = [f"{path}.{name} is required" for name in schema.get("required", []) if name not in value]
    properties = schema.get("properties") or {}
    for name, item in value.items():
        if name in properties:
            errors += schema_errors(item, properties[name], f"{path}.{name}")
        elif schema.get("additionalProperties") is False:
            errors.append(f"{path}.{name} is not allowed")
    return errors


def json_problem(text: str, request: TurnRequest) -> str:
    """Return why `text` is not the JSON the request asked for, or "" when it is."""
    try:
        value = extract_json(text)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if request.response_format == "json_object" and not isinstance(value, dict):
        return "a JSON object was required"
    if request.response_format == "json_schema":
        errors = schema_errors(value, request.json_schema)
        if errors:
            return "it does not match the schema: " + "; ".join(errors[:5])
    return ""


def normalize_json(text: str) -> str:
    return json.dumps(extract_json(text), ensure_ascii=False)


###############################################################################
# Plan limits #################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class PlanWindow:
    """A window of the plan the CLI may report (its rateLimitType or unifiedWindows name): how
    people read it, its infix in Anthropic's `anthropic-ratelimit-unified-<short>-*` headers (and
    OCP's x-ocp-plan-*-<short>), its length, and who draws from it: every model ("*"), one family
    ("opus"), or none of OCP's requests ("": another product's window, shown only)."""

    label: str
    short: str
    minutes: int
    models: str = "*"

    def draws(self, model_id: str) -> bool:
        """Whether a request for `model_id` uses this window up (and waits on it)."""
        return self.models == "*" or (bool(self.models) and self.models in model_id.lower())


WEEK_MINUTES = 7 * 24 * 60
PLAN_WINDOWS = {  # every window the CLI 2.1.330 knows, in display order (the 5-hour one first while there is one)
    "five_hour": PlanWindow("5-hour", "5h", 300),
    "seven_day": PlanWindow("weekly", "7d", WEEK_MINUTES),
    "seven_day_opus": PlanWindow("weekly Opus", "7d_opus", WEEK_MINUTES, "opus"),
    "seven_day_sonnet": PlanWindow("weekly Sonnet", "7d_sonnet", WEEK_MINUTES, "sonnet"),
    "seven_day_overage_included": PlanWindow("weekly Fable", "7d_oi", WEEK_MINUTES, "fable"),  # the CLI: "Fable limit"
    "seven_day_oauth_apps": PlanWindow("weekly, apps", "7d_oauth_apps", WEEK_MINUTES, ""),
    "seven_day_cowork": PlanWindow("weekly, Cowork", "7d_cowork", WEEK_MINUTES, ""),
    "seven_day_omelette": PlanWindow("weekly, Omelette", "7d_omelette", WEEK_MINUTES, ""),
}
MODEL_FAMILIES = ("opus", "sonnet", "haiku", "fable")


def plan_window(name: str) -> PlanWindow:
    """The window of this name; one newer than this OCP is read from its name (a family in it
    holds that family's requests; otherwise it is shown, and holds only what the CLI refuses)."""
    known = PLAN_WINDOWS.get(name)
    if known is not None:
        return known
    family = next((f for f in MODEL_FAMILIES if f in name), "")
    return PlanWindow(name.replace("_", " "), name, 300 if name.startswith("five_hour") else WEEK_MINUTES, family)


def window_order(name: str) -> Tuple[int, str]:
    return (list(PLAN_WINDOWS).index(name) if name in PLAN_WINDOWS else len(PLAN_WINDOWS), name)


OUTSIDE = "(outside OCP)"  # a window's rise with no OCP request finished since the last report
SHARE_NOTE = ("An estimate: each rise of a window's utilization between two of the CLI's reports is shared "
              "among the requests that finished in between and draw from that window, in proportion to their "
              "cost (the CLI's total_cost_usd, or tokens at list price); a rise with none is use outside OCP.")
LIST_PRICES = {"opus": (4.0, 20.0), "sonnet": (2.0, 10.0), "haiku": (1.0, 5.0)}  # USD per Mtok in, out:
# the 5.x prices the recordings' total_cost_usd implies (4,412 in + 12 out on opus = $0.017888)
READINGS_KEPT = 96  # a window's utilization readings kept for the forecast (its current period only)
PACE_MINUTES = {300: 60, WEEK_MINUTES: 24 * 60}  # the forecast reads the pace over the last hour, or day


def list_price(model_id: str, usage: Usage) -> float:
    """A request's cost at list price, for when the CLI did not say (cache reads 0.1x, writes 1.25x)."""
    family = next((f for f in LIST_PRICES if f in model_id), "opus")
    per_in, per_out = LIST_PRICES[family]
    return (usage.input * per_in + usage.cache_read * per_in * 0.1 + usage.cache_write * per_in * 1.25
            + usage.output * per_out) / 1_000_000


def forecast(readings: List[List[float]], minutes: int, resets_at: int, now_s: float) -> Dict[str, Any]:
    """When a window runs out at its recent pace: an estimate, a straight line through the first and
    the last of the CLI's utilization readings ([time, fraction]) of the window's current period
    within the pace span (the last hour of a 5-hour window, the last day of a weekly one). No
    pace without two readings five minutes apart; none either when the window does not rise."""
    span = PACE_MINUTES.get(minutes, minutes // 5) * 60
    recent = [r for r in readings if r[0] >= now_s - span]
    based_on = {"readings": len(recent), "from": int(recent[0][0]) if recent else None,
                "to": int(recent[-1][0]) if recent else None, "span_minutes": span // 60}
    result: Dict[str, Any] = {"estimate": True, "pace_pct_per_hour": None, "runs_out_at": None,
                              "before_reset": False, "based_on": based_on}
    if len(recent) < 2 or recent[-1][0] - recent[0][0] < 300:
        return result
    (t0, u0), (t1, u1) = recent[0], recent[-1]
    pace = (u1 - u0) / (t1 - t0)  # of the window, a second
    result["pace_pct_per_hour"] = round(pace * 360_000, 2)
    if u1 >= 1:
        result["runs_out_at"] = int(t1)
    elif pace > 0:
        result["runs_out_at"] = int(t1 + (1 - u1) / pace)
    result["before_reset"] = result["runs_out_at"] is not None and result["runs_out_at"] < resets_at
    return result


class PlanLimits:
    """The subscription's windows as the CLI reports them — each by its own name, with its recent
    readings —, the local holds (plan-wide, or one model family's), overage, and who spent each
    window (`spent` and `shares`, estimated as SHARE_NOTE says).

    After `usage_limit_reached` the requests that draw from the refused window are answered 429
    here, without a spawn, until its reset. `save` (if given) persists the state on every
    change, so a restart does not forget a hold. Thread-safe.
    """

    def __init__(self, saved: Optional[Dict[str, Any]] = None,
                 save: Callable[[Dict[str, Any]], None] = lambda state: None):
        self._lock = threading.Lock()
        self._save = save
        saved = saved or {}
        self.windows: Dict[str, Dict[str, Any]] = dict(saved.get("windows") or {})
        self.readings: Dict[str, List[List[float]]] = dict(saved.get("readings") or {})
        self.hold_until = int(saved.get("hold_until") or 0)
        self.hold_message = str(saved.get("hold_message") or "")
        self.model_holds: Dict[str, Dict[str, Any]] = dict(saved.get("model_holds") or {})  # family -> until, …
        self.overage_until = int(saved.get("overage_until") or 0)
        self.shares: Dict[str, Dict[str, Any]] = dict(saved.get("shares") or {})  # window -> resets_at, points
        self.unshared: Dict[str, Dict[str, float]] = {"five_hour": {}, "seven_day": {}}  # window -> key -> cost
        self.overage_spent = dict(saved.get("overage_spent") or {"requests": 0, "cost_usd": 0.0})
        self.overage_status = str(saved.get("overage_status") or "")  # the account's extra usage: allowed, rejected…
        self.changed: Callable[[], None] = lambda: None  # after a report or a hold (the server's alerts)

    def observe(self, info: Dict[str, Any], now_s: float = 0.0) -> bool:
        """Take one rate_limit_event (at `now_s`: windows past their reset go first, a window the
        CLI stopped reporting with them); return True when this answer was paid from extra usage."""
        overage = bool(info.get("isUsingOverage"))
        with self._lock:
            self._forget(now_s)
            for name, window in (info.get("unifiedWindows") or {}).items():
                if isinstance(window, dict):
                    self._attribute(name, window, now_s)
                    self._merge(name, window, now_s)
            if info.get("rateLimitType") and info.get("resetsAt"):  # the representative window (a per-model
                claim = {"status": info.get("status"), "resetsAt": info["resetsAt"],  # one comes only this way)
                         "utilization": info.get("utilization")}
                self._attribute(str(info["rateLimitType"]), claim, now_s)
                self._merge(str(info["rateLimitType"]), claim, now_s)
            self.overage_until = int(info.get("resetsAt") or 0) if overage else 0
            self.overage_status = str(info.get("overageStatus") or self.overage_status)
            state = self._state()
        self._save(state)
        self.changed()
        return overage

    def _forget(self, now_s: float) -> None:
        for name in [n for n, w in self.windows.items() if 0 < w["resets_at"] <= now_s]:
            del self.windows[name]
            self.readings.pop(name, None)
        self.shares = {n: s for n, s in self.shares.items() if s["resets_at"] > now_s}

    def _merge(self, name: str, window: Dict[str, Any], now_s: float) -> None:
        known = self.windows.get(name)
        reset = int(window.get("resetsAt") or 0)
        if (known and reset < known["resets_at"]) or (now_s and 0 < reset <= now_s):
            return  # an older report (a later reset replaces, never the other way), or one already past
        utilization = window.get("utilization")
        if not isinstance(utilization, (int, float)) or isinstance(utilization, bool):
            utilization = None
        same = bool(known) and known["resets_at"] == reset
        if same and known["utilization"] is not None:
            utilization = max(known["utilization"], utilization or 0)  # same window: keep the max
        self.windows[name] = {"utilization": utilization, "resets_at": reset,
                              "status": window.get("status") or (known or {}).get("status")}
        if utilization is not None and now_s:
            readings = self.readings.get(name) if same else None
            self.readings[name] = ((readings or []) + [[now_s, utilization]])[-READINGS_KEPT:]

    def _attribute(self, name: str, window: Dict[str, Any], now_s: float) -> None:
        """Share a window's rise since the last report among the requests that finished since."""
        if not plan_window(name).models or not isinstance(window.get("utilization"), (int, float)):
            return
        known, reset = self.windows.get(name), int(window.get("resetsAt") or 0)
        if known and reset < known["resets_at"]:
            return
        same = known is not None and known["resets_at"] == reset
        rise = window["utilization"] - ((known or {}).get("utilization") or 0) if same else window["utilization"]
        share = self.shares.get(name)
        if not share or share["resets_at"] != reset:
            share = self.shares[name] = {"resets_at": reset, "points": {}, "recent": []}
        if rise <= 0:
            return
        spenders = self.unshared.setdefault(name, {}) or {OUTSIDE: 1.0}  # (each cost is > 0: see spent)
        total = sum(spenders.values())
        for key, cost in spenders.items():
            points = rise * 100 * cost / total
            share["points"][key] = share["points"].get(key, 0) + points
            share.setdefault("recent", []).append([now_s, key, points])
        share["recent"] = [r for r in share["recent"] if r[0] >= now_s - 86400][-READINGS_KEPT:]
        self.unshared[name].clear()

    def spent(self, key: str, cost_usd: float, overage: bool = False, model_id: str = "") -> None:
        """A request finished: its cost waits for the next rise of the windows its model draws from
        (and counts as extra usage)."""
        with self._lock:
            for name in set(self.unshared) | set(self.windows):
                if plan_window(name).draws(model_id or "*"):
                    spenders = self.unshared.setdefault(name, {})
                    spenders[key] = spenders.get(key, 0.0) + max(cost_usd, 1e-9)
            if overage:
                self.overage_spent = {"requests": self.overage_spent["requests"] + 1,
                                      "cost_usd": round(self.overage_spent["cost_usd"] + cost_usd, 6)}
                state = self._state()
        if overage:
            self._save(state)

    def share_report(self, now_s: float) -> Dict[str, Any]:
        """Each current window's utilization and its estimated split by key, in percent of the window."""
        with self._lock:
            windows = {n: dict(w) for n, w in self.windows.items()}
            shares = {n: {"resets_at": s["resets_at"], "points": dict(s["points"])} for n, s in self.shares.items()}
        report = {}
        for name in sorted(shares, key=window_order):
            share, window = shares[name], windows.get(name) or {}
            if share["resets_at"] <= now_s:
                continue
            keys = sorted(share["points"].items(), key=lambda kv: -kv[1])
            report[name] = {"resets_at": share["resets_at"], "label": plan_window(name).label,
                            "utilization_pct": round((window.get("utilization") or 0) * 100, 1),
                            "keys": [{"key": k, "share_pct": round(v, 1)} for k, v in keys]}
        return {"windows": report, "note": SHARE_NOTE}

    def hold(self, resets_at: int, message: str, models: str = "*") -> None:
        """Hold the requests that draw from a refused window until `resets_at`: every one ("*"), or
        one model family's."""
        with self._lock:
            if models != "*":
                known = self.model_holds.get(models) or {}
                if resets_at <= known.get("until", 0):
                    return
                self.model_holds[models] = {"until": resets_at, "message": message}
            elif resets_at <= self.hold_until:
                return
            else:
                self.hold_until, self.hold_message = resets_at, message
            state = self._state()
        self._save(state)
        self.changed()

    def held(self, now_s: float, model_id: str = "") -> bool:
        """Whether a request (for `model_id`; any, when none is named) would be held now."""
        with self._lock:
            if self.hold_until > now_s:
                return True
            return any(h["until"] > now_s and family in model_id.lower() for family, h in self.model_holds.items())

    def check(self, now_s: float, plan_only: bool = False, model_id: str = "",
              models: Callable[[], Iterable[str]] = tuple) -> None:
        """Raise the plan-limit 429 while the subscription is out of quota for this request (plan-wide,
        or its model's family: the models that still work, `models()` the caller's, are named), or,
        plan-only, in overage."""
        with self._lock:
            until, message, overage_until = self.hold_until, self.hold_message, self.overage_until
            family = next((f for f, h in self.model_holds.items() if h["until"] > now_s and f in model_id.lower()), "")
            model_hold = dict(self.model_holds[family]) if family else None
        if until > now_s:
            raise plan_limit_error(message + f" (answered by OCP without calling Claude). Every key of this OCP "
                                   f"waits for the plan's reset, in {format_wait(until - now_s)}.", until, now_s)
        if model_hold is not None:
            others = [m for m in models() if family not in m.lower()]
            raise plan_limit_error(
                f"{model_hold['message']} (answered by OCP without calling Claude): the plan's {family.title()} "
                f"limit resets in {format_wait(model_hold['until'] - now_s)}. Other models still work"
                + (f": {', '.join(others)}." if others else "."), model_hold["until"], now_s)
        if plan_only and overage_until > now_s:
            error = plan_limit_error("The plan's included usage is used up and this OCP refuses to pay "
                                     "from extra usage (OCP_PLAN_ONLY=1).", overage_until, now_s)
            error.code = "plan_only"
            raise error

    def in_overage(self, now_s: float) -> bool:
        with self._lock:
            return self.overage_until > now_s

    def check_reserve(self, priority: str, reserves: Dict[int, int], now_s: float, model_id: str = "") -> None:
        """429 plan_reserved when a window this request draws from has reached the part kept back for
        higher priorities (`reserves`: percent by window length in minutes): low keys wait from
        100 − reserve %, normal ones from 100 − reserve/2 %, high never. Decided from the last
        report, without a spawn."""
        if priority == "high":
            return
        with self._lock:
            windows = {name: dict(w) for name, w in self.windows.items()}
        for name in sorted(windows, key=window_order):
            window, kind = windows[name], plan_window(name)
            reserve = reserves.get(kind.minutes, 0)
            utilization = window.get("utilization")
            if not reserve or utilization is None or window["resets_at"] <= now_s or not kind.draws(model_id or "*"):
                continue
            if utilization * 100 >= 100 - (reserve if priority == "low" else reserve / 2):
                error = plan_limit_error(
                    f"The plan's {kind.label} window is {utilization * 100:.0f}% used; the rest is kept for "
                    f"higher-priority keys (this key: {priority}). Resets in "
                    f"{format_wait(window['resets_at'] - now_s)}.", window["resets_at"], now_s)
                error.code = "plan_reserved"
                raise error

    def _state(self) -> Dict[str, Any]:
        return {"windows": {k: dict(v) for k, v in self.windows.items()}, "hold_until": self.hold_until,
                "hold_message": self.hold_message, "overage_until": self.overage_until,
                "model_holds": {k: dict(v) for k, v in self.model_holds.items()},
                "readings": {k: [list(r) for r in v] for k, v in self.readings.items()},
                "shares": {name: {"resets_at": share["resets_at"], "points": dict(share["points"]),
                                  "recent": [list(r) for r in share.get("recent", ())]}
                           for name, share in self.shares.items()},
                "overage_spent": dict(self.overage_spent), "overage_status": self.overage_status}

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return self._state()


def current_windows(state: Dict[str, Any], now_s: float) -> Dict[str, Dict[str, Any]]:
    """The windows of a snapshot not past their reset, in display order."""
    return {name: state["windows"][name] for name in sorted(state["windows"], key=window_order)
            if state["windows"][name]["resets_at"] > now_s}


def unified_headers(state: Dict[str, Any], now_s: float) -> Dict[str, str]:
    """Anthropic's `anthropic-ratelimit-unified-*` headers rebuilt from what the CLI reported
    (AGENTS-SPEC §3.4), so Claude Code shows the plan's use: every current window."""
    windows = current_windows(state, now_s)
    if not windows:
        return {}
    held = state["hold_until"] > now_s
    claim = min(windows, key=lambda name: windows[name]["resets_at"] or float("inf"))
    headers = {"anthropic-ratelimit-unified-status": "rejected" if held else (windows[claim]["status"] or "allowed"),
               "anthropic-ratelimit-unified-reset": str(state["hold_until"] if held else windows[claim]["resets_at"]),
               "anthropic-ratelimit-unified-representative-claim": claim}
    for name, window in windows.items():
        prefix = "anthropic-ratelimit-unified-" + plan_window(name).short
        if window["utilization"] is not None:
            headers[prefix + "-utilization"] = f"{window['utilization']:g}"
        headers[prefix + "-reset"] = str(window["resets_at"])
        if window["status"]:
            headers[prefix + "-status"] = window["status"]
    return headers


def codex_headers(state: Dict[str, Any], now_s: float) -> Dict[str, str]:
    """Codex's `x-codex-*` plan headers from the CLI's windows, so Codex shows the Claude plan's use:
    the 5-hour window as its primary and the weekly one as its secondary — or, for an account
    without a 5-hour window, the weekly one as its primary."""
    windows = {n: w for n, w in current_windows(state, now_s).items() if w["utilization"] is not None}
    slots = [name for name in ("five_hour", "seven_day") if name in windows]
    headers: Dict[str, str] = {}
    for slot, name in zip(("primary", "secondary"), slots):
        window = windows[name]
        headers.update({f"x-codex-{slot}-used-percent": f"{window['utilization'] * 100:g}",
                        f"x-codex-{slot}-window-minutes": str(plan_window(name).minutes),
                        f"x-codex-{slot}-reset-at": str(window["resets_at"])})
    return headers


def plan_report(plan: PlanLimits, now_s: float, key: Optional[str] = None,
                tz: Optional[datetime.tzinfo] = None) -> Dict[str, Any]:
    """The plan windows for people, in display order: utilization in percent, resets in and at, a
    forecast (an estimate), who spent them (only `key`'s share when given: a member sees its own),
    the holds, and OCP's extra usage."""
    state = plan.snapshot()
    share = plan.share_report(now_s)
    windows = [window_report(name, w, state, now_s, tz, key) for name, w in current_windows(state, now_s).items()]
    holds = [{"models": family, "until": h["until"], "message": h["message"]}
             for family, h in sorted(state["model_holds"].items()) if h["until"] > now_s]
    return {"windows": windows, "held_until": state["hold_until"] if state["hold_until"] > now_s else None,
            "held_models": holds,
            "overage": state["overage_until"] > now_s, "overage_until": state["overage_until"] or None,
            "extra_usage": {"allowed": "on", "allowed_warning": "on", "rejected": "off"}.get(
                state["overage_status"], state["overage_status"] or "unknown"),
            "overage_spent": state["overage_spent"], "share": key_share(share, key)}


def window_report(name: str, window: Dict[str, Any], state: Dict[str, Any], now_s: float,
                  tz: Optional[datetime.tzinfo], key: Optional[str] = None) -> Dict[str, Any]:
    """One window for people; with `key`, the forecast names no other key (a member sees its own)."""
    kind = plan_window(name)
    ahead = forecast(state["readings"].get(name) or [], kind.minutes, window["resets_at"], now_s)
    drivers = pace_drivers(state["shares"].get(name), ahead["based_on"]["span_minutes"] * 60, now_s)
    ahead["drivers"] = drivers if key is None else [d for d in drivers if d["key"] == key]
    ahead["text"] = forecast_text(kind, ahead, window["resets_at"], tz)
    return {"window": name, "label": kind.label, "models": kind.models or None,
            "utilization_pct": None if window["utilization"] is None else round(window["utilization"] * 100, 1),
            "status": window["status"], "resets_at": window["resets_at"],
            "resets_in": format_wait(window["resets_at"] - now_s), "forecast": ahead}


def pace_drivers(share: Optional[Dict[str, Any]], span_s: int, now_s: float) -> List[Dict[str, Any]]:
    """The keys whose use made a window rise over the pace span, most first (percent of the window)."""
    points: Dict[str, float] = collections.Counter()
    for t, key, pts in (share or {}).get("recent", ()):
        if t >= now_s - span_s:
            points[key] += pts
    return [{"key": k, "share_pct": round(v, 1)} for k, v in sorted(points.items(), key=lambda kv: -kv[1])[:3]]


def forecast_text(kind: PlanWindow, ahead: Dict[str, Any], resets_at: int, tz: Optional[datetime.tzinfo]) -> str:
    """The forecast for people: "weekly limit reached around Thu 14:00 at this pace; resets Fri 09:00"."""
    at = lambda t: datetime.datetime.fromtimestamp(t, tz).strftime("%a %H:%M")
    if ahead["pace_pct_per_hour"] is None:
        return f"not enough readings for a pace yet; resets {at(resets_at)}"
    if ahead["before_reset"]:
        return f"{kind.label} limit reached around {at(ahead['runs_out_at'])} at this pace; resets {at(resets_at)}"
    return f"at this pace ({ahead['pace_pct_per_hour']:g}%/h) it lasts until its reset, {at(resets_at)}"


def plan_share_headers(report: Dict[str, Any], key: str) -> Dict[str, str]:
    """x-ocp-plan-* on each answer: the windows' use and this key's estimated share of each."""
    headers = {}
    for name, window in report["windows"].items():
        short = plan_window(name).short
        mine = next((k["share_pct"] for k in window["keys"] if k["key"] == key), 0.0)
        headers[f"x-ocp-plan-utilization-{short}"] = f"{window['utilization_pct']:g}"
        headers[f"x-ocp-plan-share-{short}"] = f"{mine:g}"
        headers[f"x-ocp-plan-reset-{short}"] = str(window["resets_at"])
    return headers


def key_share(report: Dict[str, Any], key: Optional[str]) -> Dict[str, Any]:
    """The share report, cut to one key's entries when `key` is given."""
    if key is None:
        return report
    windows = {name: dict(w, keys=[k for k in w["keys"] if k["key"] == key]) for name, w in report["windows"].items()}
    return dict(report, windows=windows)


def share_columns(report: Dict[str, Any], key: str) -> Dict[str, Optional[float]]:
    """A key's estimated share of each window in percent (None: no report for that window)."""
    columns = {}
    for name, label in (("five_hour", "share_5h_pct"), ("seven_day", "share_7d_pct")):
        window = report["windows"].get(name)
        columns[label] = None if window is None else next(
            (k["share_pct"] for k in window["keys"] if k["key"] == key), 0.0)
    return columns


# -- alerts: what the owner should see, POSTed to OCP_ALERT_URL ------------------------------------

ALERTS_QUEUED = 100  # events waiting to be sent at most (the oldest goes first when full)
ALERTS_REMEMBERED = 2000  # events already raised, so each is raised once (a window's threshold in one period…)


def post_json(url: str, event: Dict[str, Any], timeout_s: float) -> None:
    """POST one event as JSON; raise OSError (urllib's errors are OSErrors) unless a 2xx came back."""
    import urllib.request  # only when alerts are on: the daemon stays small
    request = urllib.request.Request(url, json.dumps(event).encode("utf-8"), method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "ocp/" + __version__})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if not 200 <= response.status < 300:
            raise OSError(f"HTTP {response.status}")


class Alerts:
    """Events the owner should see — a plan window past a threshold, a forecast that a window runs
    out before its reset, a plan limit holding requests, a key at its quota, a broken login —
    each raised once, written to the audit log and, with OCP_ALERT_URL, POSTed as a small JSON
    object by one background thread: a request never waits for it (a bounded queue), each POST
    has a timeout and a few retries with backoff. Thread-safe."""

    def __init__(self, url: str, audit: Callable[[str, str, str], None], clock: Callable[[], float] = time.time,
                 post: Callable[[str, Dict[str, Any], float], None] = post_json):
        self.url, self.audit, self.clock, self.post = url, audit, clock, post
        self.retries, self.backoff_s, self.timeout_s = 3, 2.0, 5.0
        self._cond = threading.Condition()
        self._queue: "collections.deque[Dict[str, Any]]" = collections.deque()
        self._raised: "collections.OrderedDict[Any, None]" = collections.OrderedDict()
        self._thread: Optional[threading.Thread] = None
        self.counts = {"raised": 0, "sent": 0, "failed": 0, "dropped": 0}

    def raise_once(self, once: Any, event: str, message: str, **fields: Any) -> bool:
        """Raise an alert unless one with the same `once` was raised; True when it was raised now."""
        with self._cond:
            if once in self._raised:
                return False
            self._raised[once] = None
            while len(self._raised) > ALERTS_REMEMBERED:
                self._raised.popitem(last=False)
            self.counts["raised"] += 1
        body = dict(fields, event=event, message=message, text="OCP: " + message, at=int(self.clock()))
        self.audit("alert", event, json.dumps(body, sort_keys=True))
        log.warning("alert %s: %s", event, message, extra={"alert": event})
        if self.url:
            self._enqueue(body)
        return True

    def _enqueue(self, body: Dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) >= ALERTS_QUEUED:
                self._queue.popleft()
                self.counts["dropped"] += 1
            self._queue.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_all, name="ocp-alerts", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _send_all(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                body = self._queue.popleft()
            self._send(body)

    def _send(self, body: Dict[str, Any]) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.post(self.url, body, self.timeout_s)
            except (OSError, ValueError) as e:  # (a URL urllib cannot use is a ValueError)
                log.info("alert %s not delivered (attempt %d): %s", body["event"], attempt + 1, scrub_paths(str(e)))
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** attempt)
                continue
            with self._cond:
                self.counts["sent"] += 1
            return
        with self._cond:
            self.counts["failed"] += 1

    def snapshot(self) -> Dict[str, int]:
        with self._cond:
            return dict(self.counts, queued=len(self._queue))


def plan_alerts(alerts: Alerts, plan: PlanLimits, thresholds: Tuple[int, ...], now_s: float,
                tz: Optional[datetime.tzinfo]) -> None:
    """The plan's alerts after a change: each window past each threshold, a forecast that it runs
    out before its reset (once per window and period), a hold (once per hold)."""
    report = plan_report(plan, now_s, tz=tz)
    for window in report["windows"]:
        used, name, reset = window["utilization_pct"], window["window"], window["resets_at"]
        for threshold in thresholds:
            if used is not None and used >= threshold:
                alerts.raise_once(("window", name, reset, threshold), "plan_window",
                                  f"The plan's {window['label']} window is {used:g}% used (past {threshold}%); it "
                                  f"resets in {window['resets_in']}.", window=name, utilization_pct=used,
                                  threshold_pct=threshold, resets_at=reset)
        ahead = window["forecast"]
        if ahead["before_reset"]:
            alerts.raise_once(("forecast", name, reset), "plan_forecast", f"Forecast (an estimate): the "
                              f"{ahead['text']}.", window=name, runs_out_at=ahead["runs_out_at"], resets_at=reset,
                              pace_pct_per_hour=ahead["pace_pct_per_hour"], drivers=ahead["drivers"])
    holds = [("*", report["held_until"], "every model")] if report["held_until"] else []
    holds += [(h["models"], h["until"], h["models"] + " models") for h in report["held_models"]]
    for models, until, who in holds:
        alerts.raise_once(("hold", models, until), "plan_held", f"The plan's usage limit is reached: OCP holds "
                          f"requests for {who} until {utc_time(until)}.", models=models, until=until)


###############################################################################
# Metrics & logs ##############################################################
###############################################################################

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOG_RECORD_FIELDS = set(vars(logging.LogRecord("x", 0, "", 0, "", (), None))) | {"message", "asctime"}


class Histogram:
    def __init__(self):
        self.buckets = [0] * len(LATENCY_BUCKETS_S)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1
        self.total += seconds
        self.count += 1

    def samples(self, name: str, labels: Dict[str, str]) -> List[str]:
        lines = [sample(name + "_bucket", dict(labels, le=f"{bound:g}"), n)
                 for bound, n in zip(LATENCY_BUCKETS_S, self.buckets)]
        return lines + [sample(name + "_bucket", dict(labels, le="+Inf"), self.count),
                        sample(name + "_sum", labels, round(self.total, 6)),
                        sample(name + "_count", labels, self.count)]


@dataclasses.dataclass(frozen=True)
class Family:
    """A metric family of /metrics, declared once: name, kind (counter | gauge | histogram), help,
    label names. A family Metrics counts has no `read`; one read when /metrics is asked has
    `read(view)` -> a number, or {label value (a tuple for several labels): number}."""

    name: str
    kind: str
    help: str
    labels: Tuple[str, ...] = ()
    read: Optional[Callable[[Any], Any]] = None

    def render(self, values: Any) -> List[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        if not isinstance(values, dict):
            values = {(): values}
        for key, value in sorted(values.items(), key=lambda item: item[0]):
            labels = dict(zip(self.labels, key if isinstance(key, tuple) else (key,)))
            lines += (value.samples(self.name, labels) if self.kind == "histogram"
                      else [sample(self.name, labels, value)])
        return lines


COUNTED = (  # what Metrics counts as it happens
    Family("ocp_requests_total", "counter", "Chat completion requests by outcome.", ("status", "model", "key")),
    Family("ocp_http_responses_total", "counter", "Every HTTP response by route and code.",
           ("route", "method", "code")),
    Family("ocp_tokens_total", "counter", "Tokens of answered requests (prompt, cached prompt, completion).",
           ("kind", "model", "key")),
    Family("ocp_cli_events_total", "counter", "CLI events beside the answer, by name (CLI_EVENTS): retries, model "
           "fallbacks, compactions, plan reports.", ("event",)),
    Family("ocp_request_duration_seconds", "histogram", "Time to answer a chat completion.", ("model",)),
    Family("ocp_ttft_seconds", "histogram", "Time to the first token.", ("model",)),
)


class Metrics:
    """Counters and latency histograms since start, for GET /metrics. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values: Dict[str, Dict[Tuple[str, ...], Any]] = {
            f.name: collections.defaultdict(Histogram) if f.kind == "histogram" else collections.Counter()
            for f in COUNTED}

    def count(self, family: str, *labels: str, n: float = 1) -> None:
        with self._lock:
            self.values[family][labels] += n

    def observe(self, family: str, seconds: float, *labels: str) -> None:
        with self._lock:
            self.values[family][labels].observe(seconds)

    def respond(self, route: str, method: str, code: int) -> None:
        """Every response, refusals included (401, 403, 429, 400 never reach a CLI)."""
        self.count("ocp_http_responses_total", route, method, str(code))

    def count_tokens(self, model: str, key: str, usage: Optional[Usage]) -> None:
        for kind, n in (("prompt", usage.prompt - usage.cache_read), ("cached", usage.cache_read),
                        ("completion", usage.output)) if usage else ():
            if n:
                self.count("ocp_tokens_total", kind, model, key, n=n)

    def record(self, status: str, model: str, key: str, duration_s: float, ttft_s: Optional[float]) -> None:
        self.count("ocp_requests_total", status, model, key)
        if status in ("ok", "cached"):
            self.observe("ocp_request_duration_seconds", duration_s, model)
        if ttft_s is not None:
            self.observe("ocp_ttft_seconds", ttft_s, model)

    def counts_by_status(self) -> Dict[str, int]:
        with self._lock:
            totals: Dict[str, int] = collections.Counter()
            for (status, _, _), n in self.values["ocp_requests_total"].items():
                totals[status] += n
            return dict(totals)

    def render(self, read: Tuple[Family, ...] = (), view: Any = None) -> str:
        """Prometheus text exposition (0.0.4): the counted families, then those `read` from `view`."""
        lines: List[str] = []
        with self._lock:
            for family in COUNTED:
                lines += family.render(self.values[family.name])
        for family in read:
            lines += family.render(family.read(view))
        return "\n".join(lines) + "\n"


def sample(name: str, labels: Dict[str, str], value: float) -> str:
    if labels:
        escaped = ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())
        return f"{name}{{{escaped}}} {value}"
    return f"{name} {value}"


def by_window(view: Any, field: str) -> Dict[str, Any]:
    return {name: w[field] for name, w in current_windows(view.plan, view.now).items() if w["utilization"] is not None}


READ = (  # what /metrics reads from the daemon's parts when asked (the view: Server.metric_view)
    Family("ocp_up", "gauge", "1 while the daemon answers.", (), lambda v: 1),
    Family("ocp_build_info", "gauge", "The running version.", ("version",), lambda v: {__version__: 1}),
    Family("ocp_in_flight", "gauge", "CLI processes running.", (), lambda v: v.slots["running"]),
    Family("ocp_queued", "gauge", "Requests waiting for a CLI slot.", (), lambda v: v.slots["queued"]),
    Family("ocp_slots", "gauge", "CLI processes allowed at once.", (), lambda v: v.slots["limit"]),
    Family("ocp_plan_held", "gauge", "1 while the plan's usage limit holds requests.", (),
           lambda v: int(v.plan["hold_until"] > v.now)),
    Family("ocp_plan_utilization", "gauge", "Plan window utilization (1 = full).", ("window",),
           lambda v: by_window(v, "utilization")),
    Family("ocp_plan_resets_at", "gauge", "When a plan window resets (epoch seconds).", ("window",),
           lambda v: by_window(v, "resets_at")),
    Family("ocp_plan_held_models", "gauge", "1 while a per-model limit holds that family's requests.", ("models",),
           lambda v: {family: 1 for family, h in v.plan["model_holds"].items() if h["until"] > v.now}),
    Family("ocp_plan_share_percent", "gauge", "Estimated share of a plan window used by a key (percent of the "
           "window; see the README).", ("window", "key"),
           lambda v: {(name, e["key"]): e["share_pct"] for name, w in v.share["windows"].items() for e in w["keys"]}),
    Family("ocp_tools_parked", "gauge", "CLIs parked on their clients' tool calls.", (),
           lambda v: v.parks["parked_now"]),
    Family("ocp_tool_rounds_total", "counter", "Client tool rounds: parked, resumed, fell back, expired, evicted, "
           "exited while parked.", ("event",), lambda v: {k: n for k, n in v.parks.items() if k != "parked_now"}),
    Family("ocp_pool_processes", "gauge", "Idle CLIs in the warm pool: warm, or holding a conversation.", ("state",),
           lambda v: {"warm": v.pool["warm"], "conversation": v.pool["conversations"]}),
    Family("ocp_pool_rss_bytes", "gauge", "Resident memory of the pool's idle CLIs.", (),
           lambda v: int(v.pool["rss_mb"] * (1 << 20))),
    Family("ocp_pool_budget_bytes", "gauge", "The pool's memory budget (0: the pool is off).", (),
           lambda v: v.pool["budget_mb"] << 20),
    Family("ocp_pool_hits_total", "counter", "Requests answered by a pooled CLI: warm, reset with /clear, or "
           "holding the request's conversation.", ("kind",), lambda v: v.pool["hits"]),
    Family("ocp_pool_misses_total", "counter", "Requests that found no pooled CLI and started one.", (),
           lambda v: v.pool["misses"]),
    Family("ocp_pool_spawns_total", "counter", "Warm CLIs started after a use of their configuration.", (),
           lambda v: v.pool["spawned"]),
    Family("ocp_pool_spares_total", "counter", "Warm spares a request took (used) or that ended untouched (unused).",
           ("outcome",), lambda v: v.pool["spares"]),
    Family("ocp_pool_evictions_total", "counter", "Pooled CLIs ended: over the budget, idle past the TTL, exited, "
           "cleared.", ("reason",), lambda v: v.pool["evictions"]),
    Family("ocp_connections", "gauge", "Client connections open.", (), lambda v: v.connections["open"]),
    Family("ocp_connections_max", "gauge", "Client connections allowed at once (OCP_MAX_CONNECTIONS).", (),
           lambda v: v.connections["cap"]),
    Family("ocp_connections_closed_total", "counter", "Connections closed to make room (shed) or refused for want "
           "of it.", ("why",), lambda v: {why: v.connections[why] for why in ("shed", "refused")}),
    Family("ocp_cache_events_total", "counter", "Cache hits, misses and shared runs.", ("event",), lambda v: v.flights),
)


def label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


class TextFormatter(logging.Formatter):
    """Lines for people; control characters in a message are escaped, so no caller-given text
    (a `user` field, a path) can start a forged log line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), record.message)
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        return local_second(int(record.created)) + ",%03d" % record.msecs


@functools.lru_cache(maxsize=4)
def local_second(second: int) -> str:
    """logging's default time text for a whole second, local time (made once a second)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, message and any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(log_entry(record), ensure_ascii=False, default=str)


@functools.lru_cache(maxsize=4)
def utc_second(second: int) -> str:
    """The ISO text of a whole UTC second (a busy log writes many lines a second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))


def log_entry(record: logging.LogRecord) -> Dict[str, Any]:
    second = int(record.created)
    entry = {"ts": utc_second(second) + f"{int((record.created - second) * 1000):03d}Z",
             "level": record.levelname, "msg": record.getMessage()}
    entry.update({k: v for k, v in vars(record).items() if k not in LOG_RECORD_FIELDS})
    if record.exc_info:
        entry["exception"] = logging.Formatter().formatException(record.exc_info)
    return entry


class LogRing(logging.Handler):
    """The last log records in memory, behind GET /logs; each becomes an entry when it is read
    (most never are: a request's line costs its thread no formatting). A record with an exception
    is an entry at once: its traceback would keep the frames alive. Thread-safe (logging locks emit)."""

    def __init__(self, size: int = 1000):
        super().__init__()
        self.entries: "collections.deque[Any]" = collections.deque(maxlen=size)  # records or entries

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # the text as it is now
        self.entries.append(log_entry(record) if record.exc_info else record)

    def tail(self, n: int, level: str = "DEBUG") -> List[Dict[str, Any]]:
        floor = logging.getLevelName(level)
        chosen = [e for e in list(self.entries)
                  if (e.levelno if isinstance(e, logging.LogRecord) else logging.getLevelName(e["level"])) >= floor]
        return [log_entry(e) if isinstance(e, logging.LogRecord) else e for e in chosen[-n:]]


class PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A size-capped log file created 0600: key names and request details are the owner's."""

    ended = False

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding)

    def emit(self, record: logging.LogRecord) -> None:
        """Nothing once closed: logging's FileHandler reopens its file for a late record (a request
        thread finishing after shutdown), and that file would never be closed."""
        if not self.ended:
            super().emit(record)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        """The size so far alone (logging also stats the path twice and formats each record once more
        for it: OCP's file is its own, and a line past 5 MB is no harm)."""
        if self.stream is None:
            self.stream = self._open()
        return self.maxBytes > 0 and self.stream.tell() >= self.maxBytes

    def close(self) -> None:
        with self.lock:  # (emit runs under it: no record reopens the file after this)
            self.ended = True
            super().close()


class LogWriter(logging.Handler):
    """The log's slow outputs (the file, stderr), written by one background thread: a request
    hands its record over and goes on. The file's lock, its size check and its writes are in no
    request's path (at 8 connections, threads queueing for that lock held a cheap route to 0.4x
    of a bare server). Bounded: a record that finds LOG_QUEUED waiting is dropped and counted."""

    def __init__(self, outputs: List[logging.Handler]):
        super().__init__()
        self.outputs = outputs
        self.queue: "queue.Queue[Optional[logging.LogRecord]]" = queue.Queue(maxsize=LOG_QUEUED)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write, name="ocp-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # the text as it is now: its arguments may change
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while True:
            records = [self.queue.get()]  # then what came meanwhile, and a pause: under load the
            with contextlib.suppress(queue.Empty):  # thread wakes ~50 times a second, not per record
                while len(records) < 1000:
                    records.append(self.queue.get_nowait())
            ended = None in records
            if ended:
                records = records[:records.index(None)]
            for output in self.outputs:
                write_records(output, [r for r in records if r.levelno >= output.level])
            if ended:
                return
            time.sleep(LOG_PAUSE_S)

    def close(self) -> None:
        """Write what is queued, then close the outputs (the file)."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self.queue.put(None, timeout=5)
            self._thread.join(5)
        for output in self.outputs:
            output.close()
        super().close()


LOG_QUEUED = 10_000
LOG_PAUSE_S = 0.02


def write_records(output: logging.Handler, records: List[logging.LogRecord]) -> None:
    """A batch through a stream handler (stderr, the file) in one write and one flush: a write
    and a flush per record were, under load, two GIL hand-offs each. Other handlers: one by one."""
    if not records:
        return
    if not isinstance(output, logging.StreamHandler) or output.filters:
        for record in records:
            output.handle(record)
        return
    try:
        text = "".join(output.format(record) + output.terminator for record in records)
    except Exception:
        output.handleError(records[-1])
        return
    with output.lock:  # (the handler's own: a rollover or close is never halfway)
        if getattr(output, "ended", False):
            return
        try:
            if isinstance(output, logging.handlers.RotatingFileHandler) and output.shouldRollover(records[0]):
                output.doRollover()
            if output.stream is None:
                output.stream = output._open()
            output.stream.write(text)
            output.flush()
        except Exception:
            output.handleError(records[-1])


def setup_logging(config: Config, ring: LogRing, console: bool = True) -> None:
    """Daemon logging: stderr for people and a rotating JSON file (written in the background),
    and the ring for /logs."""
    logs = os.path.join(config.home, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    level = getattr(logging, config.log_level.upper())
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False  # no record shows them
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    file_handler = PrivateRotatingFile(os.path.join(logs, "ocp.log"), maxBytes=5 * 1024 * 1024, backupCount=3)
    file_handler.setFormatter(JsonFormatter())
    for handler in log.handlers[:]:  # a second setup (tests, a restart in-process) closes the first one's file
        handler.close()
    log.handlers[:] = [LogWriter(([stderr] if console else []) + [file_handler]), ring]
    log.setLevel(level)
    log.propagate = False


###############################################################################
# Turns #######################################################################
###############################################################################

# What a Turn yields: (kind, value). Encoders render them; nothing here knows JSON or SSE.
TEXT = "text"  # value: a piece of the answer
REASONING = "reasoning"  # value: a piece of the model's thinking
REFUSAL = "refusal"  # value: why there is no answer (e.g. the JSON asked for never came)
TOOL_CALL = "tool_call"  # value: {"index", "id", "name"}: a client tool call starts
TOOL_ARGS = "tool_args"  # value: {"index", "arguments"}: a piece of its arguments
PING = "heartbeat"  # value: None; nothing new for a heartbeat interval
PLAN = "plan"  # value: {"overage": True}: learnt about the subscription mid-answer
DONE = "done"  # value: the Outcome; always last
REPLAY_PIECE_CHARS = 24  # a finished answer (cache hit, shared run, checked JSON) streams in pieces this size
FINISHES = ("end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal")


@dataclasses.dataclass
class Outcome:
    """How a turn ended, in no wire format's terms: what the cache, shared requests,
    the usage row and every encoder read."""

    content: Optional[str] = ""  # None when there is a refusal instead
    reasoning: str = ""
    refusal: Optional[str] = None
    finish: str = "end_turn"  # one of FINISHES
    usage: Usage = dataclasses.field(default_factory=Usage)
    error: Optional[ApiError] = None
    ttft_ms: Optional[int] = None  # (the request's whole duration is the ledger's to measure)
    overage: bool = False  # paid from the subscription's extra usage
    tool_calls: Tuple[Dict[str, Any], ...] = ()  # {"id", "name", "arguments"} when finish is tool_use
    stop_sequence: str = ""  # the one that ended the text, when finish is stop_sequence

    def cacheable(self) -> bool:
        """Only a complete, error-free answer may be kept and replayed."""
        return self.error is None and self.refusal is None and self.finish in ("end_turn", "stop_sequence")

    def to_cache(self) -> Dict[str, Any]:
        """The outcome as the cache stores it (JSON); `from_cache` reads it back."""
        return {"content": self.content, "reasoning": self.reasoning, "refusal": self.refusal,
                "finish": self.finish, "usage": dataclasses.asdict(self.usage)}

    @classmethod
    def from_cache(cls, data: Mapping[str, Any]) -> Optional["Outcome"]:
        """An outcome the cache kept; None for a row this version cannot read."""
        if not isinstance(data, dict) or data.get("finish") not in FINISHES:
            return None
        return cls(content=data.get("content"), reasoning=data.get("reasoning") or "",
                   refusal=data.get("refusal"), finish=data["finish"],
                   usage=Usage.from_dict(data.get("usage") or {}))


def outcome_events(outcome: Outcome) -> Iterator[Tuple[str, Any]]:
    """A finished answer as the events of a turn: a cache hit or a shared run replays so."""
    if outcome.reasoning:
        yield REASONING, outcome.reasoning
    if outcome.content is None:
        yield REFUSAL, outcome.refusal
    content = outcome.content or ""
    for start in range(0, len(content), REPLAY_PIECE_CHARS):
        yield TEXT, content[start:start + REPLAY_PIECE_CHARS]
    yield DONE, outcome


def check_tool_server(init: Dict[str, Any]) -> None:
    """A tool spawn whose MCP server did not connect must not answer as if there were no tools."""
    servers = [m for m in init.get("mcp_servers") or [] if isinstance(m, dict) and m.get("name") == "ocp"]
    if not servers or servers[0].get("status") != "connected":
        raise ApiError(502, "The claude CLI could not reach OCP's tool server, so the model cannot call "
                       "the request's tools; retry, or see the OCP log.", "proxy_error", "tool_server_failed")


def raise_failure(answer: Answer) -> None:
    if answer.failure is not None:
        raise answer.failure


# -- client tool rounds: parked CLIs -------------------------------------------------------

@dataclasses.dataclass(eq=False)  # each is its own: compared by identity
class Park:
    """A CLI waiting on its client's tool calls (AGENTS-SPEC §1.6), found by the calls' ids."""

    owner: str  # the key it belongs to: no one else may continue it
    priority: str  # its key's priority: a lower key's round never pushes it out
    lease: Lease
    bridge: ToolBridge
    ids: Tuple[str, ...]  # the calls the client was given
    undelivered: Tuple[str, ...]  # further calls held back (parallel_tool_calls false)
    prefix: str  # canonical hash of the conversation that made the round
    shape: str  # hash of model, system texts, tools, tool_choice, parallel_tool_calls, output format
    expires_at: float

    @property
    def rss_mb(self) -> float:
        """Its CLI's size as last measured: it counts in the kept CLIs' budget (OCP_POOL_MAX_MB)."""
        return self.lease.rss_mb

    def call_ids(self) -> Tuple[str, ...]:
        return self.ids + self.undelivered


def park_limits(config: Config) -> Tuple[int, int]:
    """(parked CLIs at most, parked CLIs one key may keep)."""
    limit = config.tool_park_max or config.max_concurrent
    return limit, config.tool_park_max_per_key or max(1, limit // 2)


def parks_to_end(parks: List[Park], newcomer: Park, limit: int, per_key: int, budget_mb: float) -> List[Park]:
    """Which parked rounds end so that `newcomer` fits: its key's own oldest beyond `per_key`
    first; then, while more than `limit` are parked or they pass `budget_mb` (at least one
    stays), the lowest priority, of the key with the most, oldest first. The newcomer is
    among the candidates, so a lower key's round never ends a higher key's: it goes itself."""
    own = [p for p in parks if p.owner == newcomer.owner]
    ending = own[:max(0, len(own) - per_key)]
    rest = [p for p in parks if p not in ending]
    while len(rest) > limit or (len(rest) > 1 and sum(p.rss_mb for p in rest) > budget_mb):
        counts = collections.Counter(p.owner for p in rest)
        victim = min(enumerate(rest), key=lambda item: (PRIORITIES.index(item[1].priority),
                                                        -counts[item[1].owner], item[0]))[1]
        rest.remove(victim)
        ending.append(victim)
    return ending


def canonical_hash(value: Any) -> str:
    """SHA-256 of canonical JSON; tool-call arguments compare as parsed JSON (AGENTS-SPEC §1.7)."""
    def canon(item: Any) -> Any:
        if isinstance(item, dict):
            if item.get("type") == "tool_call":
                try:
                    arguments = json.loads(item.get("arguments") or "{}")
                except ValueError:
                    arguments = item.get("arguments")
                return {"type": "tool_call", "id": item.get("id"), "name": item.get("name"), "arguments": arguments}
            return {k: canon(v) for k, v in item.items() if v not in ("", None, [])}
        if isinstance(item, (list, tuple)):
            return [canon(v) for v in item]
        return item
    text = json.dumps(canon(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tool_shape(request: TurnRequest) -> str:
    """What a parked round's follow-up must ask as the round did: its output format included."""
    return canonical_hash([request.model.id, request.system, request.tools, request.tool_choice,
                           request.parallel_tool_calls, request.response_format, request.json_schema])


class Parks:
    """The parked CLIs, by tool-call id. A TTL, a cap, a share per key and the kept CLIs' memory
    budget bound them (parks_to_end says which go); a reaper thread ends expired ones and
    forgets those whose CLI exited. An ended park's CLI is killed outright (Lease.cancel).
    Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._cond = threading.Condition()
        self._parks: List[Park] = []  # oldest first
        self._thread: Optional[threading.Thread] = None
        self.counters = {"parked": 0, "resumed": 0, "fallback": 0, "expired": 0, "evicted": 0, "exited": 0,
                         "abandoned": 0}

    def put(self, park: Park, limit: int, per_key: int, budget_mb: float) -> None:
        """Park a CLI, ending the rounds parks_to_end names (the newcomer itself, maybe)."""
        park.lease.rss_mb = rss_mb(park.lease.proc.pid)  # measured first: idle, it counts as this
        park.lease.parked_round = True
        park.lease.park()
        with self._cond:
            self._parks.append(park)
            self.counters["parked"] += 1
            evicted = parks_to_end(self._parks, park, limit, per_key, budget_mb)
            for old in evicted:
                self._parks.remove(old)
            self.counters["evicted"] += len(evicted)
            if self._thread is None:
                self._thread = threading.Thread(target=self._reap, name="ocp-parks", daemon=True)
                self._thread.start()
            self._cond.notify()
        for old in evicted:
            log.info("a parked CLI was ended to make room (OCP_TOOL_PARK_MAX, _PER_KEY, OCP_POOL_MAX_MB)")
            old.lease.kill("evicted")

    def end_abandoned(self, request: TurnRequest) -> int:
        """End the key's parked rounds that this request's history has left behind: it carries
        one of their call ids without continuing it (a killed client, `--continue` after a
        kill, a 400 on the resumed round, client-side compaction). Return how many."""
        with self._cond:
            if not any(p.owner == request.owner for p in self._parks):
                return 0
            mentioned = {b.get("id") for turn in request.turns for b in turn["content"]
                         if b["type"] in ("tool_call", "tool_result")}
            gone = [p for p in self._parks if p.owner == request.owner and mentioned & set(p.call_ids())]
            for park in gone:
                self._parks.remove(park)
            self.counters["abandoned"] += len(gone)
        for park in gone:
            log.info("a parked CLI was ended: its key's next request left its tool round behind")
            park.lease.kill("abandoned")
        return len(gone)

    def claim(self, ids: List[str], owner: str) -> Optional[Park]:
        """Take the park that emitted any of `ids`, if `owner` owns it (once: a retry falls back)."""
        with self._cond:
            for park in self._parks:
                if set(ids) & set(park.ids) and park.owner == owner:
                    self._parks.remove(park)
                    park.lease.parked_round = False
                    return park
        return None

    def count(self, name: str) -> None:
        with self._cond:
            self.counters[name] += 1

    def snapshot(self) -> Dict[str, int]:
        with self._cond:
            return dict(self.counters, parked_now=len(self._parks))

    def close(self) -> int:
        """Shutdown: end every parked CLI."""
        with self._cond:
            parks, self._parks = self._parks, []
        for park in parks:
            park.lease.kill("shutdown")
        return len(parks)

    def _reap(self) -> None:
        while True:
            with self._cond:
                now = self.clock()
                gone = [p for p in self._parks if p.expires_at <= now or p.lease.proc.popen.poll() is not None]
                for park in gone:
                    self._parks.remove(park)
                    self.counters["expired" if park.expires_at <= now else "exited"] += 1
                wait = min((p.expires_at for p in self._parks), default=now + 5) - now
                parks = list(self._parks)
            for park in parks:  # they grow while they wait: the kept CLIs' budget counts them as they are
                park.lease.rss_mb = rss_mb(park.lease.proc.pid) or park.lease.rss_mb
            for park in gone:
                log.info("a parked CLI was ended: its client's tool results did not come in time (OCP_TOOL_PARK_TTL)")
                park.lease.kill("expired")
            with self._cond:
                self._cond.wait(min(max(wait, 0.05), 1.0))


def tool_followup(request: TurnRequest, parks: Parks) -> Optional[Park]:
    """The parked CLI this request continues (AGENTS-SPEC §1.7), or None for a fresh spawn."""
    turns = list(request.turns)
    results: List[Dict[str, Any]] = []
    while turns and turns[-1]["role"] == "tool":
        results = [b for b in turns.pop()["content"] if b["type"] == "tool_result"] + results
    if not results:
        return None
    park = parks.claim([r["id"] for r in results], request.owner)
    if park is None:
        parks.count("fallback")
        log.info("tool results for no parked CLI (expired, evicted or another key's): the history goes as text")
        return None
    assistant = turns.pop() if turns and turns[-1]["role"] == "assistant" else {"content": []}
    calls = {b["id"] for b in assistant["content"] if b["type"] == "tool_call"}
    if not ({r["id"] for r in results} == calls == set(park.ids) and canonical_hash(turns) == park.prefix
            and tool_shape(request) == park.shape):
        park.lease.kill("mismatch")
        parks.count("fallback")
        log.info("tool results that do not continue their parked CLI's conversation: it was ended, "
                 "the history goes as text")
        return None
    parks.count("resumed")
    return park


def tool_result(text: str, limit: int, is_error: bool = False, images: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A client's tool result as MCP's tools/call result; cut past `limit` characters, marked;
    data-URL images as MCP image content (AGENTS-SPEC §3.3)."""
    if len(text) > limit:
        text = text[:limit] + f"\n[OCP: result cut from {len(text)} to {limit} characters]"
    result: Dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    for url in images:
        match = DATA_URL.fullmatch(url.strip())
        if match:
            result["content"].append({"type": "image", "data": re.sub(r"\s+", "", match.group(2)),
                                      "mimeType": match.group(1).lower()})
    if is_error:
        result["isError"] = True
    return result


# -- conversations that stay in their CLI ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Followup:
    """A request that may continue a conversation a pooled CLI holds: send it only `new`."""

    conversation: str  # the tag the CLI was pooled under (conversation_tag)
    new: Tuple[Dict[str, Any], ...]  # the user turns after the last answer
    history: str  # history_digests of every turn of the request: its own tag's, once answered


def json_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def history_digests(turns: Tuple[Dict[str, Any], ...], cut: int) -> Tuple[str, str]:
    """SHA-256 of turns[:cut] and of all the turns, in one pass, for telling a conversation's
    history unchanged. Text blocks (nearly all of a long history) are fed as they are,
    length-prefixed — 0.15 ms for 200 turns, where JSON would take 0.75 and canonical_hash 2;
    other blocks through canonical_hash, so a tool call's arguments compare as parsed JSON."""
    digest, at_cut = hashlib.sha256(), ""
    for index, turn in enumerate(turns):
        if index == cut:
            at_cut = digest.hexdigest()
        digest.update(b"\x00" + turn["role"].encode("utf-8"))
        for block in turn["content"]:
            data = (block["text"] if block["type"] == "text" else canonical_hash(block)).encode("utf-8")
            digest.update(b"\x01%d:" % len(data) + data)
    return at_cut or digest.hexdigest(), digest.hexdigest()


def conversation_tag(request: TurnRequest, history: str, answer: str) -> str:
    """Who asked, what must not change for the conversation to go on in its CLI (the spawn's
    inputs, the system prompt's parts; stop sequences are OCP's own), the turns before the
    answer that ended it (their history_digests), and that answer."""
    return json_digest([request.owner, request.model.id, request.system, request.tools, request.tool_choice,
                        request.parallel_tool_calls, request.effort, request.max_tokens, history, answer.strip()])


def conversation_followup(request: TurnRequest) -> Optional[Followup]:
    """The conversation this request would continue: it ends in new user turns after a plain
    answer (no tool calls; those rounds continue through Parks). None otherwise."""
    turns = request.turns
    start = len(turns)
    while start and turns[start - 1]["role"] == "user":
        start -= 1
    if start in (0, len(turns)) or turns[start - 1]["role"] != "assistant" or request.response_format != "text":
        return None
    answer = turns[start - 1]["content"]
    if any(b["type"] != "text" for b in answer):
        return None
    before, history = history_digests(turns, start - 1)
    return Followup(conversation_tag(request, before, "".join(b["text"] for b in answer)), turns[start:], history)


@dataclasses.dataclass(frozen=True)
class TurnServices:
    """What every Turn uses, built once by the Server (again only when a runtime setting changes
    the config): the runner, the plan, the parked rounds, the metrics, the settings, the secret
    that frames turns, the clock."""

    runner: Runner
    plan: PlanLimits
    parks: Parks
    metrics: Metrics
    config: Config
    secret: bytes
    clock: Callable[[], float]


class Turn:
    """One request answered by the CLI, as neutral events (`events()`).

    It leases a CLI process, feeds it the request, turns the CLI's events into
    TEXT / REASONING / PING / PLAN events, cuts at stop sequences, checks
    structured output (one retry), and always ends with DONE and an Outcome —
    errors included. `cancel()` (the request side: its client left) ends the run.
    """

    def __init__(self, request: TurnRequest, job: Job, services: TurnServices, resume: Optional[Park] = None,
                 followup: Optional[Followup] = None):
        self.request, self.job, self.services = request, job, services
        self.resume = resume  # client tools: the parked round this request continues
        self.followup = followup  # a pooled CLI holds the conversation: `job` has only the new turns
        self.history = followup.history if followup else ""  # (computed once per request)
        self.bridge = resume.bridge if resume else (ToolBridge(job.tools) if job.tools else None)
        self.started = time.monotonic()
        self.ttft_ms: Optional[int] = None
        self.overage = False
        self.cancelled = False
        self.answers: List[Answer] = []  # every CLI run of this turn, for usage when it is cut short
        self._lease: Optional[Lease] = None

    def cancel(self, reason: str = "client") -> None:
        """End the turn from another thread: while queued it gives up, a running CLI is ended."""
        self.cancelled = True
        lease = self._lease
        if lease is not None:
            lease.cancel(reason)

    def events(self) -> Iterator[Tuple[str, Any]]:
        """Yield the answer's events, then (DONE, Outcome). ClientGone passes through."""
        try:
            if self.request.response_format != "text":
                outcome = yield from self._structured()
                yield from outcome_events(outcome)
            else:
                yield DONE, (yield from self._text())
        except ApiError as error:
            yield DONE, self.outcome(error=error)

    def outcome(self, **fields: Any) -> Outcome:
        """An Outcome with this turn's usage and timings; `fields` fill in the rest."""
        fields.setdefault("usage", self.usage_so_far())
        return Outcome(ttft_ms=self.ttft_ms, overage=self.overage, **fields)

    def usage_so_far(self) -> Usage:
        """What this turn's runs used; for one cut short, what its model calls reported so far."""
        usage = Usage()
        for answer in self.answers:
            usage += answer.usage()
        if self.answers and not usage.output:  # cut off before the CLI counted its output
            chars = sum(len(a.text) + len("".join(a.reasoning)) for a in self.answers)
            usage.output = -(-chars // CHARS_PER_TOKEN)
        return usage

    def _text(self) -> Iterator[Tuple[str, Any]]:
        scanner = StopScanner(self.request.stop)
        sent: List[str] = []
        answer = yield from self._run(self.job, scanner, sent, forward=True)
        raise_failure(answer)
        rest = scanner.flush()
        if rest:
            sent.append(rest)
            yield TEXT, rest
        if answer.round_done:
            return (yield from self._tool_round("".join(sent), answer, answer.usage()))
        return self.outcome(content="".join(sent), reasoning="".join(answer.reasoning),
                            finish="stop_sequence" if scanner.stopped else answer.finish(),
                            stop_sequence=scanner.matched, usage=answer.usage())

    def _tool_round(self, content: str, answer: Answer, usage: Usage) -> Iterator[Tuple[str, Any]]:
        """A round of client tool calls as the turn's answer (its TOOL_CALL events went out as
        they came): finish tool_use, the calls the client gets, with JSON arguments."""
        calls = self.delivered_calls(answer)
        for call in calls:
            if not call["arguments"]:  # a call without input still needs JSON arguments
                call["arguments"] = "{}"
                yield TOOL_ARGS, {"index": call["index"], "arguments": "{}"}
        return self.outcome(content=content, reasoning="".join(answer.reasoning), finish="tool_use", usage=usage,
                            tool_calls=tuple({"id": c["id"], "name": c["name"], "arguments": c["arguments"]}
                                             for c in calls))

    def delivered_calls(self, answer: Answer) -> List[Dict[str, Any]]:
        """The round's calls the client gets: all, or the first when parallel_tool_calls is false."""
        if not answer.round_done:
            return []
        return answer.tool_calls if self.request.parallel_tool_calls else answer.tool_calls[:1]

    def _structured(self) -> Iterator[Tuple[str, Any]]:
        """A JSON answer is checked before anything is sent; one retry names the problem. With
        client tools, a round of tool calls is the answer (it is no JSON to check): the client
        gets its calls, and the JSON comes once the model has its results."""
        scanner = StopScanner(self.request.stop)
        parts: List[str] = []
        answer = yield from self._run(self.job, scanner, parts, forward=False)
        raise_failure(answer)
        content = "".join(parts) + scanner.flush()
        usage = answer.usage()
        if answer.round_done:
            return (yield from self._tool_round(content, answer, usage))
        problem = json_problem(content, self.request)
        if problem:  # a fresh CLI with the whole history: the first one has ended (or went to the pool)
            answer = yield from self._run(self.retry_job(content, problem), StopScanner(()), [], forward=False)
            raise_failure(answer)
            usage += answer.usage()
            content = answer.text
            if answer.round_done:
                return (yield from self._tool_round(content, answer, usage))
            problem = json_problem(content, self.request)
        reasoning = "".join(answer.reasoning)
        if problem:
            return self.outcome(content=None, reasoning=reasoning, usage=usage,
                                refusal=f"The model did not produce the requested JSON: {problem}")
        return self.outcome(content=normalize_json(content), reasoning=reasoning, finish=answer.finish(),
                            usage=usage)

    def retry_job(self, reply: str, problem: str) -> Job:
        """The JSON retry: the rejected reply and why, then a request for the corrected JSON."""
        turns = self.request.turns + (
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
            {"role": "user", "content": [{"type": "text", "text": f"That reply was not accepted: {problem}. "
                                          "Reply again with only the corrected JSON."}]})
        system, blocks = messages_to_input(dataclasses.replace(self.request, turns=turns), self.services.config,
                                           self.services.secret)
        return dataclasses.replace(self.job, system_prompt=system, blocks=blocks)

    def _run(self, job: Job, scanner: StopScanner, collected: List[str], forward: bool) -> Iterator[Tuple[str, Any]]:
        """One CLI run on a lease; returns its Answer. Text goes through `scanner` into
        `collected` (and out as events when `forward`); the run ends early at a stop
        sequence or max_tokens (the CLI would go on: it is killed), or parks at a round
        of client tool calls."""
        held, job = self.conversation_cli(job)
        resume, self.resume = self.resume, None  # a turn resumes its park at most once
        if resume is None and job.tools:  # a new CLI gets its own tool server
            self.bridge = ToolBridge(job.tools)
        answer = Answer(self.bridge.client_names if self.bridge else None)
        self.answers.append(answer)
        ending = "kill"
        lease = self._lease = resume.lease if resume else self.services.runner.lease(
            job, lambda: self.cancelled, self.bridge, held)
        try:
            blocks = yield from self._start(lease, job, resume)
            for event in lease.exchange(blocks):
                for kind, value in self._feed(answer, event):
                    if kind == TEXT:
                        value = scanner.feed(value)
                        collected.append(value)
                    if kind in (TOOL_CALL, TOOL_ARGS) and value["index"] and not self.request.parallel_tool_calls:
                        continue  # only the first call reaches the client
                    if kind not in (TEXT, REASONING) or (forward and value):
                        yield kind, value
                if answer.round_done:
                    ending = "park"
                    return answer
                if scanner.stopped or (job.max_tokens and answer.hit_max_tokens()):
                    return answer
            ending = "release" if answer.result is not None else "kill"
            self._settle(answer)  # before the CLI is kept: a plan limit it met must stop any spare first
        finally:
            self._end(lease, answer, ending)
        return answer

    def conversation_cli(self, job: Job) -> Tuple[Optional[Lease], Job]:
        """For a follow-up's first run: the pooled CLI holding its conversation, or — when it went
        meanwhile (evicted, expired, another request took it) — no CLI and the whole history."""
        followup, self.followup = self.followup, None
        held = self.services.runner.pool.claim(followup.conversation, self.request.owner) if followup else None
        if held is not None and held.proc.popen.poll() is not None:
            held.kill()
            held = None
        if followup is None or held is not None:
            return held, job
        fetch = fetch_image if self.services.config.allow_image_urls else None
        system, blocks = messages_to_input(self.request, self.services.config, self.services.secret, fetch)
        check_prompt_budget(prompt_chars(system, blocks), self.request, self.services.config)
        self.job = dataclasses.replace(job, system_prompt=system, blocks=blocks)
        return None, self.job

    def conversation_after(self, answer: Answer) -> str:
        """The tag its CLI is pooled under for the follow-up; "" when the conversation may not go
        on there (structured output is rewritten, legacy calls carry no ids, a cut answer)."""
        request = self.request
        if (request.response_format != "text" or request.legacy_functions or answer.finish() != "end_turn"
                or not self.services.runner.pool.enabled()):
            return ""
        history = self.history or history_digests(request.turns, 0)[1]
        return conversation_tag(request, history, answer.text)

    def _start(self, lease: Lease, job: Job, resume: Optional[Park]) -> Iterator[Tuple[str, Any]]:
        """Get the lease going; return the user turn to send (None: a parked CLI continues)."""
        if resume is None:
            for _ in lease.acquire():
                yield PING, None  # a streaming client hears from us while it waits in line
            return job.blocks
        lease.cancelled = lambda: self.cancelled  # this request's client now, not the one that parked it
        for _ in lease.resume():
            yield PING, None
        limit = self.services.config.tool_result_max_chars
        for turn in self.request.turns:
            for block in turn["content"]:
                if block["type"] == "tool_result" and block["id"] in resume.ids:
                    self.bridge.answer(block["id"], tool_result(block["content"], limit, block.get("is_error", False),
                                                                tuple(block.get("images", ()))))
        for call_id in resume.undelivered:
            self.bridge.answer(call_id, tool_result("Not run: one tool call at a time.", limit, True))
        return None

    def _end(self, lease: Lease, answer: Answer, ending: str) -> None:
        self._lease = None  # the run is over: a hang-up seen from now on must not reach a parked CLI
        if ending == "release":
            lease.keep(self.conversation_after(answer))
        elif ending == "kill" or self.request.legacy_functions:
            lease.kill(wait=False)  # (legacy function calls carry no ids to continue a CLI by)
        else:
            delivered = [c["id"] for c in self.delivered_calls(answer)]
            request, pool = self.request, self.services.runner.pool
            self.services.parks.put(Park(request.owner, self.job.priority, lease, self.bridge, tuple(delivered),
                                tuple(c["id"] for c in answer.tool_calls if c["id"] not in delivered),
                                canonical_hash(list(request.turns)), tool_shape(request),
                                self.services.parks.clock() + self.services.config.tool_park_ttl_ms / 1000),
                           *park_limits(self.services.config), pool.budget_mb())
            pool.fit()  # parked CLIs come first in the kept CLIs' budget: pooled ones make room

    def _feed(self, answer: Answer, event: Any) -> List[Tuple[str, Any]]:
        if event is HEARTBEAT:
            return [(PING, None)]
        side = CLI_EVENTS.get((event.get("type"), event.get("subtype")))
        if side is not None:
            return self._side_event(side, answer, event)
        deltas = answer.feed(event)
        if deltas and self.ttft_ms is None:
            self.ttft_ms = int((time.monotonic() - self.started) * 1000)
        kinds = {"content": TEXT, "reasoning": REASONING, "tool_call": TOOL_CALL, "tool_args": TOOL_ARGS}
        return [(kinds[kind], value) for kind, value in deltas]

    def _side_event(self, side: CliEvent, answer: Answer, event: Dict[str, Any]) -> List[Tuple[str, Any]]:
        """A CLI event beside the answer (CLI_EVENTS): counted, logged with its fields, acted on."""
        self.services.metrics.count("ocp_cli_events_total", side.name)
        fields = {name: event.get(name) for name in side.fields}
        log.log(side.level, "%s CLI %s %s", self.job.request_id, side.name, json.dumps(fields)[:300],
                extra={"request_id": self.job.request_id, "cli_event": side.name})
        return side.act(self, answer, event) if side.act else []

    def on_init(self, answer: Answer, event: Dict[str, Any]) -> List[Tuple[str, Any]]:
        if self.bridge:
            check_tool_server(event)
        return []

    def on_rate_limit(self, answer: Answer, event: Dict[str, Any]) -> List[Tuple[str, Any]]:
        """The plan's state as the CLI saw it: kept for a plan-limit error's reset, and told to the
        plan; a request paid from extra usage says so (PLAN)."""
        info = event.get("rate_limit_info")
        if not isinstance(info, dict):
            return []
        answer.rate_limits.append(info)
        if not self.services.plan.observe(info, self.services.clock()):
            return []
        self.overage = True
        log.warning("%s was paid from the subscription's extra usage", self.job.request_id)
        return [(PLAN, {"overage": True})]

    def _settle(self, answer: Answer) -> None:
        now = self.services.clock()
        answer.failure = answer.error(now)
        if answer.failure is not None and answer.failure.code == "claude_code_version_too_old":
            answer.failure = cli_too_old(self.request.model, self.services.runner.version())
        if answer.failure is not None and answer.failure.code == "usage_limit_reached":
            resets_at = plan_reset(answer.api_error or {}, answer.rate_limits) or int(now + 3600)
            self.services.plan.hold(resets_at, answer.failure.message,
                                    plan_scope(answer.api_error or {}, answer.rate_limits))


@dataclasses.dataclass(frozen=True)
class CliEvent:
    """A CLI event beside the answer's content: its name in /metrics (ocp_cli_events_total) and the
    log, the fields logged, the log level, and what the Turn does with it (None: counted, logged)."""

    name: str
    fields: Tuple[str, ...] = ()
    level: int = logging.DEBUG
    act: Optional[Callable[[Turn, Answer, Dict[str, Any]], List[Tuple[str, Any]]]] = None


CLI_EVENTS = {  # (type, subtype) -> CliEvent; every other line is the answer's (Answer.feed)
    ("system", "init"): CliEvent("init", ("model", "claude_code_version"), act=Turn.on_init),
    ("rate_limit_event", None): CliEvent("rate_limit", act=Turn.on_rate_limit),
    ("system", "api_retry"): CliEvent("api_retry", ("attempt", "max_retries", "error_status", "error"), logging.INFO),
    ("system", "model_fallback"): CliEvent("model_fallback", ("trigger", "original_model", "fallback_model"),
                                           logging.WARNING),
    ("system", "compact_boundary"): CliEvent("compaction", ("compact_metadata",), logging.WARNING),
}


###############################################################################
# Encoders ####################################################################
###############################################################################


class Encoder:
    """One response in one API's wire format, written from a turn's events.

    The route picks the class (bottle's ServerAdapter idea); `write(kind, value)`
    takes each event in order, DONE last. `settle(outcome)` — the accounting —
    runs just before the last bytes leave, so a client that asks at once sees
    its usage row. `error_body` is the API's error shape for every error of the
    route. `out` is the Handler: send_json, send_event_stream, wfile.
    """

    streaming = False
    id_prefix = "resp_"  # the API's id of a response: chatcmpl-…, msg_…, resp_…
    delivered = False  # some of the answer reached the client (a JSON body: all of it, or nothing)

    def __init__(self, out: Any, request: TurnRequest, created: int,
                 overage_hint: Callable[[], bool] = lambda: False):
        self.out, self.request, self.created = out, request, created
        self.overage_hint = overage_hint
        self.response_id = self.id_prefix + random_hex(12)
        self.settle: Callable[[Outcome], None] = lambda outcome: None
        self.keep_going: Callable[[], bool] = lambda: False  # others still want the run
        self.detached = False  # our client left while others share the run

    @staticmethod
    def error_body(error: ApiError, request_id: str = "") -> Dict[str, Any]:
        """This API's error JSON for `error` (OpenAI's shape here; a subclass may have its own)."""
        return error.body()

    def write(self, kind: str, value: Any) -> None:
        """Take one event of the turn, in order; DONE (with the Outcome) comes last."""
        raise NotImplementedError


class JSONBody(Encoder):
    """An answer in one JSON body: nothing until DONE, then `body(outcome)` — or the error."""

    def write(self, kind: str, value: Any) -> None:
        if kind != DONE:
            return
        outcome: Outcome = value
        if outcome.error is not None:
            raise outcome.error
        self.settle(outcome)
        self.out.send_json(200, self.body(outcome), {"x-ocp-plan-overage": "true"} if outcome.overage else None)

    def body(self, outcome: Outcome) -> Dict[str, Any]:
        raise NotImplementedError


class EventStream(Encoder):
    """The SSE plumbing every streaming encoder shares: headers on the first write,
    frames (with an optional `event:` name), a heartbeat, and leaving clients."""

    streaming = True
    heartbeat_frame = b": keepalive\n\n"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.started = False
        self.answer_frames = 0  # frames of the answer that reached the client (not the opening, not heartbeats)
        self._framing = 0  # > 0 while the opening or a heartbeat is written

    @property
    def delivered(self) -> bool:
        """Some of the answer reached the client: a hang-up now is billed as partial. Counted
        here, for every streaming encoder, as its frames leave."""
        return self.answer_frames > 0

    def start(self) -> None:
        """Send the headers and the opening frames, once, at the first write."""
        if not self.started:
            self.started = True
            if self.overage_hint():
                self.out.response_headers["x-ocp-plan-overage"] = "true"
            self.out.send_event_stream()
            self._framing += 1
            try:
                self.opening()
            finally:
                self._framing -= 1

    def opening(self) -> None:
        """The first frames of the stream (subclasses)."""

    def frame(self, data: Any, event: str = "") -> None:
        """One SSE event: `event: NAME` when named, then `data:` (JSON unless a string)."""
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self.raw((f"event: {event}\n" if event else "") + f"data: {payload}\n\n")

    def raw(self, text: Any) -> None:
        """Write to the client; one that left is ClientGone, unless others share the run."""
        if self.detached:
            if not self.keep_going():
                raise ClientGone()  # the others left too: the run is for nobody now
            return
        try:
            self.out.wfile.write(text if isinstance(text, bytes) else text.encode("utf-8"))
            self.out.wfile.flush()
            self.answer_frames += not self._framing
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            if not self.keep_going():
                raise ClientGone() from None
            self.detached = True

    def heartbeat(self) -> None:
        """Nothing new for a while: tell the client (and its proxies) we are still here."""
        self.start()
        self._framing += 1
        try:
            self.raw(self.heartbeat_frame)
        finally:
            self._framing -= 1

    def write(self, kind: str, value: Any) -> None:
        if kind == PING:
            self.heartbeat()
        elif kind == DONE:
            self.done(value)
        else:
            self.content(kind, value)

    def content(self, kind: str, value: Any) -> None:
        """One event of the answer itself (text, reasoning, a tool call's start or arguments)."""
        raise NotImplementedError

    def done(self, outcome: Outcome) -> None:
        """The end of the stream, or its in-band error (`fail`)."""
        raise NotImplementedError

    def fail(self, outcome: Outcome) -> None:
        """An error: a normal error response before the stream started, in-band after."""
        if not self.started:
            raise outcome.error
        self.settle(outcome)
        self.error_frames(outcome.error)

    def error_frames(self, error: ApiError) -> None:
        """The in-band error of a stream that had started (subclasses may name it)."""
        self.frame(self.error_body(error, self.out.request_id))


# -- OpenAI chat completions ---------------------------------------------------------------

OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                 "tool_use": "tool_calls", "refusal": "content_filter"}


def openai_usage(usage: Usage) -> Dict[str, Any]:
    return {"prompt_tokens": usage.prompt, "completion_tokens": usage.output,
            "total_tokens": usage.prompt + usage.output,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read}}


def chat_completion(completion_id: str, created: int, model: str, outcome: Outcome,
                    legacy: bool = False) -> Dict[str, Any]:
    message: Dict[str, Any] = {"role": "assistant", "content": outcome.content, "refusal": outcome.refusal}
    if outcome.reasoning:
        message["reasoning_content"] = outcome.reasoning
    if outcome.tool_calls and legacy:
        message["content"] = outcome.content or None
        message["function_call"] = {"name": outcome.tool_calls[0]["name"], "arguments": outcome.tool_calls[0]["arguments"]}
    elif outcome.tool_calls:
        message["content"] = outcome.content or None
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for c in outcome.tool_calls]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": openai_finish(outcome.finish, legacy)}],
            "usage": openai_usage(outcome.usage), "system_fingerprint": None}


def openai_finish(finish: str, legacy: bool = False) -> str:
    return "function_call" if legacy and finish == "tool_use" else OPENAI_FINISH[finish]


def chat_chunk(completion_id: str, created: int, model: str, delta: Dict[str, Any],
               finish_reason: Optional[str] = None, include_usage: bool = False) -> Dict[str, Any]:
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
             "model": model, "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(completion_id: str, created: int, model: str, usage: Usage) -> Dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None, "choices": [], "usage": openai_usage(usage)}


class ChatJSON(JSONBody):
    """OpenAI chat completions, one JSON body."""

    id_prefix = "chatcmpl-"

    def body(self, outcome: Outcome) -> Dict[str, Any]:
        return chat_completion(self.response_id, self.created, self.request.model.id, outcome,
                               self.request.legacy_functions)


class ChatSSE(EventStream):
    """OpenAI chat completions, streamed: chunks, `: keepalive` comments, `data: [DONE]`."""

    DELTA_FIELDS = {TEXT: "content", REASONING: "reasoning_content", REFUSAL: "refusal"}
    id_prefix = "chatcmpl-"

    def opening(self) -> None:
        self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: Dict[str, Any], finish: Optional[str] = None) -> None:
        """One chat.completion.chunk with this delta."""
        self.frame(chat_chunk(self.response_id, self.created, self.request.model.id, delta, finish,
                              self.request.include_usage))

    def content(self, kind: str, value: Any) -> None:
        if kind in self.DELTA_FIELDS:
            self.start()
            self.chunk({self.DELTA_FIELDS[kind]: value})
        elif kind == TOOL_CALL and self.request.legacy_functions:
            self.start()
            self.chunk({"function_call": {"name": value["name"], "arguments": ""}})
        elif kind == TOOL_CALL:  # index and id first, then the arguments as they come
            self.start()
            self.chunk({"tool_calls": [{"index": value["index"], "id": value["id"], "type": "function",
                                        "function": {"name": value["name"], "arguments": ""}}]})
        elif kind == TOOL_ARGS and self.request.legacy_functions:
            self.chunk({"function_call": {"arguments": value["arguments"]}})
        elif kind == TOOL_ARGS:
            self.chunk({"tool_calls": [{"index": value["index"], "function": {"arguments": value["arguments"]}}]})

    def done(self, outcome: Outcome) -> None:
        """The finish chunk, the usage chunk when asked, then `[DONE]` (or the error in-band)."""
        if outcome.error is not None:
            self.fail(outcome)
        else:
            self.start()
            if outcome.overage and "x-ocp-plan-overage" not in self.out.response_headers:
                self.raw(b": x-ocp-plan-overage: true\n\n")  # learnt after the headers left
            self.chunk({}, openai_finish(outcome.finish, self.request.legacy_functions))
            if self.request.include_usage:
                self.frame(usage_chunk(self.response_id, self.created, self.request.model.id, outcome.usage))
            self.settle(outcome)
        self.frame("[DONE]")


# -- Anthropic messages ----------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                         413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error(error: ApiError, request_id: str = "") -> Dict[str, Any]:
    """Anthropic's error envelope (AGENTS-SPEC §3.4): its type follows the status."""
    kind = ANTHROPIC_ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}, "request_id": request_id}


def anthropic_usage(usage: Usage) -> Dict[str, int]:
    return {"input_tokens": usage.input, "output_tokens": usage.output,
            "cache_read_input_tokens": usage.cache_read, "cache_creation_input_tokens": usage.cache_write}


def anthropic_message(message_id: str, model: str, outcome: Outcome, thinking: bool) -> Dict[str, Any]:
    content: List[Dict[str, Any]] = []
    if thinking and outcome.reasoning:
        content.append({"type": "thinking", "thinking": outcome.reasoning, "signature": ""})
    if outcome.content:
        content.append({"type": "text", "text": outcome.content})
    for call in outcome.tool_calls:
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except ValueError:
            arguments = {}
        content.append({"type": "tool_use", "id": call["id"], "name": call["name"], "input": arguments})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": outcome.finish, "stop_sequence": outcome.stop_sequence or None,
            "usage": anthropic_usage(outcome.usage)}


class MessagesJSON(JSONBody):
    """Anthropic messages, one JSON body."""

    error_body = staticmethod(anthropic_error)
    id_prefix = "msg_"

    def body(self, outcome: Outcome) -> Dict[str, Any]:
        return anthropic_message(self.response_id, self.request.model.id, outcome, self.request.show_reasoning)


class MessagesSSE(EventStream):
    """Anthropic messages, streamed: message_start, content blocks (text, thinking when asked,
    tool_use) numbered from 0, one message_delta and message_stop; `event: ping` heartbeats."""

    heartbeat_frame = b'event: ping\ndata: {"type": "ping"}\n\n'
    error_body = staticmethod(anthropic_error)
    id_prefix = "msg_"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.index = -1
        self.open = ""  # the open block's type
        self.call_blocks: Dict[int, int] = {}  # tool call index -> block index

    def opening(self) -> None:
        self.event({"type": "message_start", "message": {
            "id": self.response_id, "type": "message", "role": "assistant", "model": self.request.model.id,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": anthropic_usage(Usage())}})

    def event(self, data: Dict[str, Any]) -> None:
        self.frame(data, data["type"])

    def block(self, kind: str, start: Dict[str, Any]) -> None:
        """Open a block of `kind` unless one is open (a tool_use always opens its own)."""
        self.start()
        if self.open == kind and kind != "tool_use":
            return
        self.close_block()
        self.index += 1
        self.open = kind
        self.event({"type": "content_block_start", "index": self.index, "content_block": start})

    def close_block(self) -> None:
        if self.open:
            self.event({"type": "content_block_stop", "index": self.index})
            self.open = ""

    def content(self, kind: str, value: Any) -> None:
        if kind == TEXT:
            self.block("text", {"type": "text", "text": ""})
            self.event({"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": value}})
        elif kind == REASONING and self.request.show_reasoning:
            self.block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.event({"type": "content_block_delta", "index": self.index,
                        "delta": {"type": "thinking_delta", "thinking": value}})
        elif kind == TOOL_CALL:
            self.block("tool_use", {"type": "tool_use", "id": value["id"], "name": value["name"], "input": {}})
            self.call_blocks[value["index"]] = self.index
        elif kind == TOOL_ARGS:
            self.event({"type": "content_block_delta", "index": self.call_blocks.get(value["index"], self.index),
                        "delta": {"type": "input_json_delta", "partial_json": value["arguments"]}})

    def done(self, outcome: Outcome) -> None:
        """Close the open block, then one message_delta (stop reason, usage) and message_stop."""
        if outcome.error is not None:
            return self.fail(outcome)
        self.start()
        self.close_block()
        self.event({"type": "message_delta", "delta": {"stop_reason": outcome.finish,
                                                       "stop_sequence": outcome.stop_sequence or None},
                    "usage": anthropic_usage(outcome.usage)})
        self.settle(outcome)
        self.event({"type": "message_stop"})

    def error_frames(self, error: ApiError) -> None:
        self.frame(self.error_body(error, self.out.request_id), "error")


# -- OpenAI responses -------------------------------------------------------------------------


def responses_usage(usage: Usage) -> Dict[str, Any]:
    return {"input_tokens": usage.prompt, "input_tokens_details": {"cached_tokens": usage.cache_read},
            "output_tokens": usage.output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt + usage.output}


def responses_items(outcome: Outcome, ids: Dict[str, str], reasoning: bool) -> List[Dict[str, Any]]:
    """The output items of a finished response: reasoning (when asked), the message, the calls."""
    items: List[Dict[str, Any]] = []
    if reasoning:
        summary = [{"type": "summary_text", "text": outcome.reasoning}] if outcome.reasoning else []
        items.append({"type": "reasoning", "id": ids.setdefault("reasoning", "rs_" + random_hex(12)),
                      "summary": summary})
    if outcome.content:
        items.append({"type": "message", "id": ids.setdefault("message", "msg_" + random_hex(12)),
                      "role": "assistant", "status": "completed",
                      "content": [{"type": "output_text", "text": outcome.content, "annotations": []}]})
    for call in outcome.tool_calls:
        items.append({"type": "function_call", "id": ids.setdefault(call["id"], "fc_" + random_hex(12)),
                      "call_id": call["id"], "name": call["name"], "arguments": call["arguments"],
                      "status": "completed"})
    return items


class ResponsesJSON(JSONBody):
    """OpenAI responses, one JSON body (the response object)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ids: Dict[str, str] = {}

    def response(self, status: str, outcome: Optional[Outcome] = None) -> Dict[str, Any]:
        body: Dict[str, Any] = {"id": self.response_id, "object": "response", "created_at": self.created,
                                "model": self.request.model.id, "status": status, "output": [], "usage": None}
        if outcome is not None:
            body["output"] = responses_items(outcome, self.ids, self.request.show_reasoning)
            body["usage"] = responses_usage(outcome.usage)
            if outcome.finish == "max_tokens":
                body.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        return body

    def body(self, outcome: Outcome) -> Dict[str, Any]:
        return self.response("completed", outcome)


class ResponsesSSE(EventStream, ResponsesJSON):
    """OpenAI responses, streamed (AGENTS-SPEC §2.2): named events with a sequence_number, the
    items opened and closed as Codex and the SDK helpers need, `response.in_progress` as the
    heartbeat, `response.failed` for an error, no [DONE]."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sequence = 0
        self.items: List[Dict[str, Any]] = []  # open and closed output items, in order
        self.call_items: Dict[int, int] = {}  # tool call index -> its output index
        self.texts: Dict[int, str] = {}  # output index -> text so far

    def event(self, data: Dict[str, Any]) -> None:
        data["sequence_number"] = self.sequence
        self.sequence += 1
        self.frame(data, data["type"])

    def opening(self) -> None:
        self.event({"type": "response.created", "response": self.response("in_progress")})
        self.event({"type": "response.in_progress", "response": self.response("in_progress")})

    def heartbeat(self) -> None:
        self.start()
        self.event({"type": "response.in_progress", "response": self.response("in_progress")})

    def item(self, kind: str) -> int:
        """The open output item of `kind` (a new one for each call); returns its index."""
        self.start()
        if self.items and self.items[-1]["type"] == kind and kind != "function_call" and not self.items[-1].get("done"):
            return len(self.items) - 1
        self.close_item()
        return -1

    def close_item(self) -> None:
        if self.items and not self.items[-1].get("done"):
            index, item = len(self.items) - 1, self.items[-1]
            item["done"] = True
            text = self.texts.get(index, "")
            if item["type"] == "message":
                part = {"type": "output_text", "text": text, "annotations": []}
                self.event({"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                            "content_index": 0, "text": text})
                self.event({"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                            "content_index": 0, "part": part})
                done = {"type": "message", "id": item["id"], "role": "assistant", "status": "completed", "content": [part]}
            elif item["type"] == "reasoning":
                done = {"type": "reasoning", "id": item["id"],
                        "summary": [{"type": "summary_text", "text": text}] if text else []}
            else:
                self.event({"type": "response.function_call_arguments.done", "item_id": item["id"],
                            "output_index": index, "arguments": text})
                done = dict(item["item"], arguments=text, status="completed")
            self.event({"type": "response.output_item.done", "output_index": index, "item": done})

    def open_item(self, item: Dict[str, Any]) -> int:
        self.items.append({"type": item["type"], "id": item["id"], "item": item})
        index = len(self.items) - 1
        self.event({"type": "response.output_item.added", "output_index": index, "item": item})
        return index

    def content(self, kind: str, value: Any) -> None:
        if kind == TEXT:
            index = self.item("message")
            if index < 0:
                index = self.open_item({"type": "message", "id": self.ids.setdefault("message", "msg_" + random_hex(12)),
                                        "role": "assistant", "status": "in_progress", "content": []})
                self.event({"type": "response.content_part.added", "item_id": self.items[index]["id"],
                            "output_index": index, "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []}})
            self.texts[index] = self.texts.get(index, "") + value
            self.event({"type": "response.output_text.delta", "item_id": self.items[index]["id"], "output_index": index,
                        "content_index": 0, "delta": value})
        elif kind == REASONING and self.request.show_reasoning:
            index = self.item("reasoning")
            if index < 0:
                index = self.open_item({"type": "reasoning", "id": self.ids.setdefault("reasoning", "rs_" + random_hex(12)),
                                        "summary": []})
                self.event({"type": "response.reasoning_summary_part.added", "item_id": self.items[index]["id"],
                            "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})
            self.texts[index] = self.texts.get(index, "") + value
            self.event({"type": "response.reasoning_summary_text.delta", "item_id": self.items[index]["id"],
                        "output_index": index, "summary_index": 0, "delta": value})
        elif kind == TOOL_CALL:
            self.item("function_call")
            self.call_items[value["index"]] = self.open_item({
                "type": "function_call", "id": self.ids.setdefault(value["id"], "fc_" + random_hex(12)),
                "call_id": value["id"], "name": value["name"], "arguments": "", "status": "in_progress"})
        elif kind == TOOL_ARGS and value["index"] in self.call_items:
            index = self.call_items[value["index"]]
            self.texts[index] = self.texts.get(index, "") + value["arguments"]
            self.event({"type": "response.function_call_arguments.delta", "item_id": self.items[index]["id"],
                        "output_index": index, "delta": value["arguments"]})

    def done(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            return self.fail(outcome)
        self.start()
        self.close_item()
        body = self.response("completed", outcome)
        self.settle(outcome)
        self.event({"type": "response.incomplete" if body["status"] == "incomplete" else "response.completed",
                    "response": body})

    def error_frames(self, error: ApiError) -> None:
        code = {429: "insufficient_quota" if error.code in ("usage_limit_reached", "quota_exceeded") else
                "rate_limit_exceeded"}.get(error.status, error.code if error.code == "context_length_exceeded" else "server_error")
        body = self.response("failed")
        body["error"] = {"code": code, "message": error.message}
        self.event({"type": "response.failed", "response": body})


###############################################################################
# Accounting ##################################################################
###############################################################################


def log_exchange(request_id: str, job: Job, status: str, outcome: Optional[Outcome]) -> None:
    """Only with OCP_LOG_PROMPTS=1: the operator asked to see what was said."""
    prompt = "\n".join(b.get("text", "[image]") for b in job.blocks)
    log.info("%s exchange", request_id, extra={
        "request_id": request_id, "status": status, "system": job.system_prompt, "prompt": prompt,
        "answer": outcome.content if outcome is not None else None})


def shared_cancelled() -> ApiError:
    return ApiError(503, "The request this one shared ended without an answer; retry.", "proxy_error",
                    "shared_request_cancelled", headers={"Retry-After": "1"})


class Ticket:
    """One admitted request: its quota reservation and usage row, recorded once however it ends.

    `settle_outcome` (the encoder's hook, just before the last bytes) or the
    exit of the `with` block records ok, partial, error (with its status) or
    cancelled; error and cancelled rows release the reservation. A ticket that
    leads a shared run publishes its answer to the followers and the cache first.
    """

    def __init__(self, ledger: "Ledger", caller: Caller, model_id: str, request_id: str,
                 encoder: Encoder, row: int, headers: Dict[str, str]):
        self.ledger, self.caller, self.model_id, self.request_id = ledger, caller, model_id, request_id
        self.encoder, self.row, self.headers = encoder, row, headers
        self.started = time.monotonic()
        self.turn: Optional[Turn] = None  # the run, for usage and timings when no outcome came
        self.job: Optional[Job] = None  # what was asked, for OCP_LOG_PROMPTS
        self.outcome: Optional[Outcome] = None
        self.flight: Optional[Tuple[str, Flight]] = None  # (cache key, flight) when leading a shared run
        self.settled = False
        encoder.settle = self.settle_outcome

    def __enter__(self) -> "Ticket":
        return self

    def settle_outcome(self, outcome: Outcome) -> None:
        """The encoder's hook, just before the last bytes: ok (or partial/error) with this outcome."""
        self.outcome = outcome
        if outcome.error is not None:
            self.settle("error", outcome.error.status, outcome.error)
        else:
            self.settle(*(self.left_early() if self.encoder.detached else ("ok", 200)))

    def left_early(self) -> Tuple[str, int]:
        """A client that left after part of its answer reached it has used the request: only one
        that got nothing gives its quota back."""
        return ("partial", 499) if self.encoder.delivered else ("cancelled", 499)

    def settle(self, status: str, code: int, error: Optional[ApiError] = None) -> None:
        """Record how the request ended, once: the flight and cache first (a client that repeats
        the question at once gets a hit), then the row and the metrics."""
        if self.settled:
            return
        self.settled = True
        answered = self.outcome if self.outcome is not None and self.outcome.error is None else None
        self.publish(answered, error or (None if answered else shared_cancelled()))
        usage = self.usage()
        counted = usage if status in ("ok", "partial") else Usage(cost_usd=usage.cost_usd)
        ttft_ms = self.outcome.ttft_ms if self.outcome is not None else (self.turn and self.turn.ttft_ms)
        self.ledger.record_row(self, status, code, error, counted, ttft_ms)

    def usage(self) -> Usage:
        """The outcome's usage, else what the run reported before it was cut short."""
        if self.outcome is not None:
            return self.outcome.usage
        return self.turn.usage_so_far() if self.turn is not None else Usage()

    def publish(self, outcome: Optional[Outcome], error: Optional[ApiError]) -> None:
        """Leading a shared run: hand the answer (or the error) to the followers, keep it if good."""
        if self.flight is None:
            return
        key, flight = self.flight
        self.flight = None
        if outcome is not None and outcome.cacheable():
            self.ledger.keep(key, self.caller, self.model_id, outcome)
        self.ledger.server.flights.land(key, flight, outcome, None if outcome is not None else error)

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if error is None:
            status, code = ("ok", 200) if not self.encoder.detached else self.left_early()
        elif isinstance(error, ApiError):
            status, code = "error", error.status
        elif isinstance(error, (ClientGone, BrokenPipeError, ConnectionResetError, socket.timeout)):
            status, code = self.left_early()
        else:
            status, code = "error", 500
        self.settle(status, code, error if isinstance(error, ApiError) else None)


class Ledger:
    """Accounting in one place, for every route and every way a request ends: admission
    (quota reservation), refusals, cache hits, the usage row, metrics, health evidence
    and the response cache."""

    def __init__(self, server: Any):
        self.server = server  # its store, metrics, flights, config and clock

    def admit(self, caller: Caller, model_id: str, request_id: str, encoder: Encoder,
              floor_tokens: int = 0) -> Ticket:
        """Reserve the caller's quota for one request (429 over it, or over the plan's reserve for
        its priority); the ticket records the end. `floor_tokens`: the least the request will use."""
        server, config = self.server, self.server.config
        now = server.wall()
        server.plan.check_reserve(caller.priority, {300: config.reserve_5h, WEEK_MINUTES: config.reserve_7d}, now,
                                  model_id)
        bounds = period_bounds(now, config.tzinfo)
        try:
            row, counts = server.store.reserve(caller.key, caller.name, model_id, request_id, now, bounds,
                                               floor_tokens)
        except QuotaExceeded as e:
            breach = e.breach
            server.alerts.raise_once(("quota", caller.label, breach["period"], breach["unit"], breach["resets_at"]),
                                     "quota", f"The key {caller.label} reached its {breach['unit']} quota "
                                     f"{PERIOD_WORDS[breach['period']]} ({breach['used']}/{breach['limit']}).",
                                     key=caller.label, **{k: breach[k] for k in ("period", "unit", "limit", "resets_at")})
            raise quota_error(breach, now) from None
        headers = ratelimit_headers(caller.key, counts, bounds, now)
        headers.update(plan_share_headers(server.plan.share_report(now), caller.label))
        return Ticket(self, caller, model_id, request_id, encoder, row, headers)

    def refused(self, caller: Caller, model_id: str, request_id: str, status: int) -> None:
        """A known caller turned away before admission: a row that counts against nothing."""
        self.server.store.record_refusal(caller.key, caller.name, model_id, request_id, status, self.server.wall())

    def lookup(self, key: str) -> Optional[Outcome]:
        """A cached answer for this cache key, or None (both counted)."""
        server = self.server
        outcome = Outcome.from_cache(server.store.cache_get(key, server.wall()) or {})
        server.flights.count("hits" if outcome else "misses")
        return outcome

    def cached(self, caller: Caller, model_id: str, request_id: str, outcome: Outcome, started: float) -> None:
        """A cache hit: logged, free of quota."""
        server = self.server
        duration_s = time.monotonic() - started
        server.store.record_cached(caller.key, caller.name, model_id, request_id, outcome.usage,
                                   int(duration_s * 1000), server.wall())
        server.metrics.record("cached", model_id, caller.name, duration_s, None)

    def keep(self, key: str, caller: Caller, model_id: str, outcome: Outcome) -> None:
        """Store a good answer in the response cache (bounded, LRU, with its TTL)."""
        server, config = self.server, self.server.config
        owner = str(caller.key.id) if caller.key else caller.name
        server.store.cache_put(key, owner, model_id, outcome.to_cache(), server.wall(), config.cache_ttl_ms / 1000,
                               config.cache_max_entries, config.cache_max_bytes)

    def record_row(self, ticket: Ticket, status: str, code: int, error: Optional[ApiError], usage: Usage,
                   ttft_ms: Optional[int]) -> None:
        """The usage row, health evidence, metrics and (if asked) the exchange in the log."""
        server = self.server
        duration_s = time.monotonic() - ticket.started
        server.store.finish(ticket.row, status, code, usage, ttft_ms, int(duration_s * 1000))
        server.record_outcome(status, error)
        server.metrics.record(status, ticket.model_id, ticket.caller.name, duration_s,
                              ttft_ms / 1000 if ttft_ms is not None else None)
        if status in ("ok", "partial"):
            server.metrics.count_tokens(ticket.model_id, ticket.caller.name, usage)
            server.plan.spent(ticket.caller.label, usage.cost_usd or list_price(ticket.model_id, usage),
                              ticket.outcome is not None and ticket.outcome.overage, ticket.model_id)
        if server.config.log_prompts and ticket.job is not None:
            log_exchange(ticket.request_id, ticket.job, status, ticket.outcome)


###############################################################################
# Routes ######################################################################
###############################################################################

# -- model routes: one recipe for every wire format -----------------------------------------


@dataclasses.dataclass(frozen=True)
class TurnRoute:
    """A model route: the wire format's parser and its two encoders (JSON, SSE)."""

    parse: Callable[[Any, Models, Config], TurnRequest]
    json: type
    sse: type
    request_id_header: str = ""  # the API's own name for OCP's request id (Anthropic: request-id)
    refused_model_status: int = 403  # a model the key may not use (Anthropic clients: 404)
    plan_headers: Optional[Callable[[Dict[str, Any], float], Dict[str, str]]] = None  # the plan's use, its way
    api: str = "openai"  # whose API it is: how a wall is answered (wall_for)

    def encoder(self, request: TurnRequest) -> type:
        """The encoder class for this request: SSE when it asked to stream."""
        return self.sse if request.stream else self.json


TURN_ROUTES = {"/v1/chat/completions": TurnRoute(parse_chat_request, ChatJSON, ChatSSE),
               "/v1/responses": TurnRoute(parse_responses_request, ResponsesJSON, ResponsesSSE,
                                          plan_headers=codex_headers, api="responses"),
               "/v1/messages": TurnRoute(parse_messages_request, MessagesJSON, MessagesSSE, "request-id", 404,
                                         unified_headers, "anthropic")}
ANTHROPIC_ROUTES = ("/v1/messages/count_tokens", "/api/hello")  # their errors in Anthropic's shape


def play(events: Iterator[Tuple[str, Any]], encoder: Encoder) -> None:
    for kind, value in events:
        encoder.write(kind, value)


def replayed(outcome: Outcome) -> Outcome:
    """Someone else's answer for this request: its own timings, no overage notice."""
    return dataclasses.replace(outcome, ttft_ms=None, overage=False, error=None)


def hung_up(flights: Flights, ticket: Ticket, turn: Turn) -> None:
    """The request's client left (Hangups' thread): end the turn, unless it leads a run that
    others still want — then it goes on for them, and the last to leave ends it."""
    if ticket.flight is not None and flights.leader_left(ticket.flight[1]):
        return
    turn.cancel("client")


def await_flight(turn: Turn, flight: Flight, config: Config) -> Iterator[Tuple[str, Any]]:
    """Wait for the shared run's answer (PING meanwhile); its error, 504 at the timeout, ClientGone."""
    deadline = time.monotonic() + config.timeout_ms / 1000
    beat = config.heartbeat_ms / 1000
    next_beat = time.monotonic() + beat
    while not flight.done.wait(0.1):
        now = time.monotonic()
        if turn.cancelled:
            raise ClientGone()
        if now >= deadline:
            raise timeout_error()
        if beat and now >= next_beat:
            yield PING, None
            next_beat = now + beat
    if flight.error is not None:
        raise flight.error
    if flight.answer is None:
        raise shared_cancelled()
    return flight.answer


def shared_events(h: Any, ticket: Ticket, turn: Turn, key: str) -> Iterator[Tuple[str, Any]]:
    """Lead the CLI run for identical concurrent requests, or follow one and replay its answer."""
    flights = h.server.flights
    flight, leader = flights.join(key)
    if leader:
        ticket.flight = (key, flight)
        flight.cancel = lambda: turn.cancel("client")
        ticket.encoder.keep_going = lambda: flights.wanted(flight)
        return (yield from turn.events())
    ticket.turn = None
    try:
        outcome = yield from await_flight(turn, flight, h.server.config)
    except ApiError as error:
        yield DONE, Outcome(error=error)
        return
    finally:
        flights.leave(flight)
    h.response_headers["x-ocp-cache"] = "shared"
    yield from outcome_events(replayed(outcome))


def check_model_for(caller: Caller, model: Model, status: int) -> None:
    """The key's model allowlist, refused with the route's status (Anthropic's clients: 404)."""
    try:
        check_model_allowed(caller, model)
    except ApiError as e:
        if status == e.status:
            raise
        raise ApiError(status, e.message, "not_found_error", e.code, "model", wall=True) from None


def turn_input(request: TurnRequest, caller: Caller, request_id: str,
               services: TurnServices) -> Tuple[Job, Optional[Followup], int]:
    """The CLI's job for a request: only the new turns when a pooled CLI holds its conversation,
    else the whole history; with the follow-up found and the prompt's size (checked)."""
    config, pool = services.config, services.runner.pool
    fetch = fetch_image if config.allow_image_urls else None
    followup = conversation_followup(request) if pool.enabled() else None
    if followup is not None and pool.holds(followup.conversation, request.owner):
        system, blocks = "", tuple(drop_empty_text(user_blocks(followup.new, config, fetch)))
        size = conversation_chars(request)
    else:
        followup = None
        system, blocks = messages_to_input(request, config, services.secret, fetch)
        size = prompt_chars(system, blocks)
    check_prompt_budget(size, request, config)
    tools = request.tools if request.tool_choice != "none" else ()
    job = Job(request.model.id, system, blocks, request.effort, request.max_tokens, request_id, caller.name, tools,
              request.owner, caller.priority)
    return job, followup, size


def answer_turn(h: Any, route: TurnRoute) -> None:
    """The recipe of every model route: parse → check → cache → admit → run → encode."""
    server, caller, started, services = h.server, h.caller, time.monotonic(), h.server.services
    request = route.parse(h.read_json(), server.models, services.config)
    h.refused_model = request.model.id
    check_model_for(caller, request.model, route.refused_model_status)
    if request.model.min_cli and not cli_fits(request.model, services.runner.version()):  # (--version runs once)
        raise cli_too_old(request.model, services.runner.version())
    request = dataclasses.replace(request, owner=str(caller.key.id) if caller.key else caller.name)
    job, followup, size = turn_input(request, caller, h.request_id, services)
    if request.user:
        log.info("%s user=%s model=%s", h.request_id, request.user[:64], request.model.id)
    if request.tools_ignored:
        h.response_headers["x-ocp-tools-ignored"] = "true"
    encoder = route.encoder(request)(h, request, int(server.wall()), lambda: server.plan.in_overage(server.wall()))
    key = cache_key(request) if services.config.cache_ttl_ms and not request.no_cache else ""
    hit = server.ledger.lookup(key) if key else None
    if hit is not None:
        server.ledger.cached(caller, request.model.id, h.request_id, hit, started)
        h.response_headers["x-ocp-cache"] = "hit"
        return play(outcome_events(replayed(hit)), encoder)
    if route.plan_headers and services.config.plan_headers:  # on answers and refusals: the client shows the plan
        h.response_headers.update(route.plan_headers(server.plan.snapshot(), server.wall()))
    with server.ledger.admit(caller, request.model.id, h.request_id, encoder,
                             size // CHARS_PER_TOKEN + request.max_tokens) as ticket:
        h.admitted = True
        h.response_headers.update(ticket.headers)
        server.plan.check(server.wall(), services.config.plan_only, request.model.id,
                          lambda: [m.id for m in server.models.models if model_allowed(caller, m)])
        resume = tool_followup(request, server.parks) if job.tools else None
        server.parks.end_abandoned(request)
        turn = ticket.turn = Turn(request, job, services, resume, followup)
        ticket.job = job
        if key:
            h.response_headers["x-ocp-cache"] = "miss"
        events = shared_events(h, ticket, turn, key) if key else turn.events()
        with server.hangups.watch(h.connection, lambda: hung_up(server.flights, ticket, turn)):
            play(events, encoder)


# -- models, keys, quotas, usage ---------------------------------------------------------


def handle_health(h: Handler) -> None:
    """200 while OCP can serve (ok or degraded), 503 when it cannot: monitors read the status."""
    body = h.server.health(admin=h.caller.admin)
    h.send_json(503 if body["status"] == "down" else 200, body)


def handle_models(h: Handler) -> None:
    """The models this caller may use: a key with an allowlist sees only those. Asked with
    `anthropic-version` (Claude Code), each entry also has Anthropic's fields. The bytes are made
    once per allowlist and kind (the list is fixed while OCP runs)."""
    allowed = h.caller.key.models if h.caller.key else None
    anthropic = bool(h.headers.get("anthropic-version"))
    cache = h.server.models_bodies
    data = cache.get((allowed, anthropic))
    if data is None:
        data = json.dumps(models_body(h.server.models, h.caller, anthropic, h.server.started_at),
                          ensure_ascii=False).encode("utf-8")
        if len(cache) < 256:
            cache[(allowed, anthropic)] = data
    h.send_body(200, data, "application/json")


def models_body(models: Models, caller: Caller, anthropic: bool, started_at: float) -> Dict[str, Any]:
    entries = [model_object(m) for m in models.models if model_allowed(caller, m)]
    body: Dict[str, Any] = {"object": "list", "data": entries}
    if anthropic:
        created = datetime.datetime.fromtimestamp(started_at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for entry in entries:
            entry.update(type="model", display_name=entry["id"], created_at=created)
        body.update(has_more=False, first_id=entries[0]["id"] if entries else None,
                    last_id=entries[-1]["id"] if entries else None)
    return body


def handle_count_tokens(h: Handler) -> None:
    """Anthropic's count_tokens: a local estimate biased up (no CLI runs): a third of the
    characters of the system, messages and tools, 1,600 per image (AGENTS-SPEC §3.5)."""
    body = h.read_json()
    request = parse_messages_request(dict(body, max_tokens=0) if isinstance(body, dict) else body,
                                     h.server.models, h.server.config)
    check_model_for(h.caller, request.model, TURN_ROUTES["/v1/messages"].refused_model_status)
    images = sum(1 for t in request.turns for b in t["content"] if b["type"] == "image")
    text = json.dumps([request.system, [[b for b in t["content"] if b["type"] != "image"] for t in request.turns],
                       request.tools], ensure_ascii=False)
    h.send_json(200, {"input_tokens": -(-len(text) // 3) + 1600 * images})


def handle_hello(h: Handler) -> None:
    """Claude Code's reachability check: 200, nothing else."""
    h.send_body(200, b"", "text/plain")


def handle_model(h: Handler, name: str) -> None:
    model = h.server.models.find(urllib.parse.unquote(name))
    if model is None:
        raise ApiError(404, f"The model {name[:100]!r} does not exist.", code="model_not_found",
                       param="model")
    h.send_json(200, model_object(model))


def handle_keys_list(h: Handler) -> None:
    h.send_json(200, {"object": "list", "data": [k.public(h.server.wall()) for k in h.server.store.keys()]})


def handle_keys_add(h: Handler) -> None:
    body = h.read_json()
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object with a 'name'", None, "invalid_json")
    name = check_key_name(body.get("name"))
    policy = KeyPolicy().updated(body, h.server.models, h.server.wall())
    key, secret = h.server.store.add_key(name, policy, h.server.wall())
    h.audit("key.add", name, json.dumps(policy.as_json()))
    h.send_json(201, dict(key.public(h.server.wall()), key=secret))


def handle_key_revoke(h: Handler, ref: str) -> None:
    key = h.server.store.find_key(ref)
    revoked = h.server.store.revoke_key(key, h.server.wall())
    h.audit("key.revoke", key.name, "")
    h.send_json(200, dict(h.server.store.find_key(str(key.id)).public(h.server.wall()), revoked=revoked))


def handle_quota_get(h: Handler, ref: str) -> None:
    h.send_json(200, quota_report(h.server.store, h.server.store.find_key(ref),
                                  h.server.wall(), h.server.config.tzinfo))


def handle_quota_set(h: Handler, ref: str) -> None:
    key = h.server.store.find_key(ref)
    body = h.read_json()
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object of quota fields", None, "invalid_json")
    key = h.server.store.set_policy(key, key.policy.updated(body, h.server.models, h.server.wall()))
    h.audit("key.quota", key.name, json.dumps(body, sort_keys=True))
    h.send_json(200, quota_report(h.server.store, key, h.server.wall(), h.server.config.tzinfo))


def handle_usage(h: Handler) -> None:
    query = urllib.parse.parse_qs(h.path.partition("?")[2])
    since, until, limit, everyone = parse_usage_query(query, h.server.wall())
    caller = h.caller
    if everyone:
        require_admin(caller)
        h.audit("usage.all", "*", h.path.partition("?")[2][:200])
    rows = h.server.store.usage_rows(None if everyone else (caller.key.id if caller.key else None),
                                     None if everyone else caller.name, since, until, limit)
    share = key_share(h.server.plan.share_report(h.server.wall()), None if everyone else caller.label)
    h.send_json(200, {"object": "list", "since": since, "until": until, "data": rows, "plan_share": share})


def handle_plan_usage(h: Handler) -> None:
    """Plan windows, the proxy's counters and per-model stats (admin)."""
    server = h.server
    query = urllib.parse.parse_qs(h.path.partition("?")[2])
    hours = (query.get("hours") or ["24"])[-1]
    if not (digits(hours) and 1 <= int(hours) <= 24 * 366):
        raise bad_request("'hours' must be a whole number from 1 to 8784", "hours")
    since = int(server.wall()) - int(hours) * 3600
    h.send_json(200, {"plan": plan_report(server.plan, server.wall(), tz=server.config.tzinfo),
                      "proxy": {"since": int(server.started_at),
                                "requests": server.store.status_counts(int(server.started_at)),
                                "cache": server.flights.snapshot()},
                      "models": {"since": since, "data": server.store.model_stats(since)}})


def handle_status(h: Handler) -> None:
    server = h.server
    h.send_json(200, {"health": server.health(admin=True),
                      "requests": dict(server.metrics.counts_by_status(), **server.runner.slots.snapshot()),
                      "cache": server.flights.snapshot(), "plan": plan_report(server.plan, server.wall(), tz=server.config.tzinfo)})


def handle_settings(h: Handler) -> None:
    h.send_json(200, settings_view(h.server.config))


def handle_settings_change(h: Handler) -> None:
    body = h.read_json()
    if not isinstance(body, dict) or not body:
        raise bad_request("Send a JSON object of settings, e.g. {\"maxConcurrent\": 4}", None, "invalid_json")
    result = h.server.apply_settings(body)
    h.audit("settings", ",".join(sorted(body)), json.dumps(body, sort_keys=True))
    h.send_json(200, result)


def handle_logs(h: Handler) -> None:
    query = urllib.parse.parse_qs(h.path.partition("?")[2])
    n, level = (query.get("n") or ["100"])[-1], (query.get("level") or ["DEBUG"])[-1].upper()
    if not (digits(n) and 1 <= int(n) <= 1000):
        raise bad_request("'n' must be a whole number from 1 to 1000", "n")
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise bad_request("'level' must be debug, info, warning or error", "level")
    h.send_json(200, {"object": "list", "data": h.server.ring.tail(int(n), level)})


def handle_metrics(h: Handler) -> None:
    text = h.server.metrics.render(READ, h.server.metric_view())
    h.send_body(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")


def handle_sessions(h: Handler) -> None:
    h.send_json(200, {"object": "list", "data": h.server.runner.live()})


def handle_sessions_clear(h: Handler) -> None:
    pooled = h.server.runner.pool.clear()
    cancelled = h.server.runner.cancel_all()
    h.audit("sessions.clear", "*", str(cancelled + pooled))
    h.send_json(200, {"cancelled": cancelled, "pooled": pooled})


def handle_session_cancel(h: Handler, run_id: str) -> None:
    if not h.server.runner.cancel(run_id):
        raise ApiError(404, f"No running session {run_id[:64]!r}.", code="session_not_found")
    h.audit("sessions.cancel", run_id, "")
    h.send_json(200, {"cancelled": 1})


def handle_dashboard(h: Handler) -> None:
    """The page itself is public and holds no data; everything it shows needs a login."""
    page = shipped_file("dashboard.html")
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'" for s in scripts)
    h.send_body(200, page, "text/html; charset=utf-8", {
        "Content-Security-Policy": f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
                                   "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                   "form-action 'none'; base-uri 'none'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


def handle_connect_script(h: Handler) -> None:
    """The client setup script: `curl -fsSL http://SERVER:3456/connect.py | python3 - SERVER`."""
    h.send_body(200, shipped_file("ocp_connect.py"), "text/x-python; charset=utf-8", {"Cache-Control": "no-store"})


def handle_dashboard_login(h: Handler) -> None:
    server, address = h.server, h.client_address[0]
    wait = server.logins.wait_s(address, server.wall())
    if wait:
        h.discard_body()
        raise ApiError(429, f"Too many failed logins from this address; try again in {wait} s.",
                       "rate_limit_error", "too_many_logins", headers={"Retry-After": str(wait)})
    body = h.read_json()
    given = body.get("key") if isinstance(body, dict) else None
    caller = server.identify(given) if isinstance(given, str) else None
    if caller is None or not (caller.admin or caller.key):
        server.logins.failed(address, server.wall())
        h.audit("dashboard.login_failed", "-", "")
        raise ApiError(401, "That key does not open the dashboard: use the admin key or your own key.",
                       "invalid_request_error", "invalid_api_key")
    token = server.sessions.create(caller, server.wall())
    h.send_json(200, {"role": "admin" if caller.admin else "member", "name": caller.name},
                   {"Set-Cookie": f"{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; "
                                  f"Max-Age={SESSION_TTL_S}"})


def handle_dashboard_logout(h: Handler) -> None:
    h.discard_body()
    token = cookie_value(h.headers.get("Cookie", ""), SESSION_COOKIE)
    if token:
        h.server.sessions.drop(token)
    h.send_json(200, {"logged_out": True},
                   {"Set-Cookie": f"{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"})


def handle_dashboard_me(h: Handler) -> None:
    """Who the browser's session is: 200 either way, so the page's first look logs no error."""
    caller = h.caller
    role = "admin" if caller.admin else ("member" if caller.key else None)
    h.send_json(200, {"role": role, "name": caller.name if role else None})


def handle_dashboard_data(h: Handler) -> None:
    """Everything the dashboard shows, scoped to who is logged in: a member sees only its own."""
    caller, server = h.caller, h.server
    if not (caller.admin or caller.key):
        raise ApiError(401, "Log in with the admin key or your own key.", code="login_required")
    now = server.wall()
    bucket, buckets = 3600, 24
    since = int(now // bucket * bucket) - (buckets - 1) * bucket
    keys = server.store.keys() if caller.admin else [caller.key]
    mine = None if caller.admin else caller.key.id
    usage = server.store.usage_by_key(int(now) - 30 * 86400, int(now) + 1)
    recent = server.store.usage_rows(mine, None if caller.admin else caller.name, 0, int(now) + 1, 25)
    h.send_json(200, {
        "role": "admin" if caller.admin else "member", "name": caller.name, "now": int(now),
        "health": server.health(admin=caller.admin),
        "plan": plan_report(server.plan, now, None if caller.admin else caller.label, server.config.tzinfo),
        "series": {"bucket_s": bucket, "points": server.store.usage_series(since, bucket, buckets, mine)},
        "keys": [quota_report(server.store, k, now, server.config.tzinfo) for k in keys],
        "usage_by_key": usage if caller.admin else [u for u in usage if u["key_id"] == caller.key.id],
        "recent": recent})


def handle_cache_stats(h: Handler) -> None:
    server = h.server
    h.send_json(200, dict(server.store.cache_totals(server.wall()), **server.flights.snapshot(),
                          enabled=bool(server.config.cache_ttl_ms), ttl_ms=server.config.cache_ttl_ms,
                          max_entries=server.config.cache_max_entries,
                          max_bytes=server.config.cache_max_bytes))


def handle_cache_clear(h: Handler) -> None:
    cleared = h.server.store.cache_clear()
    h.audit("cache.clear", "*", str(cleared))
    h.send_json(200, {"cleared": cleared})


def shipped_file(name: str) -> bytes:
    """A file installed next to ocp.py (the dashboard, the connect script); 404 when missing."""
    try:
        with open(os.path.join(HERE, name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ApiError(404, f"{name} is not installed next to ocp.py.", code="file_missing") from None


@dataclasses.dataclass(frozen=True)
class Route:
    """A route's function (handler, *path arguments) and who may call it: "admin" (the default:
    a route nobody declared otherwise is the owner's), "keyed" (any caller the auth mode
    admits: a key, the guest key, anyone in mode none) or "public" (no key needed; a key
    given is still read, for the admin's view)."""

    handle: Callable[..., None]
    access: str = "admin"


KEYED, PUBLIC = "keyed", "public"
TURN_ROUTE = Route(answer_turn, KEYED)  # every model route (TURN_ROUTES) is answered by answer_turn

# Every other route: (method, pattern) → Route; "*" matches one segment.
ROUTES = {
    ("GET", "/health"): Route(handle_health, PUBLIC),
    ("GET", "/v1/models"): Route(handle_models, KEYED),
    ("GET", "/v1/models/*"): Route(handle_model, KEYED),
    ("GET", "/api/keys"): Route(handle_keys_list),
    ("POST", "/api/keys"): Route(handle_keys_add),
    ("DELETE", "/api/keys/*"): Route(handle_key_revoke),
    ("GET", "/api/keys/*/quota"): Route(handle_quota_get),
    ("PATCH", "/api/keys/*/quota"): Route(handle_quota_set),
    ("GET", "/api/usage"): Route(handle_usage, KEYED),  # (everyone's: admin, checked inside)
    ("GET", "/cache/stats"): Route(handle_cache_stats),
    ("GET", "/usage"): Route(handle_plan_usage),
    ("GET", "/status"): Route(handle_status),
    ("GET", "/settings"): Route(handle_settings),
    ("PATCH", "/settings"): Route(handle_settings_change),
    ("GET", "/logs"): Route(handle_logs),
    ("GET", "/metrics"): Route(handle_metrics),
    ("GET", "/sessions"): Route(handle_sessions),
    ("DELETE", "/sessions"): Route(handle_sessions_clear),
    ("DELETE", "/sessions/*"): Route(handle_session_cancel),
    ("GET", "/dashboard"): Route(handle_dashboard, PUBLIC),
    ("GET", "/connect.py"): Route(handle_connect_script, PUBLIC),
    ("POST", "/v1/messages/count_tokens"): Route(handle_count_tokens, KEYED),
    ("HEAD", "/api/hello"): Route(handle_hello, PUBLIC),
    ("POST", "/dashboard/login"): Route(handle_dashboard_login, PUBLIC),
    ("POST", "/dashboard/logout"): Route(handle_dashboard_logout, PUBLIC),
    ("GET", "/dashboard/data"): Route(handle_dashboard_data, KEYED),
    ("GET", "/dashboard/me"): Route(handle_dashboard_me, PUBLIC),
    ("DELETE", "/cache"): Route(handle_cache_clear),
}



###############################################################################
# HTTP ########################################################################
###############################################################################

MAX_JSON_DEPTH = 64  # deeper request JSON is refused before anything walks it
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
ROUTE_ALIASES = {"/models": "/v1/models", "/chat/completions": "/v1/chat/completions"}
MAX_BODY_READ_S = 120  # a body sent slower than this is cut off


LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")  # escaped, or raw (json.loads lets it pass)


def json_unusable(value: Any, strings: bool) -> bool:
    """Whether parsed JSON nests too deep or (when `strings`) holds a lone surrogate: the quick
    check of every body (a 200-turn conversation: 0.2 ms); json_problem_at then says where."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            if strings and not all(map(is_encodable, item)):
                return True
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            if strings and isinstance(item, str) and not is_encodable(item):
                return True
            continue
        stack += [(child, depth + 1) for child in children if strings or isinstance(child, (dict, list))]
    return False


def json_problem_at(value: Any) -> Optional[Tuple[str, str]]:
    """Return (path, "too_deep" | "surrogate") for the first unusable spot in parsed JSON, or None.

    Iterative, so a hostile document cannot exhaust the stack here either.
    """
    stack: List[Tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return path, "too_deep"
        if isinstance(item, str):
            if not is_encodable(item):
                return path, "surrogate"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if not is_encodable(key):
                    return child_path.encode("utf-8", "backslashreplace").decode("ascii"), "surrogate"
                stack.append((child, child_path, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
    return None


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_exactly(rfile: Any, length: int) -> bytes:
    """Read `length` body bytes; ClientGone if the client stops short."""
    parts = []
    while length > 0:
        chunk = rfile.read1(min(length, 1 << 16))
        if not chunk:
            raise ClientGone()
        parts.append(chunk)
        length -= len(chunk)
    return b"".join(parts)


def read_chunked(rfile: Any, cap: int) -> bytes:
    """Read a chunked body strictly: 1-8 hex digit sizes, the cap checked before each chunk,
    bounded trailers. The caller closes the connection after it."""
    parts, total = [], 0
    while True:
        line = rfile.readline(1024)
        if not line:
            raise ClientGone()
        match = re.fullmatch(rb"([0-9A-Fa-f]{1,8})(;[^\r\n]*)?\r?\n", line)
        if match is None:
            raise bad_request("Malformed chunked body (bad chunk size line)", None, "bad_request")
        size = int(match.group(1), 16)
        total += size
        if total > cap:
            raise ApiError(413, f"The request body is over the limit of {cap} bytes.",
                           "invalid_request_error", "request_too_large")
        if size == 0:
            for _ in range(100):  # trailers, up to the blank line
                trailer = rfile.readline(1024)
                if not trailer:
                    raise ClientGone()
                if not trailer.strip():
                    return b"".join(parts)
            raise bad_request("Malformed chunked body (too many trailers)", None, "bad_request")
        parts.append(read_exactly(rfile, size))
        if rfile.readline(3) not in (b"\r\n", b"\n"):
            raise bad_request("Malformed chunked body (chunk longer than its size)", None, "bad_request")


def parse_json_body(body: bytes) -> Any:
    """A request body as JSON; 400 naming the problem (empty, invalid, too deep, lone surrogate)."""
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.", None, "invalid_json")
    try:
        value = json.loads(body)
        problem = json_problem_at(value) if json_unusable(value, bool(LONE_SURROGATE.search(body))) else None
    except RecursionError:  # nested past the parser's own limit
        problem = ("", "too_deep")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {str(e)[:120]}", None, "invalid_json")
    if problem:
        path, kind = problem
        if kind == "too_deep":
            raise bad_request(f"The request JSON is nested more than {MAX_JSON_DEPTH} levels deep",
                              path or None, "invalid_json")
        raise bad_request(f"{path or 'The request body'} holds a lone UTF-16 surrogate (\\ud800-\\udfff); "
                          "send valid Unicode text", path or None, "invalid_unicode")
    return value


class Deadlines:
    """One thread that cuts off a socket whose request head or body is not in by its deadline.

    Per-read socket timeouts let a client that sends one byte every few seconds
    hold a thread for ever; a cut (shutdown of the reading side) ends every read
    at once, and the handler can still write its 408. Watches live in a dict, so
    they cost O(1) and are bounded by the open connections, not the request rate;
    the thread sleeps until the earliest deadline. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._cond = threading.Condition()
        self._watches: Dict[int, List[Any]] = {}  # id -> [deadline, socket, expired]
        self._ids = itertools.count(1)
        self._wake_at = float("inf")
        self._thread: Optional[threading.Thread] = None

    def watch(self, sock: socket.socket, seconds: float) -> int:
        """Cut `sock` after `seconds` unless `done` is called with the returned id first. Lock-free
        but for the rare watch due before the thread wakes: every request takes and drops one, and
        eight threads taking a lock for it queued on it (a convoy under the GIL)."""
        deadline = self.clock() + seconds
        watch = next(self._ids)  # (count and dict operations are atomic under the GIL)
        self._watches[watch] = [deadline, sock, False]
        if deadline < self._wake_at or self._thread is None:
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="ocp-deadlines", daemon=True)
                    self._thread.start()
                self._wake_at = min(self._wake_at, deadline)
                self._cond.notify()
        return watch

    def done(self, watch: Optional[int]) -> bool:
        """Stop watching; return True when the deadline had already passed."""
        entry = self._watches.pop(watch, None) if watch is not None else None
        return bool(entry and entry[2])

    def _work(self) -> None:
        with self._cond:
            while True:
                now = self.clock()
                pending = []
                for entry in list(self._watches.values()):
                    if entry[2]:
                        continue
                    if entry[0] <= now:
                        entry[2] = True
                        with contextlib.suppress(OSError):
                            entry[1].shutdown(socket.SHUT_RD)
                    else:
                        pending.append(entry[0])
                self._wake_at = min(pending, default=float("inf"))
                # (at most a second: a watch added while this scan ran saw the old _wake_at)
                self._cond.wait(None if not pending else min(1.0, max(0.0, self._wake_at - now)))


HANGUP = getattr(select, "POLLRDHUP", 0)  # Linux: a peer's close is seen even behind unread bytes


def peer_closed(sock: Optional[socket.socket]) -> bool:
    """Return True when the client at the other end of `sock` has hung up.

    A client may have sent more after its body (a pipelined request, a stray
    CRLF): POLLRDHUP still sees it leave. Without it (macOS) only a close with
    nothing unread is seen here; the next write to the client finds the rest.
    """
    if sock is None:
        return False
    if HANGUP:
        try:
            poller = select.poll()
            poller.register(sock, HANGUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True
    try:
        ready = select.select([sock], [], [], 0)[0]
        if not ready:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Hangups:
    """One thread that watches the sockets of requests being answered and calls back when a
    client hangs up, so the request can cancel its turn (the runner never sees a socket).

    With POLLRDHUP (Linux) a close is seen even behind unread bytes (a pipelined
    request, a stray CRLF). Elsewhere a readable socket is peeked: a close with
    nothing unread is seen, anything else stops the watch (the next write to the
    client finds a later close). Thread-safe.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._watched: Dict[int, Tuple[socket.socket, Callable[[], None]]] = {}
        self._wake: Optional[Tuple[int, int]] = None
        self._thread: Optional[threading.Thread] = None

    @contextlib.contextmanager
    def watch(self, sock: socket.socket, on_hangup: Callable[[], None]) -> Iterator[None]:
        """Call `on_hangup()` (from the watcher's thread) if the client leaves inside the block."""
        fd = sock.fileno()
        with self._lock:
            if self._thread is None:
                self._wake = os.pipe()
                self._thread = threading.Thread(target=self._work, name="ocp-hangups", daemon=True)
                self._thread.start()
            self._watched[fd] = (sock, on_hangup)
        self._poke()
        try:
            yield
        finally:
            with self._lock:
                if self._watched.get(fd, (None,))[0] is sock:
                    del self._watched[fd]
            # No poke: the watcher may poll this fd until the next change of its list; if it
            # fires (a close, or POLLNVAL once closed), the watcher finds it unwatched and moves on.

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake[1], b"x")

    def _work(self) -> None:
        while True:
            with self._lock:
                watched = dict(self._watched)
            for fd in self._ready(watched):
                with self._lock:
                    entry = self._watched.get(fd)
                    if entry is None or entry[0] is not watched[fd][0]:
                        continue
                    del self._watched[fd]  # one call, or (data, no close) no more watching
                if peer_closed(entry[0]):
                    entry[1]()

    def _ready(self, watched: Dict[int, Any]) -> List[int]:
        """Wait for a hang-up or a change of the watch list; return the fds that fired."""
        wake = self._wake[0]
        if HANGUP:
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in watched:
                poller.register(fd, HANGUP)
            fired = [fd for fd, _ in poller.poll()]
        else:
            try:
                fired = select.select([wake] + list(watched), [], [])[0]
            except (OSError, ValueError):  # a socket closed under us: the next pass has the new list
                time.sleep(0.05)
                return []
        if wake in fired:
            os.read(wake, 4096)
        return [fd for fd in fired if fd != wake]


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (services get 1,024 by default); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(config: Config, open_files: int) -> int:
    """Client connections at once: OCP_MAX_CONNECTIONS, else half the open-files limit (the
    rest: CLIs' pipes, the database, logs), between 16 and 4,096."""
    return config.max_connections or max(16, min(4096, open_files // 2))


class Connections:
    """The open client connections and what each is doing, so that a flood of keyless or
    half-sent ones cannot take the daemon: past the cap, a new connection closes the newest
    one that has not sent a keyed request, else the oldest idle one of a member's key (the
    admin's are kept; none that may go: the new one is refused). Thread-safe.

    A connection is "new" until its first request head is in, "busy" while a request runs,
    then "idle"; its trust is 0 until a request on it came with a key (1) or the admin key (2).
    """

    def __init__(self, cap: int):
        self.cap = cap
        self._lock = threading.Lock()
        self._open: Dict[socket.socket, List[Any]] = {}  # sock -> [state, trusted]; in accept order
        self.shed = self.refused = 0

    def opened(self, sock: socket.socket) -> bool:
        """Count a new connection; False (the caller closes it) when there is no room for it."""
        with self._lock:
            victim = self._victim() if len(self._open) >= self.cap else None
            if len(self._open) >= self.cap and victim is None:
                self.refused += 1
                return False
            self._open[sock] = ["new", 0]
            if victim is not None:
                self._open.pop(victim)
                self.shed += 1
        if victim is not None:
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)  # its thread reads EOF and ends
        return True

    def _victim(self) -> Optional[socket.socket]:
        """(under the lock) The newest connection that is not busy and never sent a keyed
        request; else the oldest idle one of a member's key."""
        for sock, (state, trust) in reversed(list(self._open.items())):
            if state != "busy" and not trust:
                return sock
        for sock, (state, trust) in self._open.items():
            if state == "idle" and trust == 1:
                return sock
        return None

    def mark(self, sock: socket.socket, state: str, trust: int = 0) -> None:
        """(No lock: twice a request, and one entry's fields; the shedding reads them under its own.)"""
        entry = self._open.get(sock)
        if entry is not None:
            entry[0], entry[1] = state, max(entry[1], trust)

    def closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)

    def make_room(self) -> bool:
        """Out of descriptors: close one connection that may go; False when none may."""
        with self._lock:
            victim = self._victim()
            if victim is not None:
                self._open.pop(victim)
                self.shed += 1
        if victim is None:
            return False
        with contextlib.suppress(OSError):
            victim.shutdown(socket.SHUT_RDWR)
        return True

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return {"open": len(self._open), "cap": self.cap, "shed": self.shed, "refused": self.refused}


class Server(ThreadingHTTPServer):
    """The daemon: owns config, models, runner and plan state; handlers reach it as self.server."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # http.server's 5 turns a burst of connects into SYN retries

    def __init__(self, config: Config, models: Models, runner: Optional[Runner] = None,
                 store: Optional[Store] = None, admin_key: str = "",
                 wall: Callable[[], float] = time.time):
        self.config, self.models = config, models
        self.runner = runner or Runner(config)
        os.makedirs(config.home, mode=0o700, exist_ok=True)
        self.store = store or Store(config.db_path)
        self.admin_key = admin_key or config.admin_key
        self.plan = PlanLimits(self.store.load_state("plan"), lambda state: self.store.save_state("plan", state))
        self._verdict_lock = threading.Lock()
        self.auth_failures = 0  # consecutive upstream_auth_error outcomes of real requests
        self.recent_errors: "collections.deque[Dict[str, Any]]" = collections.deque(maxlen=10)
        self.wall = wall
        self.flights = Flights()
        self.ledger = Ledger(self)
        self.parks = Parks()
        self.runner.pool.may_spawn = lambda model_id: not self.plan.held(self.wall(), model_id)
        self.alerts = Alerts(config.alert_url, lambda action, target, detail: self.store.audit(
            "ocp", action, target, detail, self.wall()), lambda: self.wall())
        self.plan.changed = lambda: plan_alerts(self.alerts, self.plan, self.config.alert_percents, self.wall(),
                                                self.config.tzinfo)
        self.login_episode = 0  # counts the login's breakdowns: each is alerted once
        self.hangups = Hangups()
        self.turn_routes = dict(TURN_ROUTES)  # path → TurnRoute; a test may plug in its own
        self.models_bodies: Dict[Tuple[Any, bool], bytes] = {}  # GET /v1/models, by allowlist and kind
        self.route_shapes: Dict[str, List[str]] = {}  # a route pattern's segments, split once (ROUTES stays the truth)
        self.sessions = DashboardSessions()
        self.logins = LoginThrottle()
        self.deadlines = Deadlines()
        self.active_requests = 0
        self._active_cond = threading.Condition(threading.Lock())  # (a plain lock: twice a request)
        self.body_timeout_s = MAX_BODY_READ_S
        self.metrics = Metrics()
        self._services = TurnServices(self.runner, self.plan, self.parks, self.metrics, config,
                                      secrets.token_bytes(32), wall)
        self.ring = LogRing()
        self._settings_lock = threading.Lock()
        self.started_at = wall()
        hostname = socket.gethostname().lower()
        self.own_names = (hostname, hostname.split(".")[0], hostname.split(".")[0] + ".local")
        self.address_family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
        self.connections = Connections(connection_cap(config, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        super().__init__((config.bind, config.port), Handler)

    @property
    def services(self) -> TurnServices:
        """What every Turn uses; rebuilt only when the config (a runtime setting) or the clock changed."""
        services = self._services
        if services.config is not self.config or services.clock is not self.wall:
            services = self._services = dataclasses.replace(services, config=self.config, clock=self.wall)
        return services

    def get_request(self) -> Tuple[socket.socket, Any]:
        """accept(), but out of descriptors it closes a connection that may go and pauses: the
        listening socket stays readable, and the loop would spin a core on EMFILE."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                log.warning("out of file descriptors with %d connections open", self.connections.snapshot()["open"])
                self.connections.make_room()
                time.sleep(0.05)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """The connection on a kept worker thread (ThreadingMixIn would start a thread each time)."""
        WORKERS.run(self.process_request_thread, request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """A place for the connection within OCP_MAX_CONNECTIONS, or it is closed unanswered."""
        return self.connections.opened(request)

    def shutdown_request(self, request: Any) -> None:
        self.connections.closed(request)
        super().shutdown_request(request)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `condition()` holds or `timeout_s` passes (shutdown's steps; it is polled)."""
        deadline = time.monotonic() + timeout_s
        with self._active_cond:
            while not condition():
                if time.monotonic() >= deadline:
                    return False
                self._active_cond.wait(0.05)
        return True

    def request_started(self) -> None:
        with self._active_cond:
            self.active_requests += 1

    def request_ended(self) -> None:
        with self._active_cond:  # (wait_for polls: no notify)
            self.active_requests -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Outside a request (e.g. a reset idle keep-alive): clients do that, it is no traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            log.debug("connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("error outside a request from %s", client_address[0])

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skip HTTPServer's getfqdn: a DNS lookup at start
        self.server_name, self.server_port = self.server_address[:2]

    def apply_settings(self, changes: Mapping[str, Any]) -> Dict[str, Any]:
        """Validate runtime settings, take them now, persist them; 400 naming the problem."""
        try:
            values = {name: check_tunable(name, value) for name, value in changes.items()}
        except ConfigError as e:
            raise bad_request(str(e), None, "invalid_setting")
        fields = {RUNTIME_SETTINGS[name].field: value for name, value in values.items()}
        with self._settings_lock:
            sources = dict(self.config.sources, **{field: "settings.json" for field in fields})
            self.config = dataclasses.replace(self.config, sources=types.MappingProxyType(sources), **fields)
            self.runner.apply(self.config)
            write_settings_file(self.config.settings_path, values)
        overridden = [RUNTIME_SETTINGS[n].env for n in changes if self.config.environ.get(RUNTIME_SETTINGS[n].env)]
        log.info("settings changed", extra={"changes": dict(changes)})
        return {"settings": settings_view(self.config), "overridden_at_start_by": overridden}

    def metric_view(self) -> types.SimpleNamespace:
        """One snapshot of each part /metrics reads (READ), taken once per scrape."""
        now = self.wall()
        return types.SimpleNamespace(now=now, slots=self.runner.slots.snapshot(), plan=self.plan.snapshot(),
                                     share=self.plan.share_report(now), parks=self.parks.snapshot(),
                                     pool=self.runner.pool.snapshot(), connections=self.connections.snapshot(),
                                     flights=self.flights.snapshot())

    def identify(self, given: str) -> Optional[Caller]:
        """Who a presented key belongs to, or None for no key, an unknown one or one not usable now."""
        return self.recognise(given)[0]

    def recognise(self, given: str) -> Tuple[Optional[Caller], int]:
        """(the caller a presented key makes, or None; when it expired if that is why it makes none,
        else 0) — one look at the store, whatever the answer."""
        now = self.wall()
        if not given:
            return None, 0
        if same_secret(given, self.admin_key):
            return Caller("admin", admin=True), 0
        if self.config.auth_mode == "shared" and same_secret(given, self.config.api_key):
            return Caller("shared"), 0
        if self.config.auth_mode == "multi" and same_secret(given, self.config.anonymous_key):
            ends = self.config.anonymous_expires_at
            return (Caller("anonymous"), 0) if not ends or now < ends else (None, ends)
        key = self.store.key_with_secret(given)
        if key is not None and key.usable(now):
            return Caller(key.name, key), 0
        return None, key.policy.expires if key is not None and key.status(now) == "expired" else 0

    def authenticate(self, headers: Mapping[str, str], access: str) -> Caller:
        """The one way in: who sent a request — its key, else its dashboard session — for a route
        of `access`. A public route admits anyone; in auth mode none anyone is the owner ("local":
        a stale key on an open proxy is not worth refusing); otherwise no good key is a 401."""
        given = presented_key(headers)
        token = "" if given else cookie_value(headers.get("Cookie", ""), SESSION_COOKIE)
        caller, ended = (self.sessions.resolve(token, self.store, self.wall()), 0) if token else self.recognise(given)
        if caller is not None:
            return caller
        if access == PUBLIC:
            return Caller("public")
        if self.config.auth_mode == "none":
            return Caller("local")
        if ended:
            raise ApiError(401, f"This key expired on {utc_time(ended)}. Ask the owner of this OCP for a new key or "
                           "a longer lifetime.", "invalid_request_error", "key_expired",
                           headers={"WWW-Authenticate": "Bearer"})
        raise ApiError(401, UNKNOWN_KEY, "invalid_request_error", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})

    def record_outcome(self, status: str, error: Optional[ApiError]) -> None:
        """Real requests are the health evidence: no probe ever spends the plan."""
        with self._verdict_lock:
            if error is not None and error.code == "upstream_auth_error":
                self.auth_failures += 1
            elif status == "ok":
                self.login_episode += self.auth_failures >= 2
                self.auth_failures = 0
            broken = self.auth_failures >= 2
            if error is not None:
                self.recent_errors.append({"at": int(self.wall()), "status": error.status, "code": error.code,
                                           "message": error.message[:200]})
        if broken:
            self.alerts.raise_once(("login", self.login_episode), "login", "The Claude login of this OCP failed on "
                                   "the last requests: on its machine run `claude setup-token` (then set "
                                   "CLAUDE_CODE_OAUTH_TOKEN) or `claude auth login`.")

    def verdict(self) -> Tuple[str, str]:
        """("ok" | "degraded" | "down", why). Down = cannot serve; a timeout is no evidence."""
        if not self.runner.claude:
            return "down", "the claude CLI is not installed: npm i -g @anthropic-ai/claude-code, then claude setup-token"
        with self._verdict_lock:
            failures = self.auth_failures
        if failures >= 2:
            return "down", (f"the Claude login failed on the last {failures} requests: on this machine run "
                            "`claude setup-token` and set CLAUDE_CODE_OAUTH_TOKEN, or `claude auth login`")
        hold = self.plan.snapshot()["hold_until"]
        if hold > self.wall():
            return "degraded", f"the subscription's usage limit is reached until {hold} (epoch seconds)"
        leaked = self.runner.slots.leaked()
        if leaked:
            return "degraded", (f"{leaked} CLI slot(s) are held by no live request (a bug: please report it); "
                                "`ocp.py restart` gives them back")
        return "ok", ""

    def health(self, admin: bool = False) -> Dict[str, Any]:
        """The public verdict; `admin` adds the detail no one else may see."""
        status, reason = self.verdict()
        body: Dict[str, Any] = {"status": status, "version": __version__, "authMode": self.config.auth_mode}
        if reason:
            body["reason"] = reason
        if self.config.advertise_anon_key and self.config.auth_mode == "multi" and self.config.anonymous_key:
            body["anonymousKey"] = self.config.anonymous_key
        if admin:
            keys, now = self.store.keys(), self.wall()
            body["detail"] = {
                "claude": self.runner.claude, "claude_version": self.runner.version() or None,
                "models_too_new_for_the_cli": unservable_models(self.models, self.runner.version()),
                "slots": dict(self.runner.slots.snapshot(), leaked=self.runner.slots.leaked()),
                "running": self.runner.live(), "tools": self.parks.snapshot(),
                "pool": self.runner.pool.snapshot(), "connections": self.connections.snapshot(),
                "keys": dict({"active": 0, "revoked": 0}, **collections.Counter(k.status(now) for k in keys)),
                "plan": plan_report(self.plan, self.wall(), tz=self.config.tzinfo), "timezone": self.config.timezone or "local",
                "recent_errors": list(self.recent_errors),
                "uptime_s": int(self.wall() - self.started_at)}
        return body


# -- walls: refusals waiting will not fix, answered so that each client stops and says why ------

# What clients match to decide to retry (opencode's loose patterns, litellm's, Continue's): kept out
# of a wall's text, or the client retries a wall for minutes and never shows it.
RETRY_BAIT = re.compile(r"429|500|502|503|504|524|rate[ _-]?limit|too many requests|try again|overloaded|"
                        r"time ?out|timed out|aborted", re.I)
BAIT_REWORDS = ((re.compile(r"rate[ _-]?limit", re.I), "usage limit"), (re.compile(r"too many requests", re.I),
                "too many calls"), (re.compile(r"try again", re.I), "ask again"), (re.compile(r"overloaded", re.I),
                "busy"), (re.compile(r"time ?out|timed out", re.I), "out of time"), (re.compile(r"aborted", re.I),
                "stopped"))
WORD_JOINER = "\u2060"  # invisible: "500" still reads as 500, and no longer matches /500/
# Clients that retry every 429 whatever Retry-After and x-should-retry say (README: walls): the AI
# SDK (opencode: "ai-sdk/…" in its User-Agent), litellm (aider), Continue (a bundled OpenAI SDK
# whose class name was minified: "ls/JS 5.23.2").
RETRYING_CLIENTS = re.compile(r"\bai-sdk/|^litellm/|^(?!OpenAI/)[A-Za-z]{1,4}/JS \d")


def unbaited(text: str) -> str:
    """`text` with nothing a client's retry patterns match: digit runs split, phrases reworded."""
    for run in ("429", "500", "502", "503", "504", "524"):
        text = text.replace(run, run[0] + WORD_JOINER + run[1:])
    for pattern, words in BAIT_REWORDS:
        text = pattern.sub(words, text)
    return text


def wall_for(error: ApiError, api: str, user_agent: str, force_429: bool = False) -> ApiError:
    """The answer to a wall that makes this client stop at once and show OCP's message: Codex
    (Responses) gets its usage_limit_reached with resets_at; a client that retries every 429
    gets a 400 (insufficient_quota for a quota or the plan) without Retry-After, whose text and
    body hold nothing its retry patterns match; the rest keep the 429 with x-should-retry:
    false (the OpenAI and Anthropic SDKs, Claude Code, llm). Anything else passes unchanged."""
    if not error.wall:
        return error
    message, headers = unbaited(error.message), dict(error.headers)
    if force_429 or not RETRYING_CLIENTS.search(user_agent):
        if api == "responses" and error.status == 429 and not force_429:
            return ApiError(429, message, "usage_limit_reached", error.code, error.param, headers,
                            dict(error.extra, resets_at=error.resets_at), wall=True, resets_at=error.resets_at)
        return ApiError(error.status, message, error.type, error.code, error.param, headers, error.extra,
                        wall=True, resets_at=error.resets_at)
    headers.pop("Retry-After", None)  # opencode waits it out as sent: a 12-hour sleep
    quota = error.status == 429
    return ApiError(400, message, "insufficient_quota" if quota else "invalid_request_error",
                    "insufficient_quota" if quota else error.code, error.param, headers, wall=True,
                    resets_at=error.resets_at)


class RequestHeaders(dict):
    """A request's headers by lower-cased name (the first of each, as email.message's `get`; every
    one through `get_all`): http.server's message walks all headers on each `get`, and a request
    asks a dozen times."""

    def __init__(self, message: Any):
        super().__init__()
        self.every: Dict[str, List[str]] = {}
        for name, value in message.items():
            self.every.setdefault(name.lower(), []).append(value)
            self.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> Any:
        return dict.get(self, name.lower())

    def __contains__(self, name: Any) -> bool:
        return dict.__contains__(self, str(name).lower())

    def get_all(self, name: str, default: Any = None) -> Any:
        return self.every.get(name.lower(), default)


class Handler(BaseHTTPRequestHandler):
    """One connection: reads the request, finds its route (TURN_ROUTES, ROUTES), and answers
    every failure as JSON in the route's error shape (OpenAI's unless the route says)."""

    protocol_version = "HTTP/1.1"
    server_version = "ocp/" + __version__
    server: Server


    def setup(self) -> None:
        self.timeout = self.server.config.socket_timeout_s  # idle or slow clients can't pin a thread
        super().setup()
        # Headers and body leave in separate writes; without this Nagle holds the second one
        # for the client's delayed ACK (~40 ms), and every SSE event would wait too.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request_id = ""
        self.response_headers: Dict[str, str] = {}  # http.server's own errors come before dispatch
        self.error_body = Encoder.error_body
        self.api = "openai"
        self.counted_as: Optional[Tuple[str, str]] = ("(unknown)", "-")
        self.caller: Optional[Caller] = None
        self.body_read = False
        self.head_watch: Optional[int] = None

    # -- plumbing ------------------------------------------------------------

    def handle_one_request(self) -> None:
        """Read one request; its line and headers must all be in within the socket timeout."""
        self.head_watch = self.server.deadlines.watch(self.connection, self.server.config.socket_timeout_s)
        self.counted_as = ("(unknown)", "-")  # a request http.server itself refuses counts too
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.done(self.head_watch)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed:
            self.headers = RequestHeaders(self.headers)  # type: ignore[assignment]
        return parsed

    def route(self) -> Tuple[Optional[Route], str, List[Any]]:
        """Return (route, route pattern, its arguments) for this request."""
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if "://" in path:  # absolute-form request target
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        path = re.sub(r"/{2,}", "/", path)
        if len(path) > 1:
            path = path.rstrip("/")
        path = ROUTE_ALIASES.get(path, path)
        if path.startswith("/models/"):
            path = "/v1" + path
        turn_route = self.server.turn_routes.get(path)
        if path in ANTHROPIC_ROUTES:
            self.api = "anthropic"
            self.error_body = anthropic_error
            self.response_headers["request-id"] = self.request_id
        if turn_route is not None:
            self.api = turn_route.api
            self.error_body = turn_route.json.error_body
            if turn_route.request_id_header:
                self.response_headers[turn_route.request_id_header] = self.request_id
            return (TURN_ROUTE if self.command == "POST" else None), path, [turn_route]
        parts = path.split("/")
        for _, pattern in ROUTES:
            shapes = self.server.route_shapes
            shape = shapes.get(pattern) or shapes.setdefault(pattern, pattern.split("/"))
            if len(shape) == len(parts) and all(s in ("*", p) for s, p in zip(shape, parts)):
                args = [urllib.parse.unquote(p) for s, p in zip(shape, parts) if s == "*"]
                return ROUTES.get((self.command, pattern)), pattern, args
        return None, path, []

    def methods(self, pattern: str) -> List[str]:
        """The methods a route pattern answers (405's Allow, CORS preflight)."""
        if pattern in self.server.turn_routes:
            return ["POST"]
        return sorted(m for m, p in ROUTES if p == pattern)

    def dispatch(self) -> None:
        connections = self.server.connections
        connections.mark(self.connection, "busy")
        self.server.request_started()
        try:
            self.dispatch_request()
        finally:
            self.server.request_ended()
            caller = self.caller
            connections.mark(self.connection, "idle", 2 if caller and caller.admin else int(bool(caller and caller.key)))

    def dispatch_request(self) -> None:
        self.request_id = "req_" + random_hex(12)
        self.response_headers = {}
        self.caller = None  # per request: one connection may carry several
        self.body_read = False
        self.admitted = False  # a Ticket holds this request's usage row
        self.refused_model = "-"
        self.error_body = Encoder.error_body  # the route's error shape (OpenAI's unless it says)
        self.api = "openai"
        started = time.monotonic()
        self.status_sent = 0
        route, key, args = self.route()
        self.counted_as = (key if route else "(unknown)", self.command if route else "-")
        try:
            if self.server.deadlines.done(self.head_watch):
                self.close_connection = True
                raise ApiError(408, "The request headers arrived too slowly.", code="request_timeout")
            self.check_browser_safety()
            allowed = self.methods(key)
            if self.command == "OPTIONS" and allowed:
                return self.answer_preflight(allowed)
            if route is None:
                self.discard_body()
                if allowed:
                    raise ApiError(405, f"{self.command} is not allowed on {key}", code="method_not_allowed",
                                   headers={"Allow": ", ".join(allowed)})
                raise ApiError(404, f"Unknown route: {self.command} {key[:200]}", code="unknown_route")
            self.caller = self.authenticate(route.access)
            if route.access == "admin":
                require_admin(self.caller)
            route.handle(self, *args)
        except ApiError as e:
            self.refuse(e, key)
        except (ClientGone, BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
            log.debug("%s client hung up", self.request_id)
        except Exception:
            log.exception("%s failed", self.request_id)
            if not self.status_sent:
                self.send_api_error(ApiError(500, "Internal error in OCP; see its log for "
                                             + self.request_id, "server_error", "internal_error"))
            self.close_connection = True
        self.wrap_up(key, started)

    def refuse(self, error: ApiError, key: str) -> None:
        """Answer a refusal in the route's shape — a wall as this client stops at it (wall_for) —
        recording a model route's usage row first (it says what the client got)."""
        if error.wall:
            error = wall_for(error, self.api, self.headers.get("User-Agent", ""),
                             self.server.config.wall_status == "429")
        if key in self.server.turn_routes and self.caller is not None and not self.admitted:
            # Before the answer leaves, as every usage row: a client that asks at once sees it.
            self.server.ledger.refused(self.caller, self.refused_model, self.request_id, error.status)
        self.send_api_error(error)

    def wrap_up(self, key: str, started: float) -> None:
        """After the answer: drain what the route did not read, count the response, log it."""
        if not self.body_read and not self.close_connection:
            self.discard_body()  # one request, one response: an unread body is no next request
        self.count_response(self.status_sent)  # (none left: the client hung up first, 0)
        if log.isEnabledFor(logging.INFO):  # the access line, made directly: no caller lookup for it
            record = logging.LogRecord(log.name, logging.INFO, "", 0, "%s %s %s %s",
                                       (self.request_id, self.command, key, self.status_sent), None)
            record.__dict__.update(request_id=self.request_id, method=self.command, route=key,
                                   status=self.status_sent, ms=int((time.monotonic() - started) * 1000),
                                   caller=self.caller.name if self.caller else None)
            log.handle(record)

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        """Count the response as its status line goes out, before its body: a client that asks
        /metrics right after its answer finds it counted."""
        self.count_response(code)
        super().send_response(code, message)

    def count_response(self, code: int) -> None:
        if self.counted_as:
            self.server.metrics.respond(self.counted_as[0], self.counted_as[1], code)
            self.counted_as = None

    def send_api_error(self, error: ApiError) -> None:
        """Answer with `error`; a client that already left gets nothing and no traceback."""
        if error.status >= 500 or error.status == 429 or error.wall:
            log.warning("%s %s %s", self.request_id, error.status, error.message[:200])
        try:  # (a wall's body names no request id: its digits could match a retry pattern; the header has it)
            self.send_json(error.status, self.error_body(error, "" if error.wall else self.request_id),
                           error.headers)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

    def authenticate(self, access: str) -> Caller:
        """Return the caller (Server.authenticate); a refused one's body is drained first."""
        try:
            return self.server.authenticate(self.headers, access)
        except ApiError:
            self.discard_body()
            raise

    def check_browser_safety(self) -> None:
        """403 for a foreign Host (DNS rebinding) or a cross-site browser request."""
        server = self.server
        if not host_allowed(self.headers.get("Host", ""), server.config, server.own_names):
            self.discard_body()
            raise ApiError(403, "This Host is not served here. The operator can list it in "
                           "OCP_ALLOWED_HOSTS.", "permission_error", "host_not_allowed")
        allowed, origin = origin_verdict(self.headers, server.config)
        if not allowed:
            self.discard_body()
            raise ApiError(403, "Cross-site browser requests are refused. The operator can list the "
                           "site in OCP_CORS_ORIGINS.", "permission_error", "cross_origin_forbidden")
        if origin:
            self.response_headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})

    def answer_preflight(self, methods: List[str]) -> None:
        self.discard_body()
        self.send_response(204)
        self.status_sent = 204
        for name, value in dict(self.response_headers, **{
                "Access-Control-Allow-Methods": ", ".join(methods),
                "Access-Control-Allow-Headers": "Authorization, Content-Type, x-api-key",
                "Access-Control-Max-Age": "600", "Content-Length": "0"}).items():
            self.send_header(name, value)
        self.end_headers()

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (bad request line, huge headers) in OpenAI's shape."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # unparsable line: answer with a status line anyway
            self.request_version = "HTTP/1.1"
        if code == 501:  # an unknown method is the client's mistake, as on any known route
            code, message = 405, f"{self.command[:20]} is not a method OCP serves"
        elif code == 505:
            code, message = 400, "Only HTTP/1.0 and HTTP/1.1 are served"
        self.send_api_error(ApiError(code, message or "Bad request", "invalid_request_error",
                                     "bad_request"))

    def send_json(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
        try:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from somewhere: \u-escaped JSON still says it
            data = json.dumps(body).encode("ascii")
        self.send_body(status, data, "application/json", headers)

    def send_body(self, status: int, data: bytes, content_type: str,
                  headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.status_sent = status
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", self.request_id or "-")
        for name, value in dict(self.response_headers, **(headers or {})).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")  # end_headers, and the body in the same write: one
        if self.command != "HEAD":  # segment, one syscall (http.server writes them apart)
            self._headers_buffer.append(data)
        self.flush_headers()

    def send_event_stream(self) -> None:
        self.send_response(200)
        self.status_sent = 200
        for name, value in SSE_HEADERS.items():
            self.send_header(name, value)
        self.send_header("x-request-id", self.request_id)
        for name, value in self.response_headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

    def read_body(self) -> bytes:
        """Return the whole request body; 413 (and close) past the cap, 400 when malformed.

        The body has one deadline as a whole (Server.body_timeout_s), however it is framed.
        """
        if self.body_read:
            return b""
        self.body_read = True
        cap = self.server.config.max_body_bytes
        encoding = self.headers.get("Transfer-Encoding")
        lengths = set(v.strip() for v in self.headers.get_all("Content-Length") or ())
        if encoding is not None:
            self.close_connection = True  # a body framed two ways must not frame the next request
            if encoding.strip().lower() != "chunked":
                raise bad_request("Only 'Transfer-Encoding: chunked' is accepted", None, "bad_request")
        elif len(lengths) > 1:
            self.close_connection = True
            raise bad_request("The request has conflicting Content-Length headers", None, "bad_request")
        elif lengths and not re.fullmatch(r"[0-9]{1,18}", next(iter(lengths))):
            self.close_connection = True
            raise bad_request("Content-Length is not a number", None, "bad_request")
        elif not lengths:
            return b""
        watch = self.server.deadlines.watch(self.connection, self.server.body_timeout_s)
        try:
            if encoding is not None:
                return read_chunked(self.rfile, cap)
            length = int(next(iter(lengths)))
            if length > cap:
                self.close_connection = True
                raise ApiError(413, f"The request body is {length} bytes; the limit is {cap}.",
                               "invalid_request_error", "request_too_large")
            return read_exactly(self.rfile, length)
        except ClientGone:
            if self.server.deadlines.done(watch):
                self.close_connection = True
                raise ApiError(408, "The request body arrived too slowly.", code="request_timeout") from None
            raise
        finally:
            self.server.deadlines.done(watch)

    def discard_body(self) -> None:
        """Consume a body we won't use so it isn't parsed as the next request; one over the cap,
        malformed or cut short closes the connection instead."""
        try:
            self.read_body()
        except (ApiError, ClientGone, OSError):
            self.close_connection = True

    def read_json(self) -> Any:
        return parse_json_body(self.read_body())

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """(OCP's own access line is written once the answer is out: wrap_up.)"""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def audit(self, action: str, target: str, detail: str) -> None:
        self.server.store.audit(f"http:{self.client_address[0]}", action, target, detail, self.server.wall())


###############################################################################
# Admin CLI ###################################################################
###############################################################################


def self_command(config: Config) -> str:
    """How the owner runs OCP here: `ocp` when install.sh's command started us (it loads the
    settings file too), else python3 and this file's path."""
    return config.environ.get("OCP_COMMAND") or f"python3 {os.path.join(HERE, 'ocp.py')}"


def hold_home_lock(config: Config) -> Any:
    """Take OCP_HOME's serve lock, or exit: a second daemon would end the first one's CLIs and
    release its quota reservations as stale. The lock goes with the process, however it ends."""
    import fcntl  # Unix only, as the daemon is
    os.makedirs(config.home, mode=0o700, exist_ok=True)
    handle = open(os.path.join(config.home, "serve.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SystemExit(f"ocp: another OCP is already running with OCP_HOME={config.home}")
    return handle


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    lock = hold_home_lock(config)
    models = Models.load(os.path.join(HERE, "models.json"))
    store = open_store(config)
    store.cancel_stale()
    admin_key = load_admin_key(config, create=True)  # every mode: the owner's way into the dashboard
    runner = Runner(config)
    runner.prepare()
    open_files = raise_open_files_limit()
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a SIGTERM once the port answers waits for its handler
    try:
        server = Server(config, models, runner, store, admin_key)
    except OSError as e:
        raise SystemExit(f"ocp: cannot listen on {config.bind}:{config.port}: {e.strerror}")
    stop = install_shutdown(server)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    setup_logging(config, server.ring)
    tighten_home(config)
    stop_housekeeping = threading.Event()
    threading.Thread(target=housekeeping, args=(server, stop_housekeeping), name="ocp-housekeeping",
                     daemon=True).start()
    if runner.claude:
        log.info("claude CLI: %s", runner.claude)
        threading.Thread(target=runner.version, name="ocp-version", daemon=True).start()  # (cached: no request
        # for a model with a minimum CLI version waits for `claude --version`)
    else:
        log.warning("claude CLI not found: completions answer 503 until it is installed "
                    "(npm i -g @anthropic-ai/claude-code)")
    log.info("OCP %s listening on http://%s:%d (auth: %s; %d connections at once, %d open files)", __version__,
             config.bind, server.server_address[1], config.auth_mode, server.connections.cap, open_files)
    log.info("dashboard: http://%s:%d/dashboard (%s)", "127.0.0.1" if config.bind in ("0.0.0.0", "::") else config.bind,
             server.server_address[1], admin_login_hint(config))
    server.serve_forever(poll_interval=0.1)  # how soon a SIGTERM's shutdown is noticed
    stop.wait()
    stop_housekeeping.set()
    store.close()
    for handler in log.handlers:
        handler.close()
    lock.close()
    return 0


def install_shutdown(server: Server) -> threading.Event:
    """On SIGTERM/SIGINT: stop accepting, let in-flight work finish briefly, kill the rest."""
    done = threading.Event()

    def shut_down() -> None:
        refused = server.runner.stop()  # the queue is refused (503) and nothing new starts
        server.shutdown()
        server.parks.close()  # a parked CLI waits for a client that would find no daemon
        server.runner.pool.close()
        server.wait_for(lambda: not server.runner.live(), 3)
        cancelled = server.runner.cancel_all("shutdown")
        server.wait_for(lambda: not server.runner.live(), KILL_GRACE_S + 1)
        server.wait_for(lambda: server.active_requests == 0, 5)  # their errors reach the clients
        server.server_close()
        server.runner.sweeper.drain()
        server.runner.keeper.close()
        server.store.cancel_stale()
        log.info("stopped (%d runs cancelled, %d queued requests refused)", cancelled, refused)
        done.set()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=shut_down, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done


def cmd_health(args: argparse.Namespace, config: Config) -> int:
    runner = Runner(config)
    detail = {"claude": runner.claude or None, "claude_version": runner.version() or None,
              "max_concurrent": config.max_concurrent, "max_queue": config.max_queue,
              "timeout_ms": config.timeout_ms, "auth_mode": config.auth_mode,
              "credentials": resolve_credentials(config.environ, config.user_home, time.time(),
                                                 keychain=macos_keychain).source,
              "daemon": daemon_health(config)}
    if args.json:
        print(json.dumps(detail, indent=2))
    else:
        for name, value in detail.items():
            print(f"{name:<16} {value if value is not None else '-'}")
    return 0 if runner.claude else 1


def daemon_health(config: Config) -> str:
    body = daemon_get(config, "/health")
    return body.get("status", "?") if body else "not running"


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    models = Models.load(os.path.join(HERE, "models.json"))
    if args.json:
        print(json.dumps([model_object(m) for m in models.models], indent=2))
        return 0
    print(f"{'id':<28} {'context':>9} {'output':>8}  aliases")
    for m in models.models:
        print(f"{m.id:<28} {m.context_window:>9} {m.max_output:>8}  {', '.join(m.aliases)}")
    return 0


def tighten_home(config: Config) -> None:
    """Give every file of OCP_HOME back its private mode, whatever an operator did since."""
    tighten(config.home, 0o700)
    logs = os.path.join(config.home, "logs")
    for path, mode in ((logs, 0o700), (config.spawn_dir, 0o700)):
        if os.path.isdir(path):
            tighten(path, mode)
    private = [config.db_path, config.db_path + "-wal", config.db_path + "-shm", config.settings_path,
               os.path.join(config.home, "admin-key")]
    if os.path.isdir(logs):
        private += [os.path.join(logs, name) for name in os.listdir(logs)]
    for path in private:
        if os.path.isfile(path):
            tighten(path, 0o600)


def housekeeping(server: "Server", stop: threading.Event, every_s: float = 86400) -> None:
    """Once a day: fold old usage into daily totals, drop old audit rows (bounded bookkeeping)."""
    while True:
        config = server.config
        try:
            folded, dropped = server.store.prune(server.wall(), config.usage_retention_days,
                                                 config.audit_retention_days)
            if folded or dropped:
                log.info("retention: %d usage rows folded into daily totals, %d audit rows dropped", folded, dropped)
        except sqlite3.Error as e:
            log.warning("retention could not run: %s", e)
        if stop.wait(every_s):
            return


def open_store(config: Config) -> Store:
    """Open OCP_HOME's database (the owner's files: 0700 home, 0600 database)."""
    os.makedirs(config.home, mode=0o700, exist_ok=True)
    tighten(config.home, 0o700)
    return Store(config.db_path)


def print_table(rows: List[Dict[str, Any]], columns: List[Tuple[str, str]]) -> None:
    """Print rows as an aligned table; `columns` are (field, heading)."""
    cells = [[heading for _, heading in columns]]
    for row in rows:
        cells.append(["-" if row.get(f) is None else str(row.get(f)) for f, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def key_row(key: ApiKey, now_s: float) -> Dict[str, Any]:
    row = dict(key.public(now_s), **{f.name: f.metadata["kind"].cell(getattr(key.policy, f.name)) for f in KEY_FIELDS})
    row["created"] = time.strftime("%Y-%m-%d", time.localtime(key.created_at))
    return row


KEY_COLUMNS = [("id", "ID"), ("name", "NAME"), ("prefix", "KEY"), ("status", "STATUS"), ("created", "CREATED")] + [
    (f.name, f.metadata["heading"]) for f in KEY_FIELDS if f.metadata["heading"]]


def cmd_keys_list(args: argparse.Namespace, config: Config) -> int:
    keys, now = open_store(config).keys(), time.time()
    if args.json:
        print(json.dumps([k.public(now) for k in keys], indent=2))
    elif not keys:
        print(f"No keys yet. Create one with: {self_command(config)} keys add NAME")
    else:
        print_table([key_row(k, now) for k in keys], KEY_COLUMNS)
    return 0


def policy_changes(args: argparse.Namespace) -> Dict[str, Any]:
    """The per-key fields the command line set (absent ones are left alone), as the API's JSON."""
    return {f.name: getattr(args, f.name) for f in KEY_FIELDS if hasattr(args, f.name)}


def cmd_keys_add(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config)
    name = check_key_name(args.name)
    policy = KeyPolicy().updated(policy_changes(args), Models.load(os.path.join(HERE, "models.json")), time.time())
    key, secret = store.add_key(name, policy, time.time())
    store.audit("cli", "key.add", name, json.dumps(policy.as_json()), time.time())
    if args.json:
        print(json.dumps(dict(key.public(time.time()), key=secret), indent=2))
        return 0
    print(f"Key created for {name!r}:\n\n    {secret}\n")
    print("Copy it now: OCP keeps only its hash and cannot show it again.")
    shown = policy.as_json()
    order = QUOTA_FIELDS + tuple(f for f in shown if f not in QUOTA_FIELDS + ("models",))  # quotas first
    limits = ", ".join(f"{f} {shown[f]}" for f in order if shown[f] is not None)
    print(f"Quota: {limits or 'unlimited'}; models: {', '.join(key.models) if key.models else 'all'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config)
    key = store.find_key(args.name)
    revoked = store.revoke_key(key, time.time())
    store.audit("cli", "key.revoke", key.name, "", time.time())
    if args.json:
        print(json.dumps({"name": key.name, "revoked": revoked}))
    else:
        print(f"Revoked {key.name!r}." if revoked else f"{key.name!r} was already revoked.")
    return 0


def cmd_keys_quota(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config)
    key = store.find_key(args.name)
    changes = policy_changes(args)
    if changes:
        key = store.set_policy(key, key.policy.updated(changes, Models.load(os.path.join(HERE, "models.json")),
                                                       time.time()))
        store.audit("cli", "key.quota", key.name, json.dumps(changes, sort_keys=True), time.time())
    report = quota_report(store, key, time.time(), config.tzinfo)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{key.name} ({key.prefix}…, {key.status(time.time())}); models: "
          f"{', '.join(key.models) if key.models is not None else 'all'}")
    for window in report["windows"]:
        window["resets"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(window["resets_at"])) + \
            f" (in {window['resets_in']})"
        window["limit"] = "unlimited" if window["limit"] is None else window["limit"]
    print_table(report["windows"], [("quota", "QUOTA"), ("used", "USED"), ("limit", "LIMIT"),
                                    ("unit", "UNIT"), ("resets", "RESETS")])
    return 0


def cmd_usage(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config)
    until = int(time.time()) + 1
    since = parse_time(args.since, "--since") if args.since else until - 1 - args.hours * 3600
    if args.by_key:
        share = PlanLimits(store.load_state("plan")).share_report(time.time())
        rows = [dict(row, **share_columns(share, account_label(row["key_id"], row["key_name"])))
                for row in store.usage_by_key(since, until)]
        rows += [dict({"key_name": OUTSIDE}, **share_columns(share, OUTSIDE))] if any(
            k["key"] == OUTSIDE for w in share["windows"].values() for k in w["keys"]) else []
        columns = [("key_name", "KEY"), ("requests", "REQUESTS"), ("ok", "OK"), ("errors", "ERRORS"),
                   ("cancelled", "CANCELLED"), ("refused", "REFUSED"), ("prompt_tokens", "PROMPT"),
                   ("completion_tokens", "COMPLETION"), ("cost_usd", "COST$"), ("share_5h_pct", "~% 5H"),
                   ("share_7d_pct", "~% WEEK"), ("avg_ms", "AVG MS"), ("last", "LAST")]
    else:
        key_name = store.find_key(args.key).name if args.key else None
        rows = store.usage_rows(None, None, since, until, args.limit)
        rows = [r for r in rows if key_name is None or r["key_name"] == key_name]
        columns = [("time", "TIME"), ("key_name", "KEY"), ("model", "MODEL"), ("status", "STATUS"),
                   ("http_status", "HTTP"), ("prompt_tokens", "PROMPT"), ("completion_tokens", "COMPLETION"),
                   ("duration_ms", "MS")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        for field, stamp in (("last", "last_at"), ("time", "created_at")):
            if row.get(stamp):
                row[field] = time.strftime("%Y-%m-%d %H:%M", time.localtime(row[stamp]))
    if not rows:
        print("No requests in that period.")
    else:
        print_table(rows, columns)
        if args.by_key:
            print("\n~% 5H, ~% WEEK: " + SHARE_NOTE)
    return 0


def admin_login_hint(config: Config) -> str:
    """How the owner logs in to the dashboard, naming where the admin key is (never the key)."""
    if config.admin_key:
        return "log in with the admin key, OCP_ADMIN_KEY"
    return f"log in with the admin key in {os.path.join(config.home, 'admin-key')}"


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    admin_key = load_admin_key(config, create=False)
    body = daemon_get(config, "/health", admin_key)
    if body is None:
        print(f"ocp: the daemon is not answering on port {config.port}; start it with: {self_command(config)} serve",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    detail = body.get("detail")
    print(f"status {body['status']}  version {body['version']}  auth {body['authMode']}")
    print(f"dashboard: http://127.0.0.1:{config.port}/dashboard ({admin_login_hint(config)})")
    if detail is None:
        print("(no admin key here: set OCP_ADMIN_KEY for the detail)")
        return 0
    slots = detail["slots"]
    print(f"claude {detail['claude_version'] or '-'} at {detail['claude'] or 'not found'}")
    print(f"CLI processes {slots['running']}/{slots['limit']} running, {slots['queued']} queued; "
          f"keys {', '.join(f'{n} {status}' for status, n in detail['keys'].items())}; "
          f"up {format_wait(detail['uptime_s'])}")
    plan = detail["plan"]
    for window in plan["windows"]:
        used = window["utilization_pct"]
        print(f"plan {window['window']}: {'-' if used is None else f'{used:.0f}%'} used ({window['label']}), "
              f"resets in {window['resets_in']} ({local_time(window['resets_at'])})")
        shares = (plan["share"]["windows"].get(window["window"]) or {}).get("keys") or []
        if shares:
            print("  ~ " + ", ".join(f"{k['key']} {k['share_pct']:g}%" for k in shares) + " (estimated)")
        print(f"  forecast (an estimate): {forecast_line(window['forecast'])}")
    for hold in plan["held_models"]:
        print(f"held: {hold['models']} models until {local_time(hold['until'])} ({hold['message']})")
    spent = plan["overage_spent"]
    print(f"extra usage on the account: {plan['extra_usage']}"
          + (f", paying answers now (until {time.strftime('%Y-%m-%d %H:%M', time.localtime(plan['overage_until']))})"
             if plan["overage"] else "")
          + f"; OCP's answers paid from it: {spent['requests']} (~${spent['cost_usd']:.2f})"
          + ("; OCP_PLAN_ONLY refuses them" if config.plan_only else ""))
    if body.get("reason"):
        print(f"why: {body['reason']}")
    return 0


def forecast_line(ahead: Dict[str, Any]) -> str:
    """A window's forecast for `status`: the estimate, what it rests on, who drives the pace."""
    line = ahead["text"]
    basis = ahead["based_on"]
    if basis["readings"]:
        line += f" ({basis['readings']} readings over the last {basis['span_minutes']} min)"
    if ahead["drivers"]:
        line += "; pace from " + ", ".join(f"{d['key']} {d['share_pct']:g}%" for d in ahead["drivers"])
    return line


def daemon_get(config: Config, path: str, key: str = "") -> Optional[Dict[str, Any]]:
    """GET a route of the running daemon as JSON, or None when it does not answer.

    /health answers 503 with its JSON while the daemon cannot serve: that is an answer too.
    """
    answer = daemon_call(config, "GET", path, key)
    wanted = (200, 503) if path == "/health" else (200,)
    return answer[1] if answer and answer[0] in wanted and isinstance(answer[1], dict) else None


def daemon_call(config: Config, method: str, path: str, key: str = "",
                body: Any = None) -> Optional[Tuple[int, Any]]:
    """Call the running daemon; return (status, parsed body), or None when nothing answers."""
    import urllib.error
    import urllib.request  # command-line only
    host = "127.0.0.1" if config.bind in ("0.0.0.0", "") else ("::1" if config.bind == "::" else config.bind)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{config.port}{path}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body).encode() if body is not None else None
    if data:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (OSError, ValueError):
        return None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def admin_call(config: Config, method: str, path: str, body: Any = None) -> Optional[Any]:
    """Call an admin route of the running daemon; None when it is not running; ApiError on refusal."""
    answer = daemon_call(config, method, path, load_admin_key(config, create=False), body)
    if answer is None:
        return None
    status, payload = answer
    if status >= 400:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        raise ApiError(status, error.get("message") or f"the daemon answered {status}", code=error.get("code"))
    return payload


def cmd_settings(args: argparse.Namespace, config: Config) -> int:
    """Show or change runtime settings: through the daemon, or in settings.json when it is down."""
    if args.value is not None:
        try:
            value = check_tunable(args.name, args.value)
        except ConfigError as e:
            raise ApiError(400, str(e))
        result = admin_call(config, "PATCH", "/settings", {args.name: value})
        if result is None:
            write_settings_file(config.settings_path, {args.name: value})
            print(f"{args.name} = {value} saved in {config.settings_path}; OCP is not running, so it "
                  "takes effect when it starts.")
            return 0
        print(f"{args.name} = {result['settings'][args.name]['value']} (in effect now, saved)")
        for name in result["overridden_at_start_by"]:
            print(f"note: {name} is set in the environment and will win at the next start")
        return 0
    view = admin_call(config, "GET", "/settings")
    if view is None:
        view = settings_view(config)
        print("(OCP is not running: showing what it would start with)", file=sys.stderr)
    if args.name:
        if args.name not in view:
            raise ApiError(400, f"unknown setting {args.name!r}; known: {', '.join(RUNTIME_SETTINGS)}")
        view = {args.name: view[args.name]}
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print_table([dict(v, name=k) for k, v in view.items()],
                    [("name", "SETTING"), ("value", "VALUE"), ("source", "FROM"), ("env", "ENV"),
                     ("min", "MIN"), ("max", "MAX")])
    return 0


def cmd_logs(args: argparse.Namespace, config: Config) -> int:
    answer = admin_call(config, "GET", f"/logs?n={args.n}&level={args.level}")
    if answer is not None:
        entries = answer["data"]
    else:
        entries = tail_log_file(os.path.join(config.home, "logs", "ocp.log"), args.n, args.level)
    for entry in entries:
        if args.json:
            print(json.dumps(entry, ensure_ascii=False))
        else:
            print(f"{entry['ts']} {entry['level']:<7} {entry['msg']}")
    return 0


def tail_log_file(path: str, n: int, level: str) -> List[Dict[str, Any]]:
    """The last `n` entries at `level` or above from the JSON log file (when the daemon is down)."""
    floor = logging.getLevelName(level.upper())
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in collections.deque(f, maxlen=20 * n):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if logging.getLevelName(entry.get("level", "INFO")) >= floor:
                    entries.append(entry)
    except FileNotFoundError:
        raise ApiError(404, f"No log yet at {path}: OCP has not run with this OCP_HOME.")
    return entries[-n:]


def cmd_sessions(args: argparse.Namespace, config: Config) -> int:
    if args.verb == "clear":
        result = admin_call(config, "DELETE", "/sessions")
    else:
        result = admin_call(config, "GET", "/sessions")
    if result is None:
        print("ocp: OCP is not running, so no CLI process is either.", file=sys.stderr)
        return 1
    if args.verb == "clear":
        print(json.dumps(result) if args.json else f"Cancelled {result['cancelled']} running CLI process(es).")
    elif args.json:
        print(json.dumps(result["data"], indent=2))
    elif not result["data"]:
        print("No CLI process is running.")
    else:
        print_table(result["data"], [("id", "ID"), ("pid", "PID"), ("key", "KEY"), ("model", "MODEL"),
                                     ("age_s", "AGE S")])
    return 0


# The service install.sh sets up; `restart` and `doctor` look for it under these names.
SYSTEMD_UNIT = "ocp.service"
LAUNCHD_LABEL = "com.ocp.daemon"
DISK_WARN_BYTES = 500 * 1024 * 1024


def check(id_: str, level: str, message: str, human: Optional[List[str]] = None,
          run: Optional[List[str]] = None) -> Dict[str, Any]:
    return {"id": id_, "level": level, "message": message, "human_required": human or [], "ai_executable": run or []}


def installed_service(config: Config) -> Optional[Tuple[str, str]]:
    """Return (kind, path) of an installed OCP service: systemd-user, systemd-system, launchd, cron."""
    candidates = (("systemd-user", os.path.join(config.user_home, ".config", "systemd", "user", SYSTEMD_UNIT)),
                  ("systemd-system", os.path.join("/etc/systemd/system", SYSTEMD_UNIT)),
                  ("launchd", os.path.join(config.user_home, "Library", "LaunchAgents", LAUNCHD_LABEL + ".plist")))
    for kind, path in candidates:
        if os.path.exists(path):
            return kind, path
    crontab = shutil.which("crontab", path=config.environ.get("PATH"))
    if crontab:
        try:
            listing = subprocess.run([crontab, "-l"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        if any(line.startswith("@reboot") and "ocp" in line for line in listing.splitlines()):
            return "cron", "crontab"
    return None


def doctor_checks(config: Config, live: bool = False) -> List[Dict[str, Any]]:
    """Everything OCP needs, checked locally; `live` also makes one real one-token request."""
    checks = [check("python", "ok" if sys.version_info >= (3, 9) else "fail",
                    f"Python {sys.version.split()[0]}" + ("" if sys.version_info >= (3, 9) else ": OCP needs 3.9+"),
                    [] if sys.version_info >= (3, 9) else ["Install Python 3.9 or newer"])]
    runner = Runner(config)
    if not runner.claude:
        checks.append(check("claude", "fail", "the claude CLI is not installed (or CLAUDE_BIN is wrong)",
                            ["Install Node.js 18+ if it is missing"], ["npm i -g @anthropic-ai/claude-code"]))
    else:
        version = runner.version()
        checks.append(check("claude", "ok" if version else "warn",
                            f"claude {version} at {runner.claude}" if version else
                            f"{runner.claude} does not answer --version", [] if version else
                            ["Reinstall it: npm i -g @anthropic-ai/claude-code"]))
        checks.append(models_check(version))
    try:
        checks.append(login_check(config, runner if live and runner.claude else None))
    finally:
        runner.keeper.close()
    checks += [port_check(config), service_check(config), database_check(config)]
    checks += permission_checks(config)
    checks.append(disk_check(config))
    return checks


def models_check(version: str) -> Dict[str, Any]:
    """The models of models.json the installed claude CLI is too old for."""
    unservable = unservable_models(Models.load(os.path.join(HERE, "models.json")), version)
    if not unservable:
        return check("models", "ok", f"claude {version or '(unknown version)'} can serve every listed model")
    return check("models", "warn", f"claude {version} is too old for " + ", ".join(
        f"{m['model']} (needs {m['needs']})" for m in unservable), [], ["claude update"])


def unservable_models(models: Models, version: str) -> List[Dict[str, str]]:
    return [{"model": m.id, "needs": m.min_cli} for m in models.models if not cli_fits(m, version)]


def login_check(config: Config, runner: Optional[Runner]) -> Dict[str, Any]:
    creds = resolve_credentials(config.environ, config.user_home, time.time(), keychain=macos_keychain)
    fix = ["On this machine run `claude setup-token`, then set CLAUDE_CODE_OAUTH_TOKEN=<token> in "
           "OCP's environment (or run `claude auth login`)"]
    verdicts = {"env": ("ok", "CLAUDE_CODE_OAUTH_TOKEN is set"),
                "login": ("ok", "the CLI's own login is valid"),
                "refresh": ("warn", "the CLI's login token is about to expire; the CLI refreshes it on the next request"),
                "none": ("fail", "no Claude login found for the CLI")}
    level, message = verdicts[creds.source]
    if runner is not None and level != "fail":
        error = live_request(runner)
        if error:
            return check("login", "fail", f"a real request failed: {error}", fix)
        message += "; a real one-token request worked"
    return check("login", level, message, fix if level == "fail" else [])


def live_request(runner: Runner) -> str:
    """Spend one tiny request to prove the login works (doctor --live only); return the error or ""."""
    runner.prepare()
    job = Job("haiku", "Reply with the single word OK.", ({"type": "text", "text": "ping"},), max_tokens=16,
              request_id="doctor", owner="doctor")
    answer = Answer()
    lease = runner.lease(job)
    try:
        for _ in lease.acquire():
            pass
        for event in lease.exchange(job.blocks):
            if event is not HEARTBEAT:
                answer.feed(event)
    except ApiError as e:
        return e.message
    finally:
        if answer.result is not None:
            lease.release()
        else:
            lease.kill()
    error = answer.error(time.time())
    return error.message if error and not answer.hit_max_tokens() else ""


def port_check(config: Config) -> Dict[str, Any]:
    if daemon_get(config, "/health") is not None:
        return check("port", "ok", f"OCP answers on {config.bind}:{config.port}")
    family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((config.bind, config.port))
        except OSError as e:
            return check("port", "fail", f"port {config.port} on {config.bind} is taken by another program "
                         f"({e.strerror})", ["Stop that program, or give OCP another port: CLAUDE_PROXY_PORT"])
    return check("port", "info", f"port {config.port} is free (OCP is not running)", [],
                 ["python3 " + os.path.join(HERE, "ocp.py") + " serve"])


def service_check(config: Config) -> Dict[str, Any]:
    service = installed_service(config)
    if service:
        return check("service", "ok", f"installed as a {service[0]} service ({service[1]})")
    return check("service", "warn", "no service starts OCP at boot",
                 ["Run install.sh to install one (systemd, launchd or cron)"])


def database_check(config: Config) -> Dict[str, Any]:
    if not os.path.exists(config.db_path):
        return check("database", "info", f"no database yet ({config.db_path}); it is made at the first start")
    try:
        db = sqlite3.connect(f"file:{config.db_path}?mode=ro", uri=True, timeout=5)
        try:
            verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as e:
        verdict = str(e)
    if verdict == "ok":
        return check("database", "ok", "integrity_check: ok")
    return check("database", "fail", f"the database is damaged: {verdict[:200]}",
                 [f"Stop OCP, move {config.db_path} aside and start again (keys must be re-created)"])


def permission_checks(config: Config) -> List[Dict[str, Any]]:
    wanted = [(config.home, 0o700), (config.db_path, 0o600), (os.path.join(config.home, "admin-key"), 0o600),
              (config.settings_path, 0o600), (os.path.join(config.home, "logs"), 0o700)]
    loose = []
    for path, mode in wanted:
        try:
            actual = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            continue
        if actual & ~mode:
            loose.append((path, mode, actual))
    if not loose:
        return [check("permissions", "ok", "OCP_HOME is private to its owner")]
    return [check("permissions", "warn", f"{path} is {actual:o}, should be {mode:o}", [],
                  [f"chmod {mode:o} {path}"]) for path, mode, actual in loose]


def disk_check(config: Config) -> Dict[str, Any]:
    path = config.home
    while not os.path.exists(path):
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    level = "ok" if free >= DISK_WARN_BYTES else ("warn" if free >= DISK_WARN_BYTES // 10 else "fail")
    return check("disk", level, f"{free // (1024 * 1024)} MiB free where OCP keeps its files",
                 [] if level == "ok" else ["Free some disk space"])


def next_action(checks: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What to do next, split into what needs a person and what an assistant can run."""
    todo = [c for c in checks if c["level"] in ("fail", "warn")]
    human = [step for c in todo for step in c["human_required"]]
    runnable = [step for c in todo for step in c["ai_executable"]]
    kind = "human_required" if human else ("run_commands" if runnable else "none")
    return {"kind": kind, "human_required": human, "ai_executable": runnable}


def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    checks = doctor_checks(config, args.live)
    action = next_action(checks)
    failed = any(c["level"] == "fail" for c in checks)
    if args.json:
        print(json.dumps({"checks": [{k: c[k] for k in ("id", "level", "message")} for c in checks],
                          "next_action": action}, indent=2))
        return 1 if failed else 0
    print_table(checks, [("level", "LEVEL"), ("id", "CHECK"), ("message", "DETAIL")])
    for step in action["human_required"]:
        print(f"to do: {step}")
    for step in action["ai_executable"]:
        print(f"run:   {step}")
    if action["kind"] == "none":
        print("All good.")
    return 1 if failed else 0


def lan_addresses(environ: Mapping[str, str]) -> List[str]:
    """This machine's IPv4 addresses on its networks (from `ip` or `ifconfig`; no traffic sent)."""
    found: List[str] = []
    for command in (["ip", "-o", "-4", "addr", "show", "scope", "global"], ["ifconfig"]):
        tool = shutil.which(command[0], path=environ.get("PATH"))
        if not tool:
            continue
        try:
            text = subprocess.run([tool] + command[1:], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found = [a for a in re.findall(r"inet (?:addr:)?(\d+\.\d+\.\d+\.\d+)", text)
                 if not a.startswith("127.")]
        if found:
            break
    return list(dict.fromkeys(found))


def cmd_lan(args: argparse.Namespace, config: Config) -> int:
    addresses = lan_addresses(config.environ)
    info = {"bind": config.bind, "port": config.port, "addresses": addresses,
            "urls": [f"http://{a}:{config.port}/v1" for a in addresses], "auth_mode": config.auth_mode}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if addresses else 1
    if config.loopback:
        print(f"Note: OCP listens on {config.bind} only. For the LAN start it with --bind 0.0.0.0 "
              f"(and --auth-mode multi, then `{self_command(config)} keys add NAME` per person).")
    if not addresses:
        print("ocp: no LAN address found on this machine", file=sys.stderr)
        return 1
    key = f"<the key from `{self_command(config)} keys add NAME`>" if config.auth_mode == "multi" else \
        ("<PROXY_API_KEY>" if config.auth_mode == "shared" else "none")
    for address in addresses:
        print(f"{address}: http://{address}:{config.port}/v1")
    print("\nOn a client, run:")
    print(f"  export OPENAI_BASE_URL=http://{addresses[0]}:{config.port}/v1 OPENAI_API_KEY={key}")
    return 0


def cmd_restart(args: argparse.Namespace, config: Config) -> int:
    service = installed_service(config)
    if service is None:
        print("ocp: no OCP service is installed. Stop the running daemon (Ctrl-C, or `kill` its pid) and "
              f"start it again: {self_command(config)} serve. install.sh installs a service.", file=sys.stderr)
        return 1
    kind, path = service
    commands = {"systemd-user": ["systemctl", "--user", "restart", SYSTEMD_UNIT],
                "systemd-system": ["systemctl", "restart", SYSTEMD_UNIT],
                "launchd": ["launchctl", "kickstart", "-k", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"]}
    if kind not in commands:
        print(f"ocp: OCP starts from {path}; stop the running daemon and start it again by hand.", file=sys.stderr)
        return 1
    command = commands[kind]
    if kind == "systemd-system" and os.geteuid() != 0:
        print(f"ocp: the system service needs root: sudo {' '.join(command)}", file=sys.stderr)
        return 1
    tool = shutil.which(command[0], path=config.environ.get("PATH"))
    if not tool:
        print(f"ocp: {command[0]} is not on PATH; run: {' '.join(command)}", file=sys.stderr)
        return 1
    done = subprocess.run([tool] + command[1:], env=dict(config.environ), timeout=60)
    if done.returncode == 0:
        print(f"Restarted ({' '.join(command)}).")
    return 0 if done.returncode == 0 else 1


UPDATE_FILES = ("ocp.py", "models.json", "dashboard.html", "ocp_connect.py")
HEALTH_WAIT_S = 20


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def cmd_manifest(args: argparse.Namespace, config: Config) -> int:
    """Write DIR/manifest.json: the release's own version and the SHA-256 of each file `update` installs."""
    files = {name: file_sha256(os.path.join(args.dir, name)) for name in UPDATE_FILES
             if os.path.exists(os.path.join(args.dir, name))}
    try:
        with open(os.path.join(args.dir, "ocp.py"), encoding="utf-8") as f:
            version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    except OSError:
        version = None
    if version is None:
        print(f"ocp: {args.dir} has no ocp.py with a __version__: not a release folder", file=sys.stderr)
        return 1
    manifest = {"version": version.group(1), "files": files}
    with open(os.path.join(args.dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    print(f"wrote manifest.json for {len(files)} files (version {version.group(1)})")
    return 0


def update_source(config: Config) -> str:
    """Where this install came from: OCP_UPDATE_URL, else the .source install.sh recorded."""
    source = config.environ.get("OCP_UPDATE_URL", "").strip()
    if not source:
        try:
            with open(os.path.join(HERE, ".source"), encoding="utf-8") as f:
                source = f.read().strip()
        except FileNotFoundError:
            pass
    if not source:
        raise ApiError(400, "No update source: set OCP_UPDATE_URL (install.sh records where it installed from).")
    return source


def fetch_release_file(source: str, name: str, limit: int = 16 * 1024 * 1024) -> bytes:
    """One file of a release from a URL or a directory."""
    if re.match(r"https?://", source):
        import urllib.error
        import urllib.request  # command-line only
        try:
            with urllib.request.urlopen(source.rstrip("/") + "/" + name, timeout=30) as response:
                return response.read(limit)
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(502, f"cannot fetch {name} from {source}: {getattr(e, 'reason', e)}")
    try:
        with open(os.path.join(source, name), "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise ApiError(502, f"cannot read {name} from {source}: {e.strerror}")


def fetch_release(source: str) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
    """The manifest and every file it names, each checked against its SHA-256; 1 exit on a mismatch."""
    try:
        manifest = json.loads(fetch_release_file(source, "manifest.json"))
        files = manifest["files"]
        assert isinstance(files, dict) and all(name in UPDATE_FILES for name in files)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ApiError(502, "the release's manifest.json is missing or malformed")
    contents = {}
    for name, expected in files.items():
        data = fetch_release_file(source, name)
        if hashlib.sha256(data).hexdigest() != expected:
            raise ApiError(502, f"{name} does not match its SHA-256 in the manifest: refusing the update")
        contents[name] = data
    return manifest, contents


def replace_files(contents: Mapping[str, bytes], keep_previous: bool) -> None:
    """Install new files next to ocp.py; the current ones go to .previous/ first."""
    previous = os.path.join(HERE, ".previous")
    if keep_previous:
        shutil.rmtree(previous, ignore_errors=True)
        os.makedirs(previous)
        for name in UPDATE_FILES:
            if os.path.exists(os.path.join(HERE, name)):
                shutil.copy2(os.path.join(HERE, name), os.path.join(previous, name))
    for name, data in contents.items():
        staged = os.path.join(HERE, name + ".new")
        with open(staged, "wb") as f:
            f.write(data)
        if name == "ocp.py":
            os.chmod(staged, 0o755)
        os.replace(staged, os.path.join(HERE, name))


def restart_and_check(args: argparse.Namespace, config: Config) -> Optional[bool]:
    """Restart the installed service and wait for /health: None when there is no service."""
    if installed_service(config) is None:
        print("No OCP service is installed: restart the daemon yourself to run the new version.")
        return None
    if cmd_restart(args, config) != 0:
        return False
    deadline = time.monotonic() + float(config.environ.get("OCP_UPDATE_HEALTH_WAIT_S") or HEALTH_WAIT_S)
    while time.monotonic() < deadline:
        body = daemon_get(config, "/health")
        if body and body.get("status") in ("ok", "degraded"):
            return True
        time.sleep(0.2)
    return False


def cmd_update(args: argparse.Namespace, config: Config) -> int:
    if args.rollback:
        return rollback(args, config)
    source = update_source(config)
    manifest, contents = fetch_release(source)
    changed = sorted(n for n, data in contents.items() if not os.path.exists(os.path.join(HERE, n))
                     or file_sha256(os.path.join(HERE, n)) != hashlib.sha256(data).hexdigest())
    if args.check:
        print(f"installed {__version__}, available {manifest.get('version', '?')}: " +
              (f"changed {', '.join(changed)}" if changed else "up to date"))
        return 0
    if not changed:
        print(f"Already up to date ({__version__}).")
        return 0
    replace_files(contents, keep_previous=True)
    print(f"Installed {manifest.get('version', '?')} ({', '.join(changed)}); the previous files are in .previous/")
    healthy = restart_and_check(args, config)
    if healthy is False:
        print("ocp: the new version did not come up healthy: rolling back", file=sys.stderr)
        rollback(args, config)
        return 1
    return 0


def rollback(args: argparse.Namespace, config: Config) -> int:
    previous = os.path.join(HERE, ".previous")
    names = [n for n in UPDATE_FILES if os.path.exists(os.path.join(previous, n))]
    if not names:
        raise ApiError(404, "There is no previous version to roll back to.")
    contents = {}
    for name in names:
        with open(os.path.join(previous, name), "rb") as f:
            contents[name] = f.read()
    replace_files(contents, keep_previous=False)
    print(f"Restored the previous {', '.join(names)}.")
    return 0 if restart_and_check(args, config) is not False else 1


def cmd_version(args: argparse.Namespace, config: Config) -> int:
    print(f"ocp {__version__}")
    return 0


def add_operation_commands(commands: Any) -> None:
    usage = commands.add_parser("usage", help="requests per key or one by one (from the database)")
    usage.add_argument("--by-key", action="store_true", help="totals per key")
    usage.add_argument("--hours", type=positive_int, default=24 * 30, help="look back this far (default 720)")
    usage.add_argument("--since", help="from this time (epoch seconds or ISO 8601) instead")
    usage.add_argument("--limit", type=positive_int, default=50, help="rows to show (default 50)")
    usage.add_argument("--key", help="only this key (name or id)")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(run=cmd_usage)
    settings = commands.add_parser("settings", help="show or change runtime settings (no restart)")
    settings.add_argument("name", nargs="?", help="one of " + ", ".join(RUNTIME_SETTINGS))
    settings.add_argument("value", nargs="?", help="the new value")
    settings.add_argument("--json", action="store_true")
    settings.set_defaults(run=cmd_settings)
    logs = commands.add_parser("logs", help="recent log entries of the daemon")
    logs.add_argument("n", nargs="?", type=positive_int, default=50, help="how many (default 50)")
    logs.add_argument("--level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    logs.add_argument("--json", action="store_true")
    logs.set_defaults(run=cmd_logs)
    sessions = commands.add_parser("sessions", help="running CLI processes; `sessions clear` cancels them")
    sessions.add_argument("verb", nargs="?", choices=("list", "clear"), default="list")
    sessions.add_argument("--json", action="store_true")
    sessions.set_defaults(run=cmd_sessions)
    doctor = commands.add_parser("doctor", help="check everything OCP needs; --json for an assistant")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--live", action="store_true", help="also make one real one-token request")
    doctor.set_defaults(run=cmd_doctor)
    lan = commands.add_parser("lan", help="this machine's LAN addresses and the line to run on a client")
    lan.add_argument("--json", action="store_true")
    lan.set_defaults(run=cmd_lan)
    commands.add_parser("restart", help="restart the installed service").set_defaults(run=cmd_restart)
    update = commands.add_parser("update", help="install the newer release from where OCP was installed")
    update.add_argument("--check", action="store_true", help="only say whether there is one")
    update.add_argument("--rollback", action="store_true", help="go back to the previous version")
    update.set_defaults(run=cmd_update)
    manifest = commands.add_parser("manifest", help="write DIR/manifest.json for publishing a release")
    manifest.add_argument("dir")
    manifest.set_defaults(run=cmd_manifest)
    status = commands.add_parser("status", help="ask the running daemon how it is (with the admin key)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocp.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ocp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the daemon",
                                description="Run the OCP daemon. Each flag overrides its "
                                            "environment variable (shown in brackets).")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for setting in SETTINGS:
        if setting.kind != "secret":
            add_setting_flag(serve, setting, defaults.get(setting.field))
    serve.set_defaults(run=cmd_serve)
    health = commands.add_parser("health", help="local detail: claude path and version, limits")
    health.add_argument("--json", action="store_true")
    health.set_defaults(run=cmd_health)
    models = commands.add_parser("models", help="model ids and aliases")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=cmd_models)
    commands.add_parser("version", help="print the version").set_defaults(run=cmd_version)
    add_key_commands(commands)
    add_operation_commands(commands)
    return parser


def add_setting_flag(serve: argparse.ArgumentParser, setting: Setting, default: Any) -> None:
    """`serve`'s flag for a setting: its help, its default, its environment variable."""
    field, flag = setting.field, setting.flag
    shown = "the machine's" if field == "timezone" else ("~/.ocp" if field == "home" else default)
    text = f"{setting.help} (default: {shown if shown not in ('', ()) else 'unset'}) [{setting.env}]"
    text = text.replace("%", "%%")
    if setting.kind == "bool" and flag.startswith("--no-"):  # --no-context / --with-context
        group = serve.add_mutually_exclusive_group()
        group.add_argument(flag, dest=field, action="store_const", const="true", help=text)
        group.add_argument("--with-" + flag[5:], dest=field, action="store_const", const="false",
                           help=f"the opposite of {flag}")
    elif setting.kind == "bool":
        serve.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=text)
    else:
        meta = {"int": "N", "float": "N", "list": "LIST"}.get(setting.kind, "VALUE")
        serve.add_argument(flag, dest=field, metavar=meta, help=text)


def positive_int(text: str) -> int:
    if not digits(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def add_key_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="per-person API keys: list, add, revoke, quota")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(run=cmd_keys_list)
    verbs = keys.add_subparsers(dest="verb", metavar="VERB")
    listing = verbs.add_parser("list", help="all keys (never the secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_keys_list)
    add = verbs.add_parser("add", help="create a key and print it once")
    add.add_argument("name")
    revoke = verbs.add_parser("revoke", help="revoke a key (name or id)")
    revoke.add_argument("name")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(run=cmd_keys_revoke)
    quota = verbs.add_parser("quota", help="show a key's quotas and usage, or change them")
    quota.add_argument("name")
    for parser, run in ((add, cmd_keys_add), (quota, cmd_keys_quota)):
        for field in KEY_FIELDS:
            kind = field.metadata["kind"]
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind.cli,
                                default=argparse.SUPPRESS, metavar=kind.metavar, help=field.metadata["help"]
                                + (" ('none' = unlimited)" if field.metadata["window"] else ""))
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(run=run)


###############################################################################
# Main ########################################################################
###############################################################################


def reexec_from_cache(argv: List[str]) -> None:
    """Run `serve` from ocp's bytecode cache instead of this compiled-as-__main__ copy.

    `python3 ocp.py` compiles all of this file in memory, and the heap it leaves
    (~3 MB) would stay with a daemon that runs for months. exec keeps the pid, so
    service managers see nothing; where __pycache__ cannot be written it just
    compiles again, as before.
    """
    if __name__ != "__main__" or sys.flags.dont_write_bytecode:
        return  # after the exec this module is `ocp`, not __main__: it cannot loop
    bootstrap = f"import sys; sys.path.insert(0, {HERE!r}); import ocp; sys.exit(ocp.main())"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", bootstrap] + argv)


def main(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Run one command; return its exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    flags = {s.field: getattr(args, s.field, None) for s in SETTINGS}
    try:
        config = load_config(os.environ if environ is None else environ, flags)
    except ConfigError as e:
        print(f"ocp: {e}", file=sys.stderr)
        return 2
    try:
        return args.run(args, config)
    except ApiError as e:
        print(f"ocp: {e.message}", file=sys.stderr)
        return 2 if e.status == 400 else 1  # a bad argument is a usage error
    except (sqlite3.Error, OSError) as e:
        print(f"ocp: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        reexec_from_cache(sys.argv[1:])
    sys.exit(main())
