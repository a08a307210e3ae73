#!/usr/bin/env python3
"""Point this machine's shells and AI tools at an OCP server. Needs only python3.

    curl -fsSL http://SERVER:3456/connect.py | python3 - SERVER [--key KEY]
    python3 ocp_connect.py SERVER [--key KEY] [--dry-run] [--verify] [--uninstall] [--json]

It checks the server (/health), takes an advertised guest key when no key is given,
verifies the key (/v1/models), then writes ~/.config/ocp/env (0600) with
OPENAI_BASE_URL and OPENAI_API_KEY, sources it from the bash/zsh/fish rc files it finds,
adds Linux environment.d or a macOS launchd agent, and configures the tools it finds:
Continue, opencode, Aider, llm and OpenClaw. Each file it changes is backed up once;
--uninstall puts every original back byte for byte and removes what it created.
Cline and Cursor keep settings it must not touch: it prints the steps for them.
"""

import argparse
import datetime
import difflib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request

BEGIN, END = ">>> ocp >>>", "<<< ocp <<<"
PREFERRED_MODELS = ("claude-sonnet-5-5", "claude-opus-5-5", "claude-haiku-5-5")


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
    ids = [m["id"] for m in models.get("data", [])]
    return key, source, ids


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


def with_block(text, block, comment="#"):
    """Return `text` with our marked block replaced, or appended when there is none."""
    text = text or ""
    pattern = re.compile(rf"^[ \t]*{re.escape(comment)} {re.escape(BEGIN)}\n.*?^[ \t]*{re.escape(comment)} "
                         rf"{re.escape(END)}\n?", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda m: block, text, count=1)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + block


def quoted(value):
    return "'" + value.replace("'", "'\\''") + "'"


def plan_environment(home, api, key, platform):
    """The env files and the rc blocks that load them."""
    config = os.path.join(home, ".config", "ocp")
    changes = [(os.path.join(config, "env"), f"# Written by ocp_connect.py\nexport OPENAI_BASE_URL={quoted(api)}\n"
                f"export OPENAI_API_KEY={quoted(key)}\n", 0o600),
               (os.path.join(config, "env.fish"), f"# Written by ocp_connect.py\nset -gx OPENAI_BASE_URL {quoted(api)}\n"
                f"set -gx OPENAI_API_KEY {quoted(key)}\n", 0o600)]
    for rc in (".bashrc", ".zshrc", ".bash_profile", ".profile"):
        path = os.path.join(home, rc)
        text = read_text(path)
        if text is not None:
            block = marked(['[ -f "$HOME/.config/ocp/env" ] && . "$HOME/.config/ocp/env"'])
            changes.append((path, with_block(text, block), None))
    fish = os.path.join(home, ".config", "fish", "config.fish")
    if read_text(fish) is not None:
        block = marked(['test -f "$HOME/.config/ocp/env.fish"; and source "$HOME/.config/ocp/env.fish"'])
        changes.append((fish, with_block(read_text(fish), block), None))
    if platform.startswith("linux"):
        changes.append((os.path.join(home, ".config", "environment.d", "ocp.conf"),
                        f"OPENAI_BASE_URL={api}\nOPENAI_API_KEY={key}\n", 0o600))
    if platform == "darwin":
        script = f"launchctl setenv OPENAI_BASE_URL {quoted(api)}; launchctl setenv OPENAI_API_KEY {quoted(key)}"
        changes.append((os.path.join(home, "Library", "LaunchAgents", "com.ocp.env.plist"),
                        launchd_plist(script), 0o600))
    return changes


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
        return [(path, "name: Local Config\nversion: 1.0.0\nschema: v1\nmodels:\n" + continue_block(models, api, key, "  "), None)]
    existing = re.search(rf"^([ \t]*)# {re.escape(BEGIN)}", text, re.M)
    if existing:
        return [(path, with_block(text, continue_block(models, api, key, existing.group(1))), None)]
    top = re.search(r"^models:[ \t]*(\[\])?[ \t]*$", text, re.M)
    if top is None:
        base = text if not text or text.endswith("\n") else text + "\n"
        return [(path, base + "models:\n" + continue_block(models, api, key, "  "), None)]
    after = text[top.end():]
    item = re.search(r"^([ \t]*)- ", after, re.M)
    indent = item.group(1) if item else "  "
    head = text[:top.start()] + "models:\n"
    rest = after[1:] if after.startswith("\n") else after
    return [(path, head + continue_block(models, api, key, indent) + rest, None)]


