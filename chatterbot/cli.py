"""The `chatterbot` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path

from chatterbot.settings import get_settings

# `chatterbot serve <name>` runs the `main()` of these modules.
SERVICE_ENTRY_POINTS = {
    "edge": "edge.main",
    "chat": "chat_svc.main",
    "context": "context_svc.main",
    "inference": "inference_svc.main",
    "store": "store_svc.main",
}


def cmd_serve(args: argparse.Namespace) -> int:
    importlib.import_module(SERVICE_ENTRY_POINTS[args.service]).main()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from chatterbot.launcher import Mesh
    from chatterbot.logs import configure_logging

    settings = get_settings()
    configure_logging("launcher", settings.log_level, json_output=False)
    mesh = Mesh(settings, Path(args.data_dir or settings.data_dir))
    stop = threading.Event()
    # Signals only set a flag: the main thread started every child, so it alone stops them.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh.start()
    info = mesh.up_info()
    print(
        f"\nChatterBot is up.\n"
        f"  edge:       {info['edge_url']}\n"
        f"  api key:    {info['api_key']}   (service key: may act for any user_id)\n"
        f"  admin key:  {info['admin_key']}\n"
        f"  gRPC:       " + ", ".join(f"{k} {v}" for k, v in info["grpc"].items()) + "\n"
        f"  details:    {mesh.data_dir / 'up.json'}\n"
        f"Press Ctrl-C to stop.\n",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            failed = [name for name, svc in mesh.services.items() if not svc.is_running]
            if failed:
                logging.getLogger("chatterbot.launcher").error("service exited: %s; stopping the mesh", failed)
                return 1
    finally:
        mesh.stop()
        print("ChatterBot stopped.", flush=True)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from store_svc.migrate import upgrade

    settings = get_settings()
    dsn = args.dsn or settings.postgres_dsn
    if not dsn:
        print("set CHATTERBOT_POSTGRES_DSN or pass --dsn", file=sys.stderr)
        return 2
    upgrade(dsn)
    print("migrations applied", flush=True)
    return 0


def cmd_env_example(args: argparse.Namespace) -> int:
    from chatterbot.settings import env_example

    sys.stdout.write(env_example())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatterbot", description="ChatterBot chat backend")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole mesh on this machine (embedded servers unless URLs are set)")
    up.add_argument("--data-dir", help="where data, logs and keys live (default: CHATTERBOT_DATA_DIR)")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service (what compose and Kubernetes run)")
    serve.add_argument("service", choices=sorted(SERVICE_ENTRY_POINTS))
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--dsn", help="PostgreSQL DSN (default: CHATTERBOT_POSTGRES_DSN)")
    migrate.set_defaults(func=cmd_migrate)

    example = sub.add_parser("env-example", help="print every setting with its default (the .env.example text)")
    example.set_defaults(func=cmd_env_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
