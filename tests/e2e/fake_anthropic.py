"""A scriptable fake of Anthropic's Messages API on 127.0.0.1, for the real claude CLI.

    upstream = FakeAnthropic()            # starts on a free port; .url for ANTHROPIC_BASE_URL
    upstream.script(Reply(text="Hi", deltas=5, pace_s=0.2))   # the next /v1/messages answers
    upstream.messages()                   # every /v1/messages body that arrived, oldest first
    upstream.close()

Each POST /v1/messages takes the next scripted Reply (the last one repeats;
with none, a default answer), or what `responder(body)` returns when set. A Reply streams as SSE when the request says
`stream: true` (message_start, content_block_start/delta/stop for thinking
and text, message_delta with usage and stop_reason, message_stop) and is JSON
otherwise. `status` answers an Anthropic error body with that status and
`headers`; `drop_after` closes the connection after that many text deltas.
`unified` adds the subscription's `anthropic-ratelimit-unified-*` headers.
`tool_uses` makes the model call tools after its text (stop_reason tool_use).
Any other route answers 404, and is recorded too.
"""

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

DEFAULT_TEXT = "Hello from the fake Anthropic server."


@dataclasses.dataclass
class Reply:
    text: str = DEFAULT_TEXT
    thinking: str = ""
    deltas: int = 4
    pace_s: float = 0.0
    status: int = 200
    error_type: str = "api_error"
    error_message: str = "error"
    headers: Dict[str, str] = dataclasses.field(default_factory=dict)
    drop_after: Optional[int] = None
    input_tokens: int = 321
    output_tokens: int = 0  # 0: a token for every four characters sent
    cache_read: int = 0
    cache_creation: int = 0
    unified: Optional[Dict[str, str]] = None
    tool_uses: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # {"name", "input"[, "id"]}


def unified_headers(status="allowed", claim="five_hour", reset=None, five_hour=0.12, seven_day=0.31,
                    overage="rejected") -> Dict[str, str]:
    """The `anthropic-ratelimit-unified-*` headers a subscription request gets."""
    reset = int(reset or time.time() + 3 * 3600)
    week = int(time.time() + 4 * 86400)
    short = {"five_hour": "5h", "seven_day": "7d"}
    headers = {"anthropic-ratelimit-unified-status": status,
               "anthropic-ratelimit-unified-reset": str(reset if claim == "five_hour" else week),
               "anthropic-ratelimit-unified-representative-claim": claim,
               "anthropic-ratelimit-unified-overage-status": overage,
               "anthropic-ratelimit-unified-5h-utilization": str(five_hour),
               "anthropic-ratelimit-unified-5h-reset": str(reset),
               "anthropic-ratelimit-unified-5h-status": "rejected" if status == "rejected" and claim == "five_hour" else "allowed",
               "anthropic-ratelimit-unified-7d-utilization": str(seven_day),
               "anthropic-ratelimit-unified-7d-reset": str(week),
               "anthropic-ratelimit-unified-7d-status": "rejected" if status == "rejected" and short.get(claim) == "7d" else "allowed"}
    if overage == "rejected":
        headers["anthropic-ratelimit-unified-overage-disabled-reason"] = "org_level_disabled"
    return headers


