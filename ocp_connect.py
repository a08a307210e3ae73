#!/usr/bin/env python3
"""Point this machine's shells and AI tools at an OCP server. Needs only python3.

    curl -fsSL http://SERVER:3456/connect.py | python3 - SERVER [--key KEY]
    python3 ocp_connect.py SERVER [--key KEY] [--dry-run] [--verify] [--uninstall] [--json]

It checks the server (/health), takes an advertised guest key when no key is given,
verifies the key (/v1/models), then configures each tool it finds in that tool's own
config — an OCP provider or models with OCP's key, never the tool's OpenAI settings:
Continue, opencode, Aider, llm and OpenClaw. ~/.config/ocp/env (0600, sourced from the
bash/zsh/fish rc files it finds) carries OCP_BASE_URL and OCP_API_KEY for scripts;
global OPENAI_* exports only with --shell-env, and not over OpenAI settings of the
user's own unless --force. --uninstall removes exactly what it added: its marked
blocks and its own config entries, keeping every later edit (byte for byte the
original when nothing was edited since). Cline and Cursor: it prints the steps.
"""

import argparse
import datetime
import difflib
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request

BEGIN, END = ">>> ocp >>>", "<<< ocp <<<"
# How a change is undone: the file is ours / our marked blocks / a whole value of ours the owner may
# replace later (left alone then) / ("json", our key paths, [[key path, the owner's earlier value]]).
OWN, BLOCK, WHOLE = ("own",), ("block",), ("whole",)
FIXED = ("fixed",)  # a repair of what an older ocp_connect wrote: not undone
PREFERRED_MODELS = ("claude-sonnet-5-5", "claude-opus-5-5", "claude-haiku-5-5")
DEFAULT_LIMITS = (200000, 32000)  # (context window, max output) when the server does not say


class ConnectError(Exception):
    """A problem to report in one line; exit 1."""


# -- the server ------------------------------------------------------------------


def server_base(server: str, port: int) -> str:
    """Return http://host:port for 'host', 'host:port' or a URL."""
    server = server.strip().rstrip("/")
    if re.match(r"https?://", server):
        base = server[:-3] if server.endswith("/v1") else server
        return base.rstrip("/")
    if re.fullmatch(r"[^:/\s]+:\d+", server) or server.startswith("["):
        return "http://" + server
    return f"http://{server}:{port}"


