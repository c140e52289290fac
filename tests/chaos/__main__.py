"""`python -m tests.chaos up|down|run`: the chaos cluster in network namespaces, and faults under load.

- `up`: make the hosts, start everything, print where the load balancer is, and hold until Ctrl-C or
  SIGTERM (then stop everything and remove the hosts);
- `down`: remove whatever a cluster left (also after a crash): its processes, namespaces and data dir;
- `run [--profile ci|full] [--report FILE]`: up, load, the profile's faults one at a time, the reconciliation
  against PostgreSQL, the report (printed, and as JSON to FILE), then down.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tests.chaos import netns
from tests.chaos.cluster import HOSTS, Cluster

logger = logging.getLogger("tests.chaos")


def _build() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="chatterbot-chaos-"))
    netns.create(list(HOSTS.values()), root)
    # The controller lives on its own host: every address of the cluster is reachable from there, and
    # from nowhere else. Before any thread starts, so every thread and child inherits it.
    netns.enter(HOSTS["ctl"].ns)
    cluster = Cluster(root)
    return cluster


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def up() -> int:
    stop = threading.Event()
    _stop_on_signals(stop)
    cluster = _build()
    try:
        cluster.start()
        print(f"chaos cluster up: {cluster.lb_url} (from `ip netns exec {HOSTS['ctl'].ns} ...`)", flush=True)
        stop.wait()
    finally:
        cluster.stop()
        for line in netns.destroy():
            logger.info("removed %s", line)
    return 0


def down() -> int:
    removed = netns.destroy()
    print("\n".join(removed) if removed else "nothing to remove")
    return 0


def run(profile: str, report_path: Path | None, only: list[str], logs: Path | None) -> int:
    from tests.chaos.scenario import run_scenario

    stop = threading.Event()
    _stop_on_signals(stop)
    cluster = _build()
    try:
        cluster.start()
        report = run_scenario(cluster, profile, stop, only or None)
        print(report.table(), flush=True)
        if report_path is not None:
            report_path.write_text(json.dumps(report.as_dict(), indent=1))
        return 0
    finally:
        cluster.stop()
        if logs is not None:
            _keep_logs(cluster.root, logs)
        netns.destroy()


def _keep_logs(root: Path, to: Path) -> None:
    """Copy every log of the cluster (services, servers, nginx) to `to`, before the data dir goes."""
    to.mkdir(parents=True, exist_ok=True)
    for log in root.rglob("*.log"):
        shutil.copy(log, to / log.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    r = sub.add_parser("run")
    r.add_argument("--profile", choices=["ci", "full"], default="full")
    r.add_argument("--report", type=Path, help="write the report, every request included, as JSON here")
    r.add_argument("--fault", action="append", default=[], help="run only this fault (repeatable)")
    r.add_argument("--logs", type=Path, help="keep every log of the cluster in this directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "up":
        return up()
    if args.command == "down":
        return down()
    return run(args.profile, args.report, args.fault, args.logs)


if __name__ == "__main__":
    sys.exit(main())
