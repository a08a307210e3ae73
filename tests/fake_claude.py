#!/usr/bin/env -S python3 -S
"""A stand-in for the `claude` CLI 2.1.330 in `-p --output-format stream-json` mode.

It prints the real CLI's event shapes (see ../shared/fixtures/claude-cli-2.1.330/)
and is steered per request by a directive anywhere in the prompt:

    <<fake {"text": "Hi", "deltas": 3, "pace_ms": 50, "error": "plan_limit"}>>

Keys: text (the answer; default "Echo: <last text block>"), texts (a list: the
reply for the input's count of earlier assistant turns), deltas (how many
text deltas), pace_ms (pause between deltas), thinking (a thinking block
first), error (plan_limit, rate_limit, auth, not_logged_in, overloaded,
server_error, prompt_too_long, blocking_limit, version_too_old, mid_stream, bad_request), crash (exit code,
no result), hang (print init, then wait to be killed), slow_start_ms, drop
(a dropped connection: partial deltas, abandoned, retried non-streamed),
garbage (unparsable lines between events), usage ({input, output,
cache_read, cache_creation}), overage (the answer is paid from extra usage),
ignore_term (survive SIGTERM), grandchild (leave a sleeping child in the
group), stderr (text for stderr), tail_ms (pause between the answer's last
event and the result), exit_after_ms (a slow exit: the pause between stdin's
end and exiting), control (send a control_request of that subtype first),
calls (with --mcp-config's sdk server "ocp": a list of tool rounds, each a list of
{"name", "arguments"[, "id"]}: the model calls them, OCP answers the tools/call
requests, the next round follows), final (the answer after the last round;
default "Done: " and the results), mcp_fail (the server "ocp" reports failed),
recall (answer "Recall: " and every user text of the conversation this process
holds, oldest first: what a warm process remembers), plan and plan_week (the
5-hour and weekly utilization its rate_limit_event reports), cost (the turn's
total_cost_usd), weekly_only (an account without a 5-hour window), claim,
claim_status, claim_utilization (the representative window its rate_limit_event names: a
per-model one such as seven_day_opus comes only this way, as with the real CLI), limit_window
(with error plan_limit: the window refused, e.g. seven_day_opus), fallback (two api_retry lines and a model_fallback before the answer).

With --input-format stream-json each stdin line is one user turn, answered up
to its `result` before the next line is read, as the real CLI does: stdin may
stay open between turns (a leased process). The directive is read per turn.
The process remembers its conversation as the real one does; a turn that is
just "/clear" forgets it (conversation_reset, init, result; no answer), and
total_cost_usd sums the turns since the start or the last /clear.

CLAUDE_CODE_MAX_OUTPUT_TOKENS cuts the answer at 4 characters a token with
stop_reason max_tokens; then, as the real CLI does even with --max-turns 1, it
continues up to three times and fails with api_error "max_output_tokens".

With FAKE_CLAUDE_LOG=<dir> every run writes <dir>/<pid>.json: argv, cwd,
env (the OAuth token as a hash), stdin, the system prompt and how it ended.
"""

import _json  # json's C half, and _signal: `import json` and `signal` load re and enum too, 15 ms of
import _signal as signal  # every spawn's 35 (the suite starts this fake ~550 times)
import os
import sys
import time

VERSION = os.environ.get("FAKE_CLAUDE_VERSION") or "2.1.330"  # (hashlib, subprocess: imported where used; every spawn of a test pays its imports)
PLAN_RESET = 1795503600
WEEK_RESET = 1795838400


class Decoding:
    """What _json's scanner reads from a json.JSONDecoder."""

    def __init__(self, strict):
        self.strict, self.object_hook, self.object_pairs_hook, self.memo = strict, None, None, {}
        self.parse_float, self.parse_int = float, int
        self.parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


SCANNERS = {strict: _json.make_scanner(Decoding(strict)) for strict in (True, False)}
ENCODE = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)