def call(url: str, key: str = "", body=None, timeout: float = 15):
    """GET or POST JSON; return (status, parsed body)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectError(f"cannot reach {url}: {getattr(e, 'reason', e)}")


def discover(base: str, key: str):
    """Check the server and the key; return (key, key source, model ids)."""
    status, health = call(base + "/health")
    if status != 200 or not isinstance(health, dict):
        raise ConnectError(f"{base} does not answer like an OCP server (/health gave {status})")
    source = "given"
    if not key and health.get("anonymousKey"):
        key, source = health["anonymousKey"], "advertised by the server"
    if not key and health.get("authMode") == "none":
        key, source = "ocp-no-key-needed", "none needed"
    if not key:
        raise ConnectError(f"{base} needs a key (auth mode {health.get('authMode')}): ask its owner to run "
                           "`ocp keys add NAME`, then pass --key")
    status, models = call(base + "/v1/models", key)
    if status == 401:
        raise ConnectError("the server refused that key (401)")
    if status != 200:
        raise ConnectError(f"/v1/models answered {status}")
    data = [m for m in models.get("data", []) if isinstance(m, dict) and m.get("id")]
    limits = {m["id"]: (m.get("context_window") or DEFAULT_LIMITS[0], m.get("max_output_tokens") or DEFAULT_LIMITS[1])
              for m in data}
    return key, source, [m["id"] for m in data], limits


def chosen_models(ids):
    picked = [m for m in PREFERRED_MODELS if m in ids]
    return picked or ids[:3]


# -- planning changes ------------------------------------------------------------


def read_text(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def marked(lines, comment="#", indent=""):
    body = "\n".join(lines)
    return f"{indent}{comment} {BEGIN}\n{body}\n{indent}{comment} {END}\n"


BLOCK_PATTERN = re.compile(rf"^[ \t]*# {re.escape(BEGIN)}\n.*?^[ \t]*# {re.escape(END)}\n?", re.S | re.M)


def without_blocks(text):
    """`text` with every block of ours removed (the conda convention: only what is between the marks)."""
    return BLOCK_PATTERN.sub("", text)


def with_block(text, block):
    """Return `text` with our marked block replaced, or appended when there is none."""
    text = text or ""
    if BLOCK_PATTERN.search(text):
        return BLOCK_PATTERN.sub(lambda m: block, text, count=1)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + block


def quoted(value):
    return "'" + value.replace("'", "'\\''") + "'"


def plan_environment(home, api, key, platform, shell_env):
    """The env files and the rc blocks that load them: OCP_* always, OPENAI_* only with --shell-env."""
    config = os.path.join(home, ".config", "ocp")
    names = [("OCP_BASE_URL", api), ("OCP_API_KEY", key)]
    if shell_env:
        names += [("OPENAI_BASE_URL", api), ("OPENAI_API_KEY", key)]
    changes = [(os.path.join(config, "env"), "# Written by ocp_connect.py\n" + "".join(
                    f"export {n}={quoted(v)}\n" for n, v in names), 0o600, OWN),
               (os.path.join(config, "env.fish"), "# Written by ocp_connect.py\n" + "".join(
                    f"set -gx {n} {quoted(v)}\n" for n, v in names), 0o600, OWN)]
    for rc in (".bashrc", ".zshrc", ".bash_profile", ".profile"):
        path = os.path.join(home, rc)
        text = read_text(path)
        if text is not None:
            block = marked(['[ -f "$HOME/.config/ocp/env" ] && . "$HOME/.config/ocp/env"'])
            changes.append((path, with_block(text, block), None, BLOCK))
    fish = os.path.join(home, ".config", "fish", "config.fish")
    if read_text(fish) is not None:
        block = marked(['test -f "$HOME/.config/ocp/env.fish"; and source "$HOME/.config/ocp/env.fish"'])
        changes.append((fish, with_block(read_text(fish), block), None, BLOCK))
    if platform.startswith("linux"):
        changes.append((os.path.join(home, ".config", "environment.d", "ocp.conf"),
                        "".join(f"{n}={v}\n" for n, v in names), 0o600, OWN))
    if platform == "darwin":
        script = "; ".join(f"launchctl setenv {n} {quoted(v)}" for n, v in names)
        changes.append((os.path.join(home, "Library", "LaunchAgents", "com.ocp.env.plist"),
                        launchd_plist(script), 0o600, OWN))
    return changes


def own_openai_settings(home, environ, llm_folder):
    """Where this user already has OpenAI settings of their own (global OPENAI_* would hijack them)."""
    found = [f"{name} is set in this environment" for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL")
             if environ.get(name)]
    for rc in (".bashrc", ".zshrc", ".bash_profile", ".profile", ".config/fish/config.fish"):
        text = without_blocks(read_text(os.path.join(home, rc)) or "")
        if re.search(r"\bOPENAI_(API_KEY|BASE_URL)\b", text):
            found.append(f"~/{rc} sets OPENAI_*")
    keys = load_json(os.path.join(llm_folder, "keys.json"), {}) or {}
    if keys.get("openai"):
        found.append("llm stores an OpenAI key")
    return found


def launchd_plist(script):
    escaped = script.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
            '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist version="1.0">\n<dict>\n'
            '  <key>Label</key><string>com.ocp.env</string>\n'
            '  <key>ProgramArguments</key><array><string>/bin/sh</string><string>-c</string>'
            f'<string>{escaped}</string></array>\n  <key>RunAtLoad</key><true/>\n</dict>\n</plist>\n')


def continue_block(models, api, key, indent):
    lines = []
    for model in models:
        lines += [f"{indent}- name: OCP {model}", f"{indent}  provider: openai", f"{indent}  model: {model}",
                  f"{indent}  apiBase: {api}", f"{indent}  apiKey: {json.dumps(key)}"]
    return marked(lines, indent=indent)


def plan_continue(home, models, api, key):
    path = os.path.join(home, ".continue", "config.yaml")
    text = read_text(path)
    if text is None:
        return [(path, "name: Local Config\nversion: 1.0.0\nschema: v1\nmodels:\n" + continue_block(models, api, key, "  "),
                 None, BLOCK)]
    existing = re.search(rf"^([ \t]*)# {re.escape(BEGIN)}", text, re.M)
    if existing:
        return [(path, with_block(text, continue_block(models, api, key, existing.group(1))), None, BLOCK)]
    top = re.search(r"^models:[ \t]*(\[\])?[ \t]*$", text, re.M)
    if top is None:
        base = text if not text or text.endswith("\n") else text + "\n"
        return [(path, base + "models:\n" + continue_block(models, api, key, "  "), None, BLOCK)]
    after = text[top.end():]
    item = re.search(r"^([ \t]*)- ", after, re.M)
    indent = item.group(1) if item else "  "
    head = text[:top.start()] + "models:\n"
    rest = after[1:] if after.startswith("\n") else after
    return [(path, head + continue_block(models, api, key, indent) + rest, None, BLOCK)]


AIDER_ROUTE = "hosted_vllm"  # litellm's generic OpenAI-compatible route: no OPENAI_* variables asked for


def plan_aider(home, models, api, key, limits):
    """Model settings and metadata for hosted_vllm/<id>: OCP's endpoint and key per model (aider's
    own OpenAI settings untouched), the diff edit format, and limits so aider knows the model."""
    settings = os.path.join(home, ".aider.model.settings.yml")
    lines = []
    for model in models:
        lines += [f"- name: {AIDER_ROUTE}/{model}", "  edit_format: diff", "  use_repo_map: true",
                  "  extra_params:", f"    api_base: {json.dumps(api)}", f"    api_key: {json.dumps(key)}"]
    changes = [(settings, with_block(read_text(settings), marked(lines)), 0o600, BLOCK)]
    metadata_path = os.path.join(home, ".aider.model.metadata.json")
    metadata = load_json(metadata_path, {})
    if metadata is not None:
        for model in models:
            window, output = limits.get(model, DEFAULT_LIMITS)
            metadata[f"{AIDER_ROUTE}/{model}"] = {"max_tokens": output, "max_input_tokens": window,
                                                  "max_output_tokens": output, "input_cost_per_token": 0,
                                                  "output_cost_per_token": 0, "litellm_provider": AIDER_ROUTE,
                                                  "mode": "chat"}
        changes.append((metadata_path, json.dumps(metadata, indent=2) + "\n", None,
                        ("json", [[f"{AIDER_ROUTE}/{m}"] for m in models])))
    return changes


def llm_dir(home, environ, platform):
    if environ.get("LLM_USER_PATH"):
        return environ["LLM_USER_PATH"]
    if platform == "darwin":
        return os.path.join(home, "Library", "Application Support", "io.datasette.llm")
    return os.path.join(home, ".config", "io.datasette.llm")


def plan_llm_default(folder, model):
    """llm's own default-model file (what `llm models default` writes) naming OCP's model."""
    return [(os.path.join(folder, "default_model.txt"), f"ocp-{model}", None, WHOLE)]


def plan_llm(folder, models, api, key):
    path = os.path.join(folder, "extra-openai-models.yaml")
    lines = []
    for model in models:
        lines += [f"- model_id: ocp-{model}", f"  model_name: {model}", f"  api_base: {api}", "  api_key_name: ocp",
                  "  supports_schema: true", "  vision: true"]
    changes = [(path, with_block(read_text(path), marked(lines)), None, BLOCK)]
    keys_path = os.path.join(folder, "keys.json")
    data = load_json(keys_path, {"// Note": "This file stores secret API credentials. Do not share!"})
    if data is not None:
        data["ocp"] = key
        changes.append((keys_path, json.dumps(data, indent=2) + "\n", 0o600, ("json", [["ocp"]])))
    return changes


def load_json(path, default):
    """The file's JSON object, `default` when there is no file, None when it is not plain JSON."""
    text = read_text(path)
    if text is None:
        return default
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def plan_opencode(home, models, api, key, steps, default=""):
    path = os.path.join(home, ".config", "opencode", "opencode.json")
    data = load_json(path, {"$schema": "https://opencode.ai/config.json"})
    if data is None:
        steps.append(f"opencode: {path} is not plain JSON (comments?); add a provider 'ocp' with npm "
                     f"'@ai-sdk/openai-compatible', baseURL {api} and your key yourself")
        return []
    data.setdefault("provider", {})["ocp"] = {
        "npm": "@ai-sdk/openai-compatible", "name": "OCP (Claude subscription)",
        "options": {"baseURL": api, "apiKey": key},
        "models": {model: {"name": model} for model in models}}
    ours, restore = [["provider", "ocp"]], []
    if default:
        if "model" in data and not str(data["model"]).startswith("ocp/"):
            restore.append([["model"], data["model"]])  # the owner's own default comes back at --uninstall
        else:
            ours.append(["model"])
        data["model"] = f"ocp/{default}"
    return [(path, json.dumps(data, indent=2) + "\n", None, ("json", ours, restore))]


