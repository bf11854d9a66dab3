"""`steer serve` for the process-level tests, with test-only latency or fault injection.

    python tests/serve_with_faults.py [steer serve args...]

STEER_TEST_STEP_DELAY=S sleeps S seconds in every engine step (requests that last long enough to be
caught in flight); STEER_TEST_FAULT=delivery makes the worker's delivery raise (a worker fault).
Nothing here is part of the product: it patches the real server, then runs its real CLI.
"""

from __future__ import annotations

import os
import sys
import time

from server.backends.transformers import TransformersBackend
from server.cli import main
from steer.engine import Engine

delay = float(os.environ.get("STEER_TEST_STEP_DELAY", "0"))
if delay:
    step = Engine.step

    def slow_step(self):
        time.sleep(delay)
        return step(self)

    Engine.step = slow_step

if os.environ.get("STEER_TEST_FAULT") == "delivery":

    def broken(self, ev):
        raise RuntimeError("injected delivery fault")

    TransformersBackend._deliver = broken

sys.exit(main(["serve", *sys.argv[1:]]))