def split(text: str, count: int) -> List[str]:
    count = max(1, min(count, len(text) or 1))
    size = -(-len(text) // count) if text else 1
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


class FakeAnthropic:
    def __init__(self):
        self._lock = threading.Lock()
        self._script: List[Reply] = []
        self.responder: Optional[Any] = None  # body -> Reply, instead of the script (concurrent tests)
        self.requests: List[Dict[str, Any]] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.fake = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script = list(replies)

    def next_reply(self, body: Optional[Dict[str, Any]] = None) -> Reply:
        with self._lock:
            if self.responder is not None:
                return self.responder(body or {})
            if not self._script:
                return Reply()
            return self._script.pop(0) if len(self._script) > 1 else self._script[0]

    def record(self, entry: Dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def messages(self) -> List[Dict[str, Any]]:
        """Return the bodies of every /v1/messages request, oldest first."""
        with self._lock:
            return [r["body"] for r in self.requests if r["path"].split("?")[0] == "/v1/messages"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A CLI killed mid-answer hangs up on us: that is a test scenario, not a failure."""
        import sys
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.fake.record({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": None})
        self.send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        fake = self.server.fake
        fake.record({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
        if self.path.split("?")[0] != "/v1/messages" or not isinstance(body, dict):
            self.send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "not found"}})
            return
        reply = fake.next_reply(body)
        headers = dict(reply.headers)
        if reply.unified:
            headers.update(reply.unified)
        headers["request-id"] = "req_fake" + uuid.uuid4().hex[:20]
        if reply.status != 200:
            self.send_json(reply.status, {"type": "error", "error": {
                "type": reply.error_type, "message": reply.error_message}}, headers)
            return
        text = reply.text
        limit = int(body.get("max_tokens") or 0) * 4
        stop_reason = "end_turn"
        if limit and len(text) > limit:
            text, stop_reason = text[:limit], "max_tokens"
        if reply.tool_uses:
            stop_reason = "tool_use"
            for use in reply.tool_uses:
                use.setdefault("id", "toolu_fake" + uuid.uuid4().hex[:16])
        if body.get("stream"):
            self.stream(body, reply, text, stop_reason, headers)
        else:
            self.send_json(200, self.message(body, reply, text, stop_reason), headers)

    def usage(self, reply: Reply, text: str) -> Dict[str, int]:
        return {"input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens or max(1, len(text) // 4),
                "cache_read_input_tokens": reply.cache_read,
                "cache_creation_input_tokens": reply.cache_creation}

    def message(self, body, reply, text, stop_reason) -> Dict[str, Any]:
        content = []
        if reply.thinking:
            content.append({"type": "thinking", "thinking": reply.thinking, "signature": "sig"})
        if text:
            content.append({"type": "text", "text": text})
        content += [{"type": "tool_use", "id": u["id"], "name": u["name"], "input": u["input"]} for u in reply.tool_uses]
        return {"id": "msg_fake" + uuid.uuid4().hex[:20], "type": "message", "role": "assistant",
                "model": body.get("model"), "content": content, "stop_reason": stop_reason,
                "stop_sequence": None, "usage": self.usage(reply, text)}

    def stream(self, body, reply, text, stop_reason, headers):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        usage = self.usage(reply, text)
        start_usage = dict(usage, output_tokens=1)
        message = {"id": "msg_fake" + uuid.uuid4().hex[:20], "type": "message", "role": "assistant",
                   "model": body.get("model"), "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": start_usage}
        self.event("message_start", {"type": "message_start", "message": message})
        index = 0
        if reply.thinking:
            self.event("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
            for piece in split(reply.thinking, 3):
                self.event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "thinking_delta", "thinking": piece}})
            self.event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "signature_delta", "signature": "sig"}})
            self.event("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        if text or not reply.tool_uses:
            self.event("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {"type": "text", "text": ""}})
            for number, piece in enumerate(split(text, reply.deltas)):
                if reply.drop_after is not None and number >= reply.drop_after:
                    self.connection.shutdown(2)  # the connection drops mid-answer
                    return
                self.event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": piece}})
                if reply.pace_s:
                    time.sleep(reply.pace_s)
            self.event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        for use in reply.tool_uses:
            self.event("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": use["id"], "name": use["name"], "input": {}}})
            arguments = json.dumps(use["input"])
            for piece in split(arguments, 2):
                self.event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "input_json_delta", "partial_json": piece}})
            self.event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        self.event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                     "stop_sequence": None}, "usage": {"output_tokens": usage["output_tokens"]}})
        self.event("message_stop", {"type": "message_stop"})

    def event(self, name: str, data: Dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def send_json(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