def plan_openclaw(home, models, api, key, steps, default="", limits=None):
    """OpenClaw (2026.9): provider `ocp` with its key in openclaw.json and the models allowed for
    agents; `default` makes it the agents' primary model. No auth-profiles.json: since 2026.8 the
    profiles live in each agent's SQLite store, and a legacy JSON profile for `ocp` stops every
    agent run with "requires legacy credential migration"."""
    root = os.path.join(home, ".openclaw")
    path = os.path.join(root, "openclaw.json")
    data = load_json(path, {})
    if data is None:
        steps.append(f"OpenClaw: {path} is JSON5 with comments; add models.providers.ocp (baseUrl {api}, "
                     "api openai-completions, your key) yourself")
        return []
    limits = limits or {}
    providers = data.setdefault("models", {}).setdefault("providers", {})
    providers["ocp"] = {"baseUrl": api, "apiKey": key, "api": "openai-completions",
                        "models": [{"id": m, "name": m, "contextWindow": limits.get(m, DEFAULT_LIMITS)[0],
                                    "maxTokens": limits.get(m, DEFAULT_LIMITS)[1]} for m in models]}
    defaults = data.setdefault("agents", {}).setdefault("defaults", {})
    aliases = defaults.setdefault("models", {})
    for model in models:
        aliases.setdefault(f"ocp/{model}", {})
    ours = [["models", "providers", "ocp"]] + [["agents", "defaults", "models", f"ocp/{m}"] for m in models]
    restore = []
    if default:
        current = defaults.get("model")
        primary = current.get("primary") if isinstance(current, dict) else current
        if primary and not str(primary).startswith("ocp/"):
            restore.append([["agents", "defaults", "model"], current])  # the owner's primary comes back
        else:
            ours.append(["agents", "defaults", "model"])
        defaults["model"] = dict(current if isinstance(current, dict) else {}, primary=f"ocp/{default}")
    changes = [(path, json.dumps(data, indent=2) + "\n", 0o600, ("json", ours, restore))]
    agents = os.path.join(root, "agents")
    for agent in sorted(os.listdir(agents)) if os.path.isdir(agents) else []:
        profiles_path = os.path.join(agents, agent, "agent", "auth-profiles.json")
        profiles = load_json(profiles_path, None)
        if isinstance(profiles, dict) and "ocp:default" in (profiles.get("profiles") or {}):
            del profiles["profiles"]["ocp:default"]  # what an earlier ocp_connect wrote: it blocks the agent
            changes.append((profiles_path, json.dumps(profiles, indent=2) + "\n", 0o600, FIXED))
    return changes