def loads(text, strict=True):
    """json.loads: one JSON value, else ValueError. Text that is not one JSON value goes to json
    itself (imported then), for its error: _json raises through json.decoder, and without it
    loaded reports a SystemError instead."""
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    start = len(text) - len(text.lstrip())
    try:
        value, end = SCANNERS[strict](text, start)
    except Exception:  # StopIteration, or that SystemError
        end = -1
    if end < 0 or text[end:].strip():
        import json
        return json.loads(text, strict=strict)
    return value


def dumps(value):
    """json.dumps with its defaults (ASCII, ", " and ": ")."""
    return "".join(ENCODE(value, 0))


def directive_at(text):
    """(start, end, JSON text) of the first `<<fake {...}>>` in `text` (ending at the first `}>>`), or None."""
    start = text.find("<<fake {")
    end = text.find("}>>", start) if start >= 0 else -1
    return None if end < 0 else (start, end + 3, text[start + 7:end + 1])


def without_directives(text):
    found = directive_at(text)
    while found:
        text = text[:found[0]] + text[found[1]:]
        found = directive_at(text)
    return text


def new_hex(n=32):
    """Random hex, as uuid4().hex gives (the uuid module costs every spawn its import time)."""
    return os.urandom(16).hex()[:n]


def new_uuid():
    h = new_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def log_run(record):
    folder = os.environ.get("FAKE_CLAUDE_LOG")
    if not folder:
        return
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        f.write(dumps(record))
    os.replace(path + ".tmp", path)


def out(obj):
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def fail_usage(message):
    sys.stderr.write(message + "\n")
    sys.exit(1)


def parse_args(argv):
    opts = {"model": "claude-opus-5-5", "tools": None, "max_turns": 0, "system": None, "mcp_config": None,
            "allowed_tools": None,
            "system_file": None, "effort": None, "prompt": None}
    flags = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        takes_value = {"--model": "model", "--tools": "tools", "--max-turns": "max_turns",
                       "--system-prompt": "system", "--system-prompt-file": "system_file",
                       "--effort": "effort", "--output-format": "output",
                       "--input-format": "input", "--mcp-config": "mcp_config",
                       "--allowedTools": "allowed_tools"}
        if arg in takes_value:
            opts[takes_value[arg]] = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--") or arg == "-p":
            flags.add(arg)
        else:
            opts["prompt"] = arg
        i += 1
    opts["flags"] = flags
    return opts


ALIASES = {"opus": "claude-opus-5-5", "sonnet": "claude-sonnet-5-5", "haiku": "claude-haiku-5-5",
           "fable": "claude-fable-5-2"}


