"""``python -m benchmarks.worker SPEC_JSON``: run one sample, write its JSON to ``result_path``.

Started by :func:`benchmarks.harness.execute_isolated`; not meant to be run by hand.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from benchmarks.harness import run_sample


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn the harness's SIGTERM (sample timeout) into an exception so that the adapter's
    # stop() still runs in run_sample's finally block.
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    sample = run_sample(spec)
    Path(spec["result_path"]).write_text(json.dumps(sample))
    return 0


if __name__ == "__main__":
    sys.exit(main())