CODEX_EFFORTS = ("low", "medium", "high", "xhigh")  # what OCP passes on to the CLI's --effort


def codex_catalog(models, limits):
    """Codex's model metadata for OCP's models (its ModelInfo, as its `model_catalog_json` reads
    it): without it Codex warns "Model metadata … not found" and guesses the context window."""
    entries = []
    for priority, model in enumerate(models):
        window, _ = limits.get(model, DEFAULT_LIMITS)
        entries.append({
            "slug": model, "display_name": model, "description": f"{model} through OCP (Claude subscription)",
            "default_reasoning_level": "medium",
            "supported_reasoning_levels": [{"effort": e, "description": f"{e} effort"} for e in CODEX_EFFORTS],
            "shell_type": "shell_command", "visibility": "list", "supported_in_api": True, "priority": priority,
            "upgrade": None, "base_instructions": "", "supports_reasoning_summaries": False,
            "support_verbosity": False, "default_verbosity": None, "apply_patch_tool_type": None,
            "truncation_policy": {"mode": "bytes", "limit": 10000}, "supports_parallel_tool_calls": True,
            "context_window": window, "experimental_supported_tools": [], "input_modalities": ["text", "image"]})
    return {"models": entries}


def plan_codex(home, environ, models, api, steps, limits=None, listed=()):
    """Codex: its own profile file (`codex -p ocp` layers $CODEX_HOME/ocp.config.toml over the
    owner's config.toml): a model provider `ocp` on the Responses API with the key from OCP_API_KEY
    of the env file, and a model catalog of OCP's models (context windows, efforts). The owner's
    config.toml, model and provider stay as they are."""
    folder = environ.get("CODEX_HOME") or os.path.join(home, ".codex")
    catalog = os.path.join(folder, "ocp-models.json")
    text = "\n".join(["# Written by ocp_connect.py: codex -p ocp", 'model_provider = "ocp"', f'model = "{models[0]}"',
                      f"model_catalog_json = {json.dumps(catalog)}", "",
                      "[model_providers.ocp]", 'name = "OCP (Claude subscription)"', f'base_url = "{api}"',
                      'env_key = "OCP_API_KEY"', 'wire_api = "responses"']) + "\n"
    steps.append("Codex: codex -p ocp (the key comes from OCP_API_KEY in ~/.config/ocp/env: open a new shell first)")
    return [(os.path.join(folder, "ocp.config.toml"), text, 0o600, OWN),
            (catalog, json.dumps(codex_catalog(list(listed) or models, limits or {}), indent=1) + "\n", 0o600, OWN)]


