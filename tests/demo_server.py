"""`crem-demo` as its own process, with one test hook: an Ask-tab question `SLOW-<name>` waits, while holding its
worker, until the file `<name>` exists in the folder `$CREM_TEST_GATES` (at most a minute), then is answered as
usual. Everything else is the command itself.

    CREM_TEST_GATES=/tmp/gates python tests/demo_server.py --model FOLDER --gallery FOLDER --port 7861 ...
"""

from __future__ import annotations

import os
import sys
import time

import torch

from crem_hf.demo import app

torch.set_num_threads(1)  # several requests at once on a small machine: one intra-op thread each
GATES = os.environ["CREM_TEST_GATES"]
_build_workers = app.CREMDemo.__post_init__


def _gated(prepare):
    def wait_then_prepare(*args, questions, **kwargs):
        if questions and questions[0].startswith("SLOW-"):
            gate = os.path.join(GATES, questions[0].removeprefix("SLOW-"))
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        return prepare(*args, questions=questions, **kwargs)

    return wait_then_prepare


def _post_init(demo):
    _build_workers(demo)
    for worker in demo.workers:  # the hook sits inside a worker's call: a slow request occupies a model slot
        worker.processor.process_generation_inputs = _gated(worker.processor.process_generation_inputs)


app.CREMDemo.__post_init__ = _post_init

if __name__ == "__main__":
    sys.exit(app.main())
