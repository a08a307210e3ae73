"""GET /metrics read by the Prometheus project's own parser (prometheus_client)."""

import unittest

from e2e.base import require
from helpers import ServerTest, directive

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # checked in setUpClass: skip on a bare machine, fail under OCP_E2E=1
    text_string_to_metric_families = None

ADMIN = "ocp_admin_key_for_metrics_client000"


class PrometheusReadsMetrics(ServerTest):
    env = {"OCP_ADMIN_KEY": ADMIN}

    @classmethod
    def setUpClass(cls):
        require(text_string_to_metric_families is not None, "prometheus_client is not installed",
                "run the suite with a python that has prometheus_client, as .ci/run does")
        super().setUpClass()

    def test_families_and_samples(self):
        self.chat("one", model="haiku")
        self.chat("x " + directive(error="overloaded"), model="haiku")
        self.settle()  # (their CLIs exit after the answers went out: none is in flight then)
        status, _, text = self.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        self.assertEqual(status, 200)
        parsed = list(text_string_to_metric_families(text))
        self.assertEqual(len(parsed), len({f.name for f in parsed}), "no family is split in two")
        self.assertFalse([f.name for f in parsed if f.type == "unknown"])
        families = {f.name: f for f in parsed}
        self.assertEqual(families["ocp_requests"].type, "counter")
        self.assertEqual(families["ocp_request_duration_seconds"].type, "histogram")
        outcomes = {s.labels["status"]: s.value for s in families["ocp_requests"].samples
                    if s.name == "ocp_requests_total"}
        self.assertEqual(outcomes, {"ok": 1.0, "error": 1.0})
        self.assertEqual(families["ocp_in_flight"].samples[0].value, 0)


if __name__ == "__main__":
    unittest.main()