class Run:
    def __init__(self, opts, blocks, directive):
        self.opts, self.blocks, self.d = opts, blocks, directive
        self.session = new_uuid()
        self.model = ALIASES.get(opts["model"], opts["model"])
        self.partial = "--include-partial-messages" in opts["flags"]
        self.oauth = bool(os.environ.get("CLAUDE_CODE_OAUTH_TOKEN"))
        self.turns = 0

    def base(self, **fields):
        fields.update(session_id=self.session, uuid=new_uuid())
        return fields

    def init(self, mcp=None):
        servers = [{"name": "ocp", "status": mcp.status, "source": "sdk"}] if mcp and mcp.enabled else []
        out(self.base(type="system", subtype="init", cwd=os.getcwd(), tools=mcp.names() if mcp else [],
                      mcp_servers=servers,
                      model=self.model, permissionMode="default", slash_commands=[],
                      apiKeySource="none" if self.oauth else "ANTHROPIC_API_KEY",
                      claude_code_version=VERSION, output_style="default", agents=[],
                      skills=[], plugins=[]))

    def stream(self, event, message_id, **outer):
        if self.partial:
            out(self.base(type="stream_event", event=event, parent_tool_use_id=None,
                          api_message_id=message_id, **outer))

    def usage(self, output=1):
        u = self.d.get("usage") or {}
        return {"input_tokens": u.get("input", 4408), "output_tokens": output,
                "cache_creation_input_tokens": u.get("cache_creation", 0),
                "cache_read_input_tokens": u.get("cache_read", 0)}

    def assistant(self, message_id, block):
        out(self.base(type="assistant", parent_tool_use_id=None, message={
            "id": message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [block], "stop_reason": None, "stop_sequence": None,
            "usage": self.usage(), "context_management": None},
            timestamp="2026-11-24T04:25:12.410Z", request_id="req_fake" + new_hex(20)))

    def pause(self):
        pace = self.d.get("pace_ms", 0)
        if pace:
            time.sleep(pace / 1000)

    def garbage(self):
        if self.d.get("garbage"):
            sys.stdout.write("this is not json {\n")

    def message(self, text, thinking=None, stop_reason="end_turn", drop=False):
        """Print one model message; return the text it streamed."""
        message_id = "msg_fake" + new_hex(20)
        self.turns += 1
        if self.partial:
            out(self.base(type="system", subtype="status", status="requesting"))
        self.stream({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": self.usage()}},
            message_id)
        index = 0
        if thinking:
            self.block(message_id, index, "thinking", thinking, 3)
            index += 1
        pieces = split(text, int(self.d.get("deltas", max(1, len(text) // 6 or 1))))
        if drop:
            pieces = pieces[:max(1, len(pieces) // 2)]
        self.block(message_id, index, "text", text, pieces=pieces, emit_assistant=not drop)
        if drop:
            self.stream({"type": "message_stop"}, message_id, abandoned_blocks={
                "api_message_id": message_id, "from_block_index": 0})
            return
        self.stream({"type": "message_delta", "delta": {"stop_reason": stop_reason,
                     "stop_sequence": None}, "usage": {"output_tokens": self.output_tokens(text)}},
                    message_id)
        self.stream({"type": "message_stop"}, message_id)

    def block(self, message_id, index, kind, text, count=None, pieces=None, emit_assistant=True):
        start = {"type": "text", "text": ""} if kind == "text" else \
            {"type": "thinking", "thinking": "", "signature": ""}
        self.stream({"type": "content_block_start", "index": index, "content_block": start}, message_id)
        estimated = 0
        for piece in pieces if pieces is not None else split(text, count):
            delta = {"type": "text_delta", "text": piece} if kind == "text" else \
                {"type": "thinking_delta", "thinking": piece}
            if kind == "thinking" and self.partial:
                estimated += max(1, len(piece) // 4)
                out(self.base(type="system", subtype="thinking_tokens", estimated_tokens=estimated,
                              estimated_tokens_delta=max(1, len(piece) // 4)))
            self.stream({"type": "content_block_delta", "index": index, "delta": delta}, message_id)
            self.garbage()
            self.pause()
        if kind == "thinking":
            self.stream({"type": "content_block_delta", "index": index, "delta": {
                "type": "signature_delta", "signature": "fake-signature"}}, message_id)
        if emit_assistant:
            block = {"type": "text", "text": text} if kind == "text" else \
                {"type": "thinking", "thinking": text, "signature": "fake-signature"}
            self.assistant(message_id, block)
        self.stream({"type": "content_block_stop", "index": index}, message_id)

    def output_tokens(self, text):
        return (self.d.get("usage") or {}).get("output", max(1, len(text) // 4))

    def rate_limit(self, status="allowed", utilization=None, overage=False, claim=None):
        """The plan as the CLI reports it: unifiedWindows holds the 5-hour (unless weekly_only) and
        weekly windows; a per-model window (claim) comes only as the representative rateLimitType."""
        if not self.oauth:
            return
        utilization = self.d.get("plan", 0.12) if utilization is None else utilization
        weekly_only = self.d.get("weekly_only")
        claim = claim or self.d.get("claim") or ("seven_day" if weekly_only else "five_hour")
        windows = {"seven_day": {"utilization": self.d.get("plan_week", 0.45), "resetsAt": WEEK_RESET,
                                 "status": status if weekly_only else "allowed"}}
        if not weekly_only:
            windows["five_hour"] = {"utilization": utilization, "resetsAt": PLAN_RESET, "status": status}
        info = {"status": self.d.get("claim_status", status), "resetsAt": PLAN_RESET if claim == "five_hour" else WEEK_RESET,
                "rateLimitType": claim, "overageStatus": "allowed" if overage else "rejected",
                "isUsingOverage": overage, "unifiedWindows": windows}
        if "claim_utilization" in self.d:
            info["utilization"] = self.d["claim_utilization"]
        out(self.base(type="rate_limit_event", rate_limit_info=info))

    def result(self, text, is_error=False, stop_reason="end_turn", terminal="completed",
               subtype="success", status=None, api_error=None, errors=None, output=None,
               error_type=None):
        usage = self.usage(output if output is not None else self.output_tokens(text or ""))
        usage.update(output_tokens_details={"thinking_tokens": 0}, service_tier="standard")
        record = self.base(type="result", subtype=subtype, is_error=is_error, duration_ms=120,
                           duration_api_ms=20, num_turns=max(1, self.turns), result=text,
                           stop_reason=stop_reason, total_cost_usd=round(COST["usd"] + self.d.get("cost", 0.017952), 6),
                           usage=usage,
                           modelUsage={self.model: {"inputTokens": usage["input_tokens"],
                                                    "outputTokens": usage["output_tokens"],
                                                    "contextWindow": 1000000,
                                                    "maxOutputTokens": 128000}},
                           permission_denials=[], terminal_reason=terminal,
                           api_error_status=status)
        if not is_error:
            record["ttft_ms"] = 100
        if error_type:
            record["api_error_type"] = error_type
        if api_error:
            record["api_error"] = api_error
        if errors:
            record["errors"] = errors
            record.pop("result")
        COST["usd"] = record["total_cost_usd"]
        if not is_error:
            CONVERSATION.append(("assistant", text))
        out(record)


ERRORS = {
    # kind: (api_error_status, error, api_error_type, text, terminal, retries)
    "rate_limit": (429, "rate_limit", "rate_limit_error",
                   "API Error: Request rejected (429) · Number of request tokens has exceeded "
                   "your per-minute rate limit", "api_error", 2),
    "auth": (401, "authentication_failed", "authentication_error",
             "Failed to authenticate. API Error: 401 OAuth token has expired. Please obtain a new "
             "token or refresh your existing token.", "api_error", 2),
    "not_logged_in": (None, "authentication_failed", None, "Not logged in · Please run /login",
                      "api_error", 0),
    "overloaded": (529, "server_error", "overloaded_error",
                   "API Error: Repeated 529 Overloaded errors. The API is at capacity — this is "
                   "usually temporary. Try again in a moment. If it persists, check your "
                   "inference gateway (127.0.0.1:43535).", "api_error", 2),
    "server_error": (500, "server_error", "api_error",
                     "API Error: 500 Internal server error. This is a server-side issue, usually "
                     "temporary — try again in a moment.", "api_error", 2),
    "version_too_old": (400, "invalid_request", "invalid_request_error",
                        "API Error: 400 {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\","
                        "\"code\":\"claude_code_version_too_old\",\"message\":\"This model requires a newer "
                        "version of Claude Code.\"}}", "api_error", 0),
    "prompt_too_long": (400, "invalid_request", "invalid_request_error",
                        "Prompt is too long · the request is ~250000 tokens (limit 200000)",
                        "prompt_too_long", 0),
    # The CLI's own refusal, made locally (AGENTS-SPEC §6.3): no API status, not prompt_too_long.
    "blocking_limit": (None, "invalid_request", None, "Prompt is too long", "blocking_limit", 0),
    "bad_request": (400, "invalid_request", "invalid_request_error",
                    "API Error: 400 messages.0.content.1.image.source: image exceeds 5 MB maximum "
                    "at /home/owner/secret/path.png", "api_error", 0),
}


def synthetic_error(run, kind):
    """Print the CLI's retries, synthetic assistant error line and failed result."""
    if kind == "plan_limit":
        window = run.d.get("limit_window", "five_hour")  # a per-model one: seven_day_opus, seven_day_sonnet
        if window == "five_hour":
            run.rate_limit(status="rejected", utilization=1)
        else:
            run.d.update(claim_status="rejected")
            run.rate_limit(claim=window)
        info = {"status": "rejected", "resetsAt": PLAN_RESET if window == "five_hour" else WEEK_RESET,
                "rateLimitType": window, "overageStatus": "rejected", "overageDisabledReason": "org_level_disabled",
                "isUsingOverage": False}
        text = ("You've hit your 5-hour limit · resets 7am (UTC)" if window == "five_hour" else
                f"You've hit your {window.split('_')[-1].title()} limit · resets Nov 28, 4am (UTC)")
        fields = dict(error="rate_limit", api_error_status=429, api_error="usage_limit_reached",
                      api_error_params={"rate_limit_info": info}, api_error_type="rate_limit_error")
        status, terminal, api_error = 429, "api_error", "usage_limit_reached"
        error_type = "rate_limit_error"
    else:
        status, error, error_type, text, terminal, retries = ERRORS[kind]
        for attempt in range(1, retries + 1):
            out(run.base(type="system", subtype="api_retry", attempt=attempt, max_retries=retries,
                         retry_delay_ms=600, error_status=status, error=error))
        fields = dict(error=error)
        if error_type:
            fields.update(api_error_status=status, api_error_type=error_type)
        api_error = None
    out(run.base(type="assistant", parent_tool_use_id=None, is_api_error_message=True,
                 message={"id": new_uuid(), "model": "<synthetic>", "role": "assistant",
                          "stop_reason": "stop_sequence", "stop_sequence": "", "type": "message",
                          "usage": run.usage(0), "content": [{"type": "text", "text": text}]},
                 **fields))
    run.result(text, is_error=True, stop_reason="stop_sequence", terminal=terminal,
               status=status, api_error=api_error, output=0, error_type=error_type)
    return 1


def answer(run, text):
    d = run.d
    limit = int(os.environ.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS") or 0) * 4
    if d.get("drop"):
        run.message(text, d.get("thinking"), drop=True)
        out(run.base(type="system", subtype="api_retry", attempt=1, max_retries=1,
                     retry_delay_ms=500, error_status=None, error="unknown"))
        message_id = "msg_fake" + new_hex(20)
        run.assistant(message_id, {"type": "text", "text": text})
        run.result(text)
        return 0
    if d.get("error") == "mid_stream":
        run.message(text, d.get("thinking"))
        return synthetic_error(run, "server_error")
    if d.get("fallback"):  # as recorded (fallback_model.jsonl): two retries, then the other model answers
        for attempt in (1, 2):
            out(run.base(type="system", subtype="api_retry", attempt=attempt, max_retries=5,
                         retry_delay_ms=516 * attempt, error_status=529, error="overloaded"))
        out(run.base(type="system", subtype="model_fallback", trigger="overloaded", original_model=run.model,
                     fallback_model="claude-sonnet-5-5", content="Switched to Sonnet 5.5 due to high demand"))
    if limit and len(text) > limit:
        return over_the_limit(run, text, limit)
    run.message(text, d.get("thinking"))
    time.sleep(d.get("tail_ms", 0) / 1000)
    run.rate_limit(overage=bool(d.get("overage")), status="rejected" if d.get("overage") else "allowed")
    run.result(text)
    return 0


def tool_rounds(run, mcp, rounds, final, texts):
    """The model calls the client's tools round by round (OCP answers each tools/call), then
    answers `final` (default: the results it got). A fallback spawn sees the earlier rounds as
    text: it goes on from the round after them."""
    done = "\n".join(texts).count('role="assistant"')
    results = []
    for number, calls in enumerate(rounds[done:], start=done + 1):
        message_id = "msg_fake" + new_hex(20)
        run.turns += 1
        out(run.base(type="system", subtype="status", status="requesting"))
        run.stream({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": run.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": run.usage()}}, message_id)
        pending, blocks = [], []
        for index, call in enumerate(calls):
            tool_use_id = call.get("id") or f"toolu_{number}_{index}_{new_hex(8)}"
            arguments = call.get("arguments", {})
            run.stream({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": tool_use_id, "name": "mcp__ocp__" + call["name"], "input": {}}},
                message_id)
            text = dumps(arguments)
            for piece in split(text, 2) if arguments else []:
                run.stream({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": piece}}, message_id)
                run.pause()
            run.assistant(message_id, {"type": "tool_use", "id": tool_use_id, "name": "mcp__ocp__" + call["name"],
                                       "input": arguments})
            run.stream({"type": "content_block_stop", "index": index}, message_id)
            blocks.append((tool_use_id, call["name"]))
            if call["name"] in [t["name"] for t in mcp.tools]:
                pending.append((tool_use_id, mcp.call(call["name"], arguments, tool_use_id)))
        run.stream({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                    "usage": {"output_tokens": 20}}, message_id)
        run.stream({"type": "message_stop"}, message_id)
        answered = {}
        for tool_use_id, request_id in pending:
            response = STDIN.response(request_id)
            if response is None:
                return 143  # stdin closed while the call waited: OCP let the process go
            answered[tool_use_id] = (response.get("response") or {}).get("mcp_response") or {}
        content = []
        for tool_use_id, name in blocks:
            result = answered.get(tool_use_id, {}).get("result") or {}
            parts = result.get("content") or [{"type": "text", "text": f"No such tool available: {name}"}]
            content.append({"tool_use_id": tool_use_id, "type": "tool_result", "content": parts,
                            "is_error": bool(result.get("isError")) or tool_use_id not in answered})
            results.append(" ".join(p.get("text", "[" + p.get("type", "?") + "]") for p in parts))
        out(run.base(type="user", parent_tool_use_id=None, message={"role": "user", "content": content}))
    if final is None:
        final = "Done: " + " | ".join(results) if results else f"Done after {done} round(s), from the history"
    return answer(run, final)


def over_the_limit(run, text, limit):
    """As 2.1.330 does, --max-turns or not: continue up to 3 times, then fail."""
    thinking = run.d.get("thinking")
    for attempt in range(4):
        piece, text = text[:limit], text[limit:]
        if not text:
            run.message(piece, thinking)
            run.result(piece)
            return 0
        run.message(piece, thinking, stop_reason="max_tokens")
        thinking = None
        if attempt < 3:
            out(run.base(type="user", parent_tool_use_id=None, isSynthetic=True, message={
                "role": "user", "content": [{"type": "text", "text": RECOVERY}]}))
    message = (f"API Error: Claude's response exceeded the {limit // 4} output token maximum. To "
               "configure this behavior, set the CLAUDE_CODE_MAX_OUTPUT_TOKENS environment variable.")
    out(run.base(type="assistant", parent_tool_use_id=None, is_api_error_message=True, error="max_output_tokens",
                 message={"id": new_uuid(), "model": "<synthetic>", "role": "assistant",
                          "stop_reason": "stop_sequence", "stop_sequence": "", "type": "message",
                          "usage": run.usage(0), "content": [{"type": "text", "text": message}]}))
    run.result(message, is_error=True, stop_reason="stop_sequence", terminal="api_error",
               api_error="max_output_tokens")
    return 1


RECOVERY = ("Output token limit hit. Resume directly — no apology, no recap of what you were doing. "
            "Pick up mid-thought if that is where the cut happened. Break remaining work into smaller pieces.")


def split(text, count):
    count = max(1, min(int(count or 1), len(text) or 1))
    size = -(-len(text) // count) if text else 1
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


class Stdin:
    """The CLI's stdin in stream-json mode: user turns, and control_responses (MCP answers),
    which may arrive while a turn waits for one."""

    def __init__(self):
        self.turns = []
        self.responses = {}
        self.closed = False

    def _read_one(self):
        line = sys.stdin.readline()
        if not line:
            self.closed = True
            return
        if not line.strip():
            return
        try:
            message = loads(line)
        except ValueError:
            fail_usage(f"Error parsing streaming input line (type=unknown, {len(line.strip())} "
                       "chars): SyntaxError")
        if message.get("type") == "control_response":
            CONTROL_RESPONSES.append(message)
            self.responses[message["response"].get("request_id")] = message["response"]
            return
        content = message["message"]["content"]
        self.turns.append([{"type": "text", "text": content}] if isinstance(content, str) else content)

    def next_turn(self):
        while not self.turns and not self.closed:
            self._read_one()
        return self.turns.pop(0) if self.turns else None

    def response(self, request_id):
        """Wait for the control_response to `request_id`; None when stdin closes first."""
        while request_id not in self.responses and not self.closed:
            self._read_one()
        return self.responses.pop(request_id, None)


STDIN = Stdin()


def read_input(opts):
    """Yield each user turn's content blocks as the real CLI reads them: with
    --input-format stream-json one turn per stdin line, answered before the next
    is read (stdin may stay open: a warm process); otherwise the one prompt."""
    if opts["input"] != "stream-json":
        yield [{"type": "text", "text": opts["prompt"] or sys.stdin.read()}]
        return
    while True:
        blocks = STDIN.next_turn()
        if blocks is None:
            return
        yield blocks


CONTROL_RESPONSES = []
MCP = None
CONVERSATION = []  # (role, text) since the start or the last /clear
COST = {"usd": 0.0}


class Mcp:
    """The `sdk` MCP server "ocp" on the control channel, as 2.1.330 drives it (AGENTS-SPEC §1.3)."""

    def __init__(self, opts):
        config = loads(opts["mcp_config"]) if opts["mcp_config"] else {}
        if opts["mcp_config"] and not opts["mcp_config"].lstrip().startswith("{"):
            with open(opts["mcp_config"]) as f:
                config = loads(f.read())
        server = (config.get("mcpServers") or {}).get("ocp") or {}
        self.enabled = server.get("type") == "sdk"
        self.allowed = opts["allowed_tools"] == "mcp__ocp__*"
        self.tools, self.status, self.next_id, self.log = [], "failed", 0, []

    def ask(self, message):
        """Send one MCP message to OCP; return its mcp_response (None if stdin closed)."""
        request_id = new_uuid()
        out({"type": "control_request", "request_id": request_id, "request": {
            "subtype": "mcp_message", "server_name": "ocp", "message": message}})
        response = STDIN.response(request_id)
        return ((response or {}).get("response") or {}).get("mcp_response") if response else None

    def handshake(self):
        if not self.enabled or self.status == "connected":
            return
        init = self.ask({"method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "claude-code", "version": VERSION}}, "jsonrpc": "2.0", "id": 0})
        if not init or "result" not in init:
            return
        self.ask({"jsonrpc": "2.0", "method": "notifications/initialized"})
        listed = self.ask({"method": "tools/list", "jsonrpc": "2.0", "id": 1}) or {}
        self.tools = (listed.get("result") or {}).get("tools") or []
        self.status = "connected"
        self.next_id = 2

    def names(self):
        return ["mcp__ocp__" + "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in t["name"])
                for t in self.tools]

    def call(self, name, arguments, tool_use_id):
        """Send tools/call; return the request id to wait on."""
        request_id = new_uuid()
        self.next_id += 1
        out({"type": "control_request", "request_id": request_id, "request": {
            "subtype": "mcp_message", "server_name": "ocp", "message": {
                "method": "tools/call", "params": {"name": name, "arguments": arguments, "_meta": {
                    "claudecode/toolUseId": tool_use_id, "progressToken": self.next_id}},
                "jsonrpc": "2.0", "id": self.next_id}}})
        return request_id


def main():
    argv = sys.argv[1:]
    if argv == ["--version"]:
        print(f"{VERSION} (Claude Code)")
        return 0
    opts = parse_args(argv)
    opts.setdefault("input", "text")
    if opts.get("output") == "stream-json" and "--verbose" not in opts["flags"]:
        fail_usage("Error: When using --print, --output-format=stream-json requires --verbose")
    record = {"argv": argv, "cwd": os.getcwd(), "pid": os.getpid(), "pgid": os.getpgid(0),
              "started": time.time(), "env": dict(os.environ), "ended": "running"}
    directive = {}

    def on_term(signum, frame):  # from the start, as the real CLI: killed early still says so
        if directive.get("ignore_term"):
            return
        record["ended"] = "sigterm"
        log_run(record)
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    token = record["env"].get("CLAUDE_CODE_OAUTH_TOKEN")
    if token:
        import hashlib
        record["env"]["CLAUDE_CODE_OAUTH_TOKEN"] = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    if opts["system_file"]:
        with open(opts["system_file"]) as f:
            record["system_prompt"] = f.read()
    else:
        record["system_prompt"] = opts["system"]
    log_run(record)
    global MCP
    MCP = Mcp(opts)
    record["stdin_blocks"], record["turns"] = [], 0
    code = 0
    for blocks in read_input(opts):
        record["stdin_blocks"] += blocks
        record["turns"] += 1
        if [b.get("text", "").strip() for b in blocks] == ["/clear"]:
            clear(opts, record)
            continue
        code = one_turn(opts, blocks, directive, record)
        if "crash" in directive:
            return code
    time.sleep(directive.get("exit_after_ms", 0) / 1000)  # a slow exit (the real CLI takes ~50 ms)
    record["ended"] = f"exit {code}"
    record["control_responses"] = CONTROL_RESPONSES
    log_run(record)
    return code


def clear(opts, record):
    """The CLI's /clear, as 2.1.330 prints it (stream_input_clear): the conversation is gone."""
    CONVERSATION.clear()
    COST["usd"] = 0.0
    record["clears"] = record.get("clears", 0) + 1
    log_run(record)
    run = Run(opts, [], {})
    out(run.base(type="conversation_reset", new_conversation_id=new_uuid(), trigger="clear",
                 user_message_uuid=new_uuid()))
    out(run.base(type="system", subtype="background_tasks_changed", tasks=[]))
    MCP.handshake()
    run.init(MCP)
    out(run.base(type="result", subtype="success", is_error=False, duration_ms=0, duration_api_ms=0,
                 num_turns=0, result="", stop_reason=None, total_cost_usd=0,
                 usage={"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0}, modelUsage={}, permission_denials=[]))


def read_directive(text):
    """The directive's JSON; a client that quoted the prompt as a JSON string (opencode does,
    for some prompts) escaped it once more."""
    try:
        return loads(text)
    except ValueError:
        return loads(loads('"' + text + '"'), strict=False)


def one_turn(opts, blocks, directive, record):
    """Answer one user turn, steered by the directive in its text; return the exit code so far."""
    texts = [b.get("text", "") for b in blocks if b.get("type") == "text"]
    found = directive_at("\n".join(texts))
    directive.clear()
    directive.update(read_directive(found[2]) if found else {})
    log_run(record)
    if directive.get("grandchild"):
        import subprocess
        record["grandchild"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid
        log_run(record)
    if directive.get("stderr"):
        sys.stderr.write(directive["stderr"] + "\n")
    time.sleep(directive.get("slow_start_ms", 0) / 1000)
    if directive.get("control"):  # ask OCP something on the control channel first
        out({"type": "control_request", "request_id": "req_fake_1", "request": {"subtype": directive["control"]}})
    run = Run(opts, blocks, directive)
    mcp = MCP
    if opts["input"] == "stream-json":
        mcp.handshake()
    if directive.get("mcp_fail"):  # the server did not come up
        mcp.status, mcp.tools = "failed", []
    run.init(mcp)
    if directive.get("hang"):
        while True:
            time.sleep(1)
    if "crash" in directive:
        sys.stderr.write("TypeError: fake crash at /home/owner/.npm/claude/cli.js:1:1\n")
        record["ended"] = "crash"
        log_run(record)
        return int(directive["crash"])
    said = [without_directives(t).strip() for t in texts]
    earlier = sum(1 for role, _ in CONVERSATION if role == "assistant")
    CONVERSATION.append(("user", "\n".join(said)))
    text = directive.get("text")
    if "texts" in directive:  # one scripted reply per earlier assistant turn (in the input, or this process's)
        turn = "\n".join(texts).count('role="assistant"') + earlier
        text = directive["texts"][min(turn, len(directive["texts"]) - 1)]
    if directive.get("recall"):
        text = "Recall: " + " | ".join(t for role, t in CONVERSATION if role == "user")
    if text is None:
        text = "Echo: " + (said[-1] if said else "")
    if directive.get("error") and directive["error"] != "mid_stream":
        return synthetic_error(run, directive["error"])
    if "calls" in directive and mcp.status == "connected" and mcp.allowed:
        code = tool_rounds(run, mcp, directive["calls"], directive.get("final"), texts)
        record["tool_results"] = [r for r in CONTROL_RESPONSES]
        return code
    return answer(run, text)


if __name__ == "__main__":
    sys.exit(main())