def plan_aider(home, models, api, key):
    path = os.path.join(home, ".aider.conf.yml")
    text = read_text(path) or ""
    ours = {"openai-api-base": api, "openai-api-key": key, "model": f"openai/{models[0]}"}
    lines = []
    inside = False
    for line in text.splitlines():  # a key set outside our block would clash: comment it out
        if BEGIN in line:
            inside = True
        if not inside and re.match(rf"^({'|'.join(map(re.escape, ours))}):", line):
            line = "# ocp replaced: " + line
        lines.append(line)
        if END in line:
            inside = False
    text = "\n".join(lines) + ("\n" if lines else "")
    block = marked([f"{k}: {json.dumps(v)}" for k, v in ours.items()])
    return [(path, with_block(text, block), None)]


def llm_dir(home, environ, platform):
    if environ.get("LLM_USER_PATH"):
        return environ["LLM_USER_PATH"]
    if platform == "darwin":
        return os.path.join(home, "Library", "Application Support", "io.datasette.llm")
    return os.path.join(home, ".config", "io.datasette.llm")


def plan_llm(folder, models, api, key):
    path = os.path.join(folder, "extra-openai-models.yaml")
    lines = []
    for model in models:
        lines += [f"- model_id: ocp-{model}", f"  model_name: {model}", f"  api_base: {api}", "  api_key_name: ocp"]
    changes = [(path, with_block(read_text(path), marked(lines)), None)]
    keys_path = os.path.join(folder, "keys.json")
    data = load_json(keys_path, {"// Note": "This file stores secret API credentials. Do not share!"})
    if data is not None:
        data["ocp"] = key
        changes.append((keys_path, json.dumps(data, indent=2) + "\n", 0o600))
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


def plan_opencode(home, models, api, key, steps):
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
    return [(path, json.dumps(data, indent=2) + "\n", None)]


def plan_openclaw(home, models, api, key, steps):
    root = os.path.join(home, ".openclaw")
    path = os.path.join(root, "openclaw.json")
    data = load_json(path, {})
    if data is None:
        steps.append(f"OpenClaw: {path} is JSON5 with comments; add models.providers.ocp (baseUrl {api}, "
                     "api openai-completions, your key) yourself")
        return []
    providers = data.setdefault("models", {}).setdefault("providers", {})
    providers["ocp"] = {"baseUrl": api, "apiKey": key, "api": "openai-completions",
                        "models": [{"id": m, "name": m, "contextWindow": 200000, "maxTokens": 32000} for m in models]}
    aliases = data.setdefault("agents", {}).setdefault("defaults", {}).setdefault("models", {})
    for model in models:
        aliases.setdefault(f"ocp/{model}", {})
    changes = [(path, json.dumps(data, indent=2) + "\n", 0o600)]
    agents = os.path.join(root, "agents")
    for agent in sorted(os.listdir(agents)) if os.path.isdir(agents) else []:
        profiles_path = os.path.join(agents, agent, "agent", "auth-profiles.json")
        if not os.path.isdir(os.path.dirname(profiles_path)):
            continue
        profiles = load_json(profiles_path, {"version": 1, "profiles": {}})
        if profiles is None:
            steps.append(f"OpenClaw agent {agent}: {profiles_path} is not plain JSON; add an api_key profile for ocp")
            continue
        profiles.setdefault("profiles", {})["ocp:default"] = {"type": "api_key", "provider": "ocp", "key": key}
        changes.append((profiles_path, json.dumps(profiles, indent=2) + "\n", 0o600))
    return changes


def detected(home, environ, platform):
    """The tools this machine has: a config folder or file, or the command on PATH."""
    path = environ.get("PATH", "")
    has = lambda command: shutil.which(command, path=path) is not None
    return {"continue": os.path.isdir(os.path.join(home, ".continue")),
            "opencode": os.path.isdir(os.path.join(home, ".config", "opencode")) or has("opencode"),
            "aider": os.path.exists(os.path.join(home, ".aider.conf.yml")) or has("aider"),
            "llm": os.path.isdir(llm_dir(home, environ, platform)) or has("llm"),
            "openclaw": os.path.isdir(os.path.join(home, ".openclaw")) or has("openclaw")}