def written_env(home, path):
    """The `env` entries of a JSON settings file that an earlier connect put there (its manifest)."""
    undo = load_manifest(home)["files"].get(path, {}).get("undo") or []
    return {keys[-1] for keys in (undo[1] if len(undo) > 1 else []) if keys[:1] == ["env"]}


def own_anthropic_settings(home, environ):
    """Where this user's Claude Code already talks to Anthropic its own way (a login or a key)."""
    found = [f"{name} is set in this environment" for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
                                                               "ANTHROPIC_BASE_URL") if environ.get(name)]
    if os.path.exists(os.path.join(home, ".claude", ".credentials.json")):
        found.append("Claude Code is logged in (~/.claude/.credentials.json)")
    path = os.path.join(home, ".claude", "settings.json")
    env = (load_json(path, {}) or {}).get("env") or {}
    ours = written_env(home, path)
    if any(env.get(name) and name not in ours for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
                                                           "ANTHROPIC_BASE_URL")):
        found.append("~/.claude/settings.json sets ANTHROPIC_*")
    return found


def plan_claude_code(home, environ, server, key, steps, force):
    """Claude Code: ANTHROPIC_BASE_URL (the server, no /v1) and ANTHROPIC_AUTH_TOKEN in its user
    settings. Not over a login or key of the owner's own (that Claude Code would silently move to
    OCP) unless --force."""
    mine = own_anthropic_settings(home, environ)
    if mine and not force:
        steps.append("Claude Code: not configured, it already uses Anthropic its own way (" + "; ".join(mine) +
                     f"); run it with ANTHROPIC_BASE_URL={server} ANTHROPIC_AUTH_TOKEN=<your key>, or add --force")
        return []
    path = os.path.join(home, ".claude", "settings.json")
    data = load_json(path, {})
    if data is None:
        steps.append(f"Claude Code: {path} is not plain JSON; set env ANTHROPIC_BASE_URL={server} yourself")
        return []
    env = data.setdefault("env", {})
    ours, restore, earlier = [], [], written_env(home, path)
    for name, value in (("ANTHROPIC_BASE_URL", server), ("ANTHROPIC_AUTH_TOKEN", key)):
        if name in env and env[name] != value and name not in earlier:  # the owner's (with --force)
            restore.append([["env", name], env[name]])
        else:
            ours.append(["env", name])
        env[name] = value
    return [(path, json.dumps(data, indent=2) + "\n", 0o600, ("json", ours, restore))]


