#!/usr/bin/env python3
"""Entry point LocalAI spawns (through run.sh): parse args, set up logging, serve until told to stop."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from qwen_asr_worker import parent_watch

GRACE_SECONDS = 10.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments; LocalAI passes `--addr HOST:PORT`."""
    parser = argparse.ArgumentParser(description="Qwen3-ASR gRPC worker for LocalAI")
    parser.add_argument("--addr", default="127.0.0.1:50051", help="address to listen on (default %(default)s)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="logging level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; requests in flight get a grace period, then exit 0."""
    # Read before the seconds-long torch import: a spawner that dies meanwhile is already replaced by init later.
    parent = os.getppid()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("backend")
    log.info("starting: pid %d, parent pid %d, address %s", os.getpid(), parent, args.addr)
    from qwen_asr_worker.server import create_server  # imports torch and qwen-asr: the slow part of startup

    server, _port, _servicer = create_server(args.addr)
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("signal %d: stopping (grace %.0f s)", signum, GRACE_SECONDS)
        server.stop(GRACE_SECONDS)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent_watch.start(lambda: stop(signal.SIGTERM, None), parent=parent)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
