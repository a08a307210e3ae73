"""The real claude CLI 2.1.330 between OCP and a fake Anthropic API that answers with a per-model
window (`anthropic-ratelimit-unified-representative-claim: seven_day_opus`): what reaches OCP's
plan state through the CLI's rate_limit_event, and what OCP holds once that window refuses."""

import time

from e2e.base import RealCliTest
from e2e.fake_anthropic import Reply, unified_headers


def opus_window(status: str, utilization: float, week: int) -> dict:
    """The headers of an account whose Opus weekly window is the representative one."""
    headers = unified_headers(status="allowed", claim="five_hour", five_hour=0.2, seven_day=0.4)
    headers.update({"anthropic-ratelimit-unified-status": status,
                    "anthropic-ratelimit-unified-representative-claim": "seven_day_opus",
                    "anthropic-ratelimit-unified-reset": str(week),
                    "anthropic-ratelimit-unified-7d_opus-utilization": str(utilization),
                    "anthropic-ratelimit-unified-7d_opus-reset": str(week),
                    "anthropic-ratelimit-unified-7d_opus-status": status})
    return headers


class PerModelWindowThroughTheRealCli(RealCliTest):
    def test_the_opus_window_reaches_the_plan_and_its_limit_holds_opus_only(self):
        week = int(time.time()) + 3 * 86400
        self.upstream.script(Reply(text="fine", unified=opus_window("allowed_warning", 0.91, week)))
        status, _, body = self.chat("hello", model="opus")
        self.assertEqual(status, 200, body)
        windows = self.server.plan.snapshot()["windows"]
        # measured: the CLI reports the representative window with its reset, as "allowed" (not "allowed_warning")
        # and without a utilization, beside the 5-hour and weekly windows of unifiedWindows
        self.assertEqual((windows["seven_day_opus"]["status"], windows["seven_day_opus"]["resets_at"]),
                         ("allowed", week), windows)
        self.assertEqual(windows["five_hour"]["utilization"], 0.2)

        self.upstream.script(Reply(status=429, error_type="rate_limit_error", error_message="Opus limit reached",
                                   unified=opus_window("rejected", 1.0, week)))
        status, headers, body = self.chat("again", model="opus")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"), body)
        self.assertAlmostEqual(int(headers["Retry-After"]), week - time.time(), delta=60)
        calls = len(self.upstream.messages())
        status, _, body = self.chat("and again", model="opus")
        self.assertEqual((status, body["error"]["code"]), (429, "usage_limit_reached"))
        self.assertIn("Other models still work", body["error"]["message"])
        self.assertEqual(len(self.upstream.messages()), calls, "held by OCP: no CLI reached upstream")

        self.upstream.script(Reply(text="sonnet is fine", unified=unified_headers(five_hour=0.21, seven_day=0.41)))
        status, _, body = self.chat("hi", model="sonnet")
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "sonnet is fine"))
        self.assertEqual(len(self.upstream.messages()), calls + 1)