def detected(home, environ, platform):
    """The tools this machine has: a config folder or file, or the command on PATH."""
    path = environ.get("PATH", "")
    has = lambda command: shutil.which(command, path=path) is not None
    return {"continue": os.path.isdir(os.path.join(home, ".continue")),
            "opencode": os.path.isdir(os.path.join(home, ".config", "opencode")) or has("opencode"),
            "aider": any(os.path.exists(os.path.join(home, name)) for name in (
                ".aider.conf.yml", ".aider.model.settings.yml", ".aider.model.metadata.json")) or has("aider"),
            "llm": os.path.isdir(llm_dir(home, environ, platform)) or has("llm"),
            "openclaw": os.path.isdir(os.path.join(home, ".openclaw")) or has("openclaw"),
            "codex": os.path.isdir(environ.get("CODEX_HOME") or os.path.join(home, ".codex")) or has("codex"),
            "claude-code": os.path.isdir(os.path.join(home, ".claude")) or has("claude")}


def plan(home, environ, platform, api, key, ids, shell_env=False, limits=None, make_default=False, force=False):
    """Every change as (path, full new content, mode or None, how to undo it), and the manual steps."""
    models = chosen_models(ids)
    steps = [f"Cline: Settings → API Provider 'OpenAI Compatible', Base URL {api}, API key as in ~/.config/ocp/env, "
             f"model {models[0]}",
             "Cursor: calls models from its own cloud, so it needs OCP on a public https URL (a tunnel); "
             "then Settings → Models → OpenAI API key + override base URL with that https URL + /v1"]
    changes = plan_environment(home, api, key, platform, shell_env)
    tools = detected(home, environ, platform)
    if tools["continue"]:
        changes += plan_continue(home, models, api, key)
    if tools["opencode"]:
        changes += plan_opencode(home, ids or models, api, key, steps,  # opencode lists every model
                                 models[0] if make_default else "")
    if tools["aider"]:
        changes += plan_aider(home, models, api, key, limits or {})
        steps.append(f"Aider: aider --model {AIDER_ROUTE}/{models[0]}")
    if tools["llm"]:
        changes += plan_llm(llm_dir(home, environ, platform), models, api, key)
        if make_default:
            changes += plan_llm_default(llm_dir(home, environ, platform), models[0])
    if tools["openclaw"]:
        changes += plan_openclaw(home, models, api, key, steps, models[0] if make_default else "", limits)
    if tools["codex"]:
        changes += plan_codex(home, environ, models, api, steps, limits, ids)  # every model OCP lists
    if tools["claude-code"]:
        changes += plan_claude_code(home, environ, api[:-len("/v1")], key, steps, force)
    return changes, steps, [name for name, found in tools.items() if found]


# -- applying, undoing -----------------------------------------------------------


def manifest_path(home):
    return os.path.join(home, ".config", "ocp", "connect-manifest.json")


def load_manifest(home):
    data = load_json(manifest_path(home), {"files": {}})
    return data if data is not None else {"files": {}}


def write_file(path, content, mode):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = path + ".ocp-tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode if mode is not None else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    if mode is None and os.path.exists(path):
        shutil.copymode(path, temporary)
    elif mode is not None:
        os.chmod(temporary, mode)
    os.replace(temporary, path)


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def apply(home, changes, dry_run, diffs=None):
    """Write what differs; back each original up once; remember how to undo each change.

    Return [(path, action)]; dry runs fill `diffs` instead of writing.
    """
    diffs = [] if diffs is None else diffs
    manifest = load_manifest(home)
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    done = []
    for path, content, mode, undo in changes:
        current = read_text(path)
        if current == content:
            done.append((path, "unchanged"))
            continue
        action = "create" if current is None else "update"
        done.append((path, action))
        if dry_run:
            diffs.append("".join(difflib.unified_diff((current or "").splitlines(True), content.splitlines(True),
                                                      path if current is not None else "/dev/null", path)))
            continue
        entry = manifest["files"].setdefault(path, {"backup": None, "created": current is None})
        if current is not None and not entry["created"] and entry["backup"] is None:
            entry["backup"] = f"{path}.ocp-backup-{stamp}"
            shutil.copy2(path, entry["backup"])
        earlier = entry.get("undo") or []
        if undo[0] == "json" and len(earlier) > 2 and earlier[2]:
            undo = (undo[0], undo[1], earlier[2])  # the owner's values from before the first change
        entry.update(written=sha256(content), undo=list(undo))
        write_file(path, content, mode)
    if not dry_run and any(action != "unchanged" for _, action in done):
        write_file(manifest_path(home), json.dumps(manifest, indent=2) + "\n", 0o600)
    return done