def plan(home, environ, platform, api, key, ids):
    """Every change as (path, full new content, mode or None), and the manual steps."""
    models = chosen_models(ids)
    steps = [f"Cline: Settings → API Provider 'OpenAI Compatible', Base URL {api}, API key as in ~/.config/ocp/env, "
             f"model {models[0]}",
             "Cursor: calls models from its own cloud, so it needs OCP on a public https URL (a tunnel); "
             "then Settings → Models → OpenAI API key + override base URL with that https URL + /v1"]
    changes = plan_environment(home, api, key, platform)
    tools = detected(home, environ, platform)
    if tools["continue"]:
        changes += plan_continue(home, models, api, key)
    if tools["opencode"]:
        changes += plan_opencode(home, ids or models, api, key, steps)  # opencode lists every model
    if tools["aider"]:
        changes += plan_aider(home, models, api, key)
    if tools["llm"]:
        changes += plan_llm(llm_dir(home, environ, platform), models, api, key)
    if tools["openclaw"]:
        changes += plan_openclaw(home, models, api, key, steps)
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


def apply(home, changes, dry_run, diffs=None):
    """Write what differs; back each original up once. Return [(path, action)]; dry runs fill `diffs`."""
    diffs = [] if diffs is None else diffs
    manifest = load_manifest(home)
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    done = []
    for path, content, mode in changes:
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
        if path not in manifest["files"]:
            backup = None
            if current is not None:
                backup = f"{path}.ocp-backup-{stamp}"
                shutil.copy2(path, backup)
            manifest["files"][path] = {"backup": backup, "created": current is None}
        write_file(path, content, mode)
    if not dry_run and any(action != "unchanged" for _, action in done):
        write_file(manifest_path(home), json.dumps(manifest, indent=2) + "\n", 0o600)
    return done


def uninstall(home, dry_run):
    """Put every original back byte for byte; remove what we created."""
    manifest = load_manifest(home)
    done = []
    for path, entry in manifest["files"].items():
        if entry.get("created"):
            done.append((path, "remove"))
            if not dry_run and os.path.exists(path):
                os.remove(path)
        elif entry.get("backup") and os.path.exists(entry["backup"]):
            done.append((path, "restore"))
            if not dry_run:
                os.replace(entry["backup"], path)
    if not dry_run and os.path.exists(manifest_path(home)):
        os.remove(manifest_path(home))
        for folder in (os.path.join(home, ".config", "ocp"), os.path.join(home, ".config", "environment.d")):
            try:
                os.rmdir(folder)
            except OSError:
                pass
    return done


def verify(home):
    """A real round trip with what was configured: the models list and a one-word answer."""
    env = {}
    for line in (read_text(os.path.join(home, ".config", "ocp", "env")) or "").splitlines():
        match = re.match(r"export (\w+)='(.*)'$", line)
        if match:
            env[match.group(1)] = match.group(2).replace("'\\''", "'")
    api, key = env.get("OPENAI_BASE_URL"), env.get("OPENAI_API_KEY")
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
    return {"base_url": api, "models": len(models["data"]), "model": model,
            "answer": answer["choices"][0]["message"]["content"]}


def main(argv=None, environ=None, platform=sys.platform):
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="ocp_connect.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("server", nargs="?", help="the OCP server: host, host:port or URL")
    parser.add_argument("--key", default="", help="your key (ocp keys add NAME on the server)")
    parser.add_argument("--port", type=int, default=3456)
    parser.add_argument("--dry-run", action="store_true", help="show every change, write nothing")
    parser.add_argument("--verify", action="store_true", help="make a real round trip with the settings")
    parser.add_argument("--uninstall", action="store_true", help="undo exactly what was added")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    home = environ.get("HOME") or os.path.expanduser("~")
    report = {}
    try:
        if args.uninstall:
            report["changes"] = uninstall(home, args.dry_run)
        elif args.server:
            base = server_base(args.server, args.port)
            key, source, ids = discover(base, args.key or environ.get("OCP_KEY", ""))
            changes, steps, tools = plan(home, environ, platform, base + "/v1", key, ids)
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
        print("Open a new shell (or `. ~/.config/ocp/env`) to use it; check with: ocp_connect.py --verify")


if __name__ == "__main__":
    sys.exit(main())