def uninstall(home, dry_run):
    """Remove exactly what connect added, keeping every later edit.

    A file nobody touched since is put back byte for byte (or removed, when connect
    created it); an edited one loses only our marked blocks or our JSON entries.
    """
    manifest = load_manifest(home)
    done = []
    for path, entry in manifest["files"].items():
        current = read_text(path)
        if current is None:
            continue
        backup = entry.get("backup")
        if entry.get("undo", ["own"])[0] == "fixed":
            done.append((path, "left repaired"))
            if not dry_run and backup and os.path.exists(backup):
                os.remove(backup)
            continue
        if sha256(current) == entry.get("written") or entry.get("undo", ["own"])[0] == "own":
            if entry.get("created"):
                done.append((path, "remove"))
                if not dry_run:
                    os.remove(path)
            elif backup and os.path.exists(backup):
                done.append((path, "restore"))
                if not dry_run:
                    os.replace(backup, path)
            continue
        if entry["undo"][0] == "whole":
            done.append((path, "left as the owner changed it"))
            continue
        done.append((path, "remove ocp's part"))
        if not dry_run:
            write_file(path, undone(current, entry["undo"]), None)
            if backup and os.path.exists(backup):
                os.remove(backup)  # the user's later edits are the file now; the old copy is stale
    if not dry_run and os.path.exists(manifest_path(home)):
        os.remove(manifest_path(home))
        for folder in (os.path.join(home, ".config", "ocp"), os.path.join(home, ".config", "environment.d")):
            try:
                os.rmdir(folder)
            except OSError:
                pass
    return done


def undone(text, undo):
    """`text` without what connect put in it: its marked blocks, or its JSON entries."""
    if undo[0] == "block":
        return without_blocks(text)
    try:
        data = json.loads(text)
    except ValueError:
        return text  # no longer JSON: nothing we can take out safely
    for keys in undo[1]:
        parent = data
        for name in keys[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(keys[-1], None)
    for keys, value in (undo[2] if len(undo) > 2 else []):
        parent = data
        for name in keys[:-1]:
            parent = parent.setdefault(name, {}) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent[keys[-1]] = value
    return json.dumps(data, indent=2) + "\n"


def verify(home):
    """A real round trip with what was configured: the models list and a one-word answer."""
    env = {}
    for line in (read_text(os.path.join(home, ".config", "ocp", "env")) or "").splitlines():
        match = re.match(r"export (\w+)='(.*)'$", line)
        if match:
            env[match.group(1)] = match.group(2).replace("'\\''", "'")
    api, key = env.get("OCP_BASE_URL"), env.get("OCP_API_KEY")
    if not api:
        raise ConnectError("nothing is configured yet: run ocp_connect.py SERVER first")
    status, models = call(api + "/models", key)
    if status != 200:
        raise ConnectError(f"models list failed ({status})")
    model = chosen_models([m["id"] for m in models["data"]])[0]
    status, answer = call(api + "/chat/completions", key, {"model": model, "max_tokens": 16, "messages": [
        {"role": "user", "content": "Reply with one word: ready"}]}, timeout=120)
    if status != 200:
        message = (answer or {}).get("error", {}).get("message", "") if isinstance(answer, dict) else ""
        raise ConnectError(f"a one-word completion failed ({status}) {message}")
    result = {"base_url": api, "models": len(models["data"]), "model": model,
              "answer": answer["choices"][0]["message"]["content"]}
    for route, body, read in (  # what Codex and Claude Code speak
            ("/responses", {"model": model, "input": "Reply with one word: ready", "max_output_tokens": 16},
             lambda b: next(p["text"] for i in b["output"] if i["type"] == "message" for p in i["content"])),
            ("/messages", {"model": model, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "Reply with one word: ready"}]},
             lambda b: b["content"][0]["text"])):
        status, answer = call(api + route, key, body, timeout=120)
        if status != 200:
            raise ConnectError(f"a one-word answer through {route} failed ({status})")
        result["answer" + route.replace("/", "_")] = read(answer)
    return result


def main(argv=None, environ=None, platform=sys.platform):
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="ocp_connect.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("server", nargs="?", help="the OCP server: host, host:port or URL")
    parser.add_argument("--key", default="", help="your key (ocp keys add NAME on the server)")
    parser.add_argument("--port", type=int, default=3456)
    parser.add_argument("--dry-run", action="store_true", help="show every change, write nothing")
    parser.add_argument("--verify", action="store_true", help="make a real round trip with the settings")
    parser.add_argument("--uninstall", action="store_true", help="undo exactly what was added")
    parser.add_argument("--shell-env", action="store_true",
                        help="also export OPENAI_BASE_URL/OPENAI_API_KEY in every shell (every OpenAI client "
                             "then talks to OCP)")
    parser.add_argument("--force", action="store_true", help="--shell-env even over OpenAI settings of your own, "
                        "and Claude Code even when it has a login or key of its own")
    parser.add_argument("--default", action="store_true",
                        help="also make OCP's model the default in opencode and llm, and OpenClaw's primary "
                             "(undone by --uninstall)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    home = environ.get("HOME") or os.path.expanduser("~")
    report = {}
    try:
        if args.uninstall:
            report["changes"] = uninstall(home, args.dry_run)
        elif args.server:
            base = server_base(args.server, args.port)
            if args.shell_env and not args.force:
                mine = own_openai_settings(home, environ, llm_dir(home, environ, platform))
                if mine:
                    raise ConnectError("--shell-env would send every OpenAI client here, but you have OpenAI "
                                       f"settings of your own ({'; '.join(mine)}). Each tool is configured "
                                       "without it; add --force if you really want it.")
            key, source, ids, limits = discover(base, args.key or environ.get("OCP_KEY", ""))
            changes, steps, tools = plan(home, environ, platform, base + "/v1", key, ids, args.shell_env, limits,
                                         args.default, args.force)
            diffs = []
            report.update(server=base, key_source=source, tools=tools, steps=steps,
                          changes=apply(home, changes, args.dry_run, diffs))
            if args.dry_run:
                report["diffs"] = diffs
        elif not args.verify:
            parser.error("give the server, e.g. ocp_connect.py 192.168.1.20")
        if args.verify:
            report["verify"] = verify(home)
    except ConnectError as e:
        print(json.dumps({"error": str(e)}) if args.json else f"ocp_connect: {e}", file=sys.stderr)
        return 1
    print_report(report, args)
    return 0


def print_report(report, args):
    if args.json:
        report["changes"] = [{"path": p, "action": a} for p, a in report.get("changes", [])]
        print(json.dumps(report, indent=2))
        return
    if "server" in report:
        print(f"OCP at {report['server']} (key: {report['key_source']}); tools found: "
              f"{', '.join(report['tools']) or 'none'}")
    prefix = "would " if args.dry_run else ""
    for path, action in report.get("changes", []):
        if action != "unchanged":
            print(f"  {prefix}{action} {path}")
    for diff in report.get("diffs", []):
        print(diff, end="" if diff.endswith("\n") else "\n")
    if report.get("changes") and all(a == "unchanged" for _, a in report["changes"]):
        print("  everything was already set up")
    for step in report.get("steps", []):
        print(f"  by hand: {step}")
    if "verify" in report:
        v = report["verify"]
        print(f"verified: {v['models']} models at {v['base_url']}; {v['model']} answered {v['answer']!r}")
    elif "server" in report and not args.dry_run:
        print("Each tool above now has OCP as its own provider; scripts find OCP_BASE_URL and OCP_API_KEY in "
              "~/.config/ocp/env (new shells load it). Check with: ocp_connect.py --verify")


if __name__ == "__main__":
    sys.exit(main())
