"""The `chatterbot` command."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatterbot.settings import get_settings

if TYPE_CHECKING:
    from chatterbot.api_keys import ApiKeyRecord
    from chatterbot.jetstream import Job


def cmd_serve(args: argparse.Namespace) -> int:
    from ops import components

    try:
        names = components.parse_targets(args.service)
    except ValueError as exc:
        print(f"chatterbot serve: {exc}", file=sys.stderr)
        return 2
    if len(names) == 1 and args.ready_file is None:
        # One component alone runs its own entry point: what compose and Kubernetes run.
        importlib.import_module(components.COMPONENTS[names[0]]).main()
    else:
        components.run(names, Path(args.ready_file) if args.ready_file else None)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from chatterbot.logs import configure_logging
    from ops.embedded import ServerNotInstalled, StartCancelled
    from ops.launcher import Mesh, RestartPolicy, Supervisor

    settings = get_settings()
    configure_logging("launcher", settings.log_level, json_output=False)
    mesh = Mesh(
        settings,
        Path(args.data_dir or settings.data_dir),
        mode=args.mode or settings.up_mode,
        processes=settings.up_processes if args.processes is None else args.processes,
    )
    given = {"initial_delay": args.restart_delay, "burst": args.restart_burst, "window": args.restart_window}
    policy = RestartPolicy(**{name: value for name, value in given.items() if value is not None})
    stop = threading.Event()
    # Signals only set a flag: the main thread and the supervisor's threads, which started every child, alone
    # stop them; a restart that is pending or under way is given up at once. The flag is set from a thread of
    # its own: a handler runs in the main thread, which may hold the event's lock inside `stop.wait()`.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: threading.Thread(target=stop.set, name="stop").start())
    try:
        mesh.start(cancel=stop)
    except StartCancelled:
        print("ChatterBot stopped while starting.", flush=True)
        return 0
    except ServerNotInstalled as exc:
        print(f"chatterbot up: {exc}", file=sys.stderr)
        return 2
    info = mesh.up_info()
    print(
        f"\nChatterBot is up.\n"
        f"  edge:       {info['edge_url']}\n"
        f"  api key:    {info['api_key']}   (service key: may act for any user_id)\n"
        f"  admin key:  {info['admin_key']}\n"
        f"  gRPC:       " + ", ".join(f"{k} {v}" for k, v in info["grpc"].items()) + "\n"
        f"  details:    {mesh.data_dir / 'up.json'}\n"
        f"  status:     chatterbot status --data-dir {mesh.data_dir}\n"
        f"A process that exits is restarted; Ctrl-C stops everything.\n",
        flush=True,
    )
    Supervisor(mesh, policy).run(stop)
    print("ChatterBot stopped.", flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ops.launcher import format_status, launcher_running, read_status

    data_dir = Path(args.data_dir or get_settings().data_dir).resolve()
    status = read_status(data_dir)
    if status is None:
        print(f"chatterbot status: no launcher has run in {data_dir}", file=sys.stderr)
        return 3
    running = launcher_running(status)
    if args.json:
        print(json.dumps({**status, "launcher_running": running}, indent=2))
    else:
        print(format_status(status))
    if not running:
        print(
            f"chatterbot status: the launcher of {data_dir} is not running; shown: what it last wrote",
            file=sys.stderr,
        )
        return 3
    # As `systemctl is-system-running` says degraded: 1 while any process is not running.
    return 0 if all(c["state"] == "running" for c in status["components"]) else 1


def _shard_dsns(args: argparse.Namespace) -> list[str]:
    """Shard DSNs from --shards, else from the settings (CHATTERBOT_POSTGRES_SHARDS, or the one DSN)."""
    from store_svc.sharding import shard_specs

    if getattr(args, "shards", None):
        return [dsn.strip() for dsn in args.shards.split(",") if dsn.strip()]
    settings = get_settings()
    return [spec.dsn for spec in shard_specs(settings.postgres_shards, (), settings.postgres_dsn)]


def cmd_migrate(args: argparse.Namespace) -> int:
    from store_svc.migrate import upgrade

    dsns = [args.dsn] if args.dsn else _shard_dsns(args)
    if not dsns:
        print("set CHATTERBOT_POSTGRES_SHARDS or CHATTERBOT_POSTGRES_DSN, or pass --dsn", file=sys.stderr)
        return 2
    for index, dsn in enumerate(dsns):
        upgrade(dsn)
        print(f"shard {index}: migrations applied", flush=True)
    return 0


def cmd_shards_rebalance(args: argparse.Namespace) -> int:
    import asyncio

    from store_svc.rebalance import rebalance

    dsns = _shard_dsns(args)
    if len(dsns) < 2:
        print(
            "rebalancing needs two or more shards (CHATTERBOT_POSTGRES_SHARDS or --shards)", file=sys.stderr
        )
        return 2
    report = asyncio.run(rebalance(dsns, concurrency=args.concurrency, max_users=args.max_users))
    print(
        f"scanned {report.scanned_users} users on {len(dsns)} shards, moved {report.moved_users}", flush=True
    )
    for (source, target), users in sorted(report.moves.items()):
        print(f"  shard {source} -> shard {target}: {users} users")
    if report.moved_rows:
        print("  rows moved: " + ", ".join(f"{t} {n}" for t, n in sorted(report.moved_rows.items())))
    if report.stranded_users:
        print(
            f"{len(report.stranded_users)} users have rows on an old shard after their move (left in place): "
            + ", ".join(report.stranded_users[:20]),
            file=sys.stderr,
        )
        return 1
    print("complete" if report.complete else "stopped at --max-users; run again to continue", flush=True)
    return 0


def cmd_shards_status(args: argparse.Namespace) -> int:
    import asyncio

    from store_svc.rebalance import shard_counts

    dsns = _shard_dsns(args)
    if not dsns:
        print("set CHATTERBOT_POSTGRES_SHARDS or CHATTERBOT_POSTGRES_DSN, or pass --shards", file=sys.stderr)
        return 2
    print(
        f"{'shard':>5} {'users':>9} {'conversations':>13} {'messages':>10} {'job_results':>11} {'misplaced':>9}"
    )
    for c in asyncio.run(shard_counts(dsns)):
        print(
            f"{c.index:>5} {c.users:>9} {c.conversations:>13} {c.messages:>10} {c.job_results:>11} "
            f"{c.misplaced_users:>9}"
        )
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_dlq(args))


async def _dlq(args: argparse.Namespace) -> int:
    from chat_svc.dlq import list_dead_letters, replay
    from chat_svc.jobs import JobDeps, put_result
    from chatterbot.guarded_client import GuardedClient
    from chatterbot.jetstream import connect, disconnect, ensure_streams
    from chatterbot.v1 import store_pb2_grpc, types_pb2

    settings = get_settings()
    nc = await connect(settings, "chatterbot-cli")
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        if args.dlq_command == "list":
            letters = await list_dead_letters(js)
            for d in letters:
                print(f"{d.correlation_id}  {d.priority:<11} {d.time:%Y-%m-%d %H:%M:%S}  {d.error}")
            print(f"{len(letters)} dead-lettered job(s)", file=sys.stderr)
            return 0
        store = GuardedClient("store", settings.store_addr, store_pb2_grpc.StoreServiceStub, settings)
        try:
            deps = JobDeps(js, nc, store, settings.job_result_ttl_seconds)

            async def pending_again(job: Job) -> None:
                await put_result(
                    deps,
                    job.correlation_id,
                    job.user_id,
                    types_pb2.JOB_STATUS_PENDING,
                    conversation_id=job.conversation_id,
                )

            try:
                job = await replay(js, args.correlation_id, pending_again)
            except LookupError:
                print(f"{args.correlation_id} is not in the dead-letter stream", file=sys.stderr)
                return 1
        finally:
            await store.close()
        print(f"{job.correlation_id} queued again ({job.priority})")
        return 0
    finally:
        await disconnect(nc)


def _up_json() -> dict[str, Any]:
    """What the running `chatterbot up` wrote in the data dir (up.json); empty when there is none."""
    import json

    try:
        data = json.loads((Path(get_settings().data_dir) / "up.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_addr(args: argparse.Namespace) -> str:
    """store_svc's address: --store, else CHATTERBOT_STORE_ADDR, else the running `chatterbot up`'s (its
    up.json in the data dir), else the configured default."""
    import os

    if args.store:
        return args.store
    settings = get_settings()
    if "CHATTERBOT_STORE_ADDR" not in os.environ:
        try:
            return str(_up_json()["grpc"]["store"])
        except (KeyError, TypeError):
            pass
    return settings.store_addr


def _admin_key(args: argparse.Namespace, store_addr: str) -> str:
    """The admin key `chatterbot keys` sends: --admin-key, else CHATTERBOT_ADMIN_KEY, else the first of
    CHATTERBOT_ADMIN_KEYS, else that of the running `chatterbot up` when its store is the one called."""
    import os

    if args.admin_key:
        return str(args.admin_key)
    if os.environ.get("CHATTERBOT_ADMIN_KEY"):
        return os.environ["CHATTERBOT_ADMIN_KEY"]
    settings = get_settings()
    if settings.admin_keys:
        return settings.admin_keys[0]
    up = _up_json()
    try:
        # Never handed to another store than the one it was made for.
        return str(up["admin_key"]) if up["grpc"]["store"] == store_addr else ""
    except (KeyError, TypeError):
        return ""


def cmd_keys(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_keys(args))


async def _keys(args: argparse.Namespace) -> int:
    import grpc

    from chatterbot import api_keys, wire
    from chatterbot.breaker import CircuitOpenError
    from chatterbot.guarded_client import GuardedClient
    from chatterbot.v1 import store_pb2, store_pb2_grpc

    addr = _store_addr(args)
    admin_key = _admin_key(args, addr)
    if not admin_key:
        print(
            "chatterbot keys: managing keys needs an admin key: pass --admin-key, set CHATTERBOT_ADMIN_KEY "
            "(or CHATTERBOT_ADMIN_KEYS), or run it beside `chatterbot up` (its up.json)",
            file=sys.stderr,
        )
        return 2
    auth = ((api_keys.API_KEY_METADATA, admin_key),)
    store = GuardedClient("store", addr, store_pb2_grpc.StoreServiceStub, get_settings())
    try:
        if args.keys_command == "create":
            kind = api_keys.USER if args.user else api_keys.ADMIN if args.admin else api_keys.SERVICE
            if args.user is not None and not wire.is_user_id(args.user):
                print(f"--user must be {wire.USER_ID_RULE} (as user_id is everywhere)", file=sys.stderr)
                return 2
            key = api_keys.generate_key()
            created: store_pb2.CreateApiKeyResponse = await store.call(
                store.stub.CreateApiKey,
                store_pb2.CreateApiKeyRequest(
                    key_hash=api_keys.hash_key(key),
                    prefix=api_keys.display_prefix(key),
                    kind=api_keys.kind_to_pb(kind),
                    user_id=args.user or "",
                    name=args.name,
                    requests_per_minute=args.rpm,
                    tokens_per_minute=args.tpm,
                    route_limits=_route_limits_pb(args.limit),
                ),
                metadata=auth,
                retry=False,
            )
            record = api_keys.record_from_pb(created.api_key)
            # The key alone on stdout (KEY=$(chatterbot keys create ...)); the rest on stderr.
            print(key, flush=True)
            print(
                f"key {record.key_id}: {_describe(record)}. This is the only time the key is shown.",
                file=sys.stderr,
            )
            return 0
        if args.keys_command == "list":
            listed: store_pb2.ListApiKeysResponse = await store.call(
                store.stub.ListApiKeys, store_pb2.ListApiKeysRequest(user_id=args.user or ""), metadata=auth
            )
            records = [api_keys.record_from_pb(pb) for pb in listed.api_keys]
            defaults = get_settings().rate_limits
            print(
                f"{'id':<16} {'prefix':<11} {'kind':<7} {'user':<20} {'rpm':>6} {'tpm':>8} "
                f"{'created':<19} {'revoked':<19} {'limits':<24} name"
            )
            for r in records:
                print(
                    f"{r.key_id:<16} {r.prefix:<11} {r.kind:<7} {r.user_id or '-':<20} "
                    f"{r.requests_per_minute or '-':>6} {r.tokens_per_minute or '-':>8} {_when(r.created_at):<19} "
                    f"{_when(r.revoked_at):<19} {_limits_in_force(r, defaults):<24} {r.name}"
                )
            print(f"{len(records)} key(s), {sum(r.revoked for r in records)} revoked", file=sys.stderr)
            return 0
        target = args.key
        if target.startswith(api_keys.KEY_PREFIX) and len(target) > api_keys.DISPLAY_PREFIX_CHARS:
            # The whole key: find its id by its hash.
            found: store_pb2.GetApiKeyResponse = await store.call(
                store.stub.GetApiKey, store_pb2.GetApiKeyRequest(key_hash=api_keys.hash_key(target))
            )
            target = found.api_key.key_id
        if args.keys_command == "update":
            paths = [
                path
                for path, given in (
                    ("requests_per_minute", args.rpm is not None),
                    ("tokens_per_minute", args.tpm is not None),
                    ("route_limits", args.limit is not None or args.clear_limits),
                )
                if given
            ]
            if not paths:
                print("nothing to update: give --rpm, --tpm, --limit or --clear-limits", file=sys.stderr)
                return 2
            update = store_pb2.UpdateApiKeyRequest(
                key_id_or_prefix=target,
                api_key=store_pb2.ApiKey(
                    requests_per_minute=args.rpm or 0,
                    tokens_per_minute=args.tpm or 0,
                    route_limits=_route_limits_pb(args.limit or []),
                ),
            )
            update.update_mask.paths.extend(paths)
            updated: store_pb2.UpdateApiKeyResponse = await store.call(
                store.stub.UpdateApiKey, update, metadata=auth
            )
            record = api_keys.record_from_pb(updated.api_key)
            print(
                f"updated {record.key_id} ({record.prefix}): {_describe(record)}; route limits in force: "
                f"{_limits_in_force(record, get_settings().rate_limits)}. Edges apply it within "
                f"{get_settings().api_key_cache_seconds:g} s"
            )
            return 0
        revoked: store_pb2.RevokeApiKeyResponse = await store.call(
            store.stub.RevokeApiKey, store_pb2.RevokeApiKeyRequest(key_id_or_prefix=target), metadata=auth
        )
        record = api_keys.record_from_pb(revoked.api_key)
        print(
            f"revoked {record.key_id} ({record.prefix}, {_describe(record)}) at {_when(record.revoked_at)} UTC; "
            f"edges and chat services stop accepting it within {get_settings().api_key_cache_seconds:g} s"
        )
        return 0
    except grpc.aio.AioRpcError as exc:
        print(f"store_svc at {addr}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except CircuitOpenError:
        print(f"store_svc at {addr} is unavailable", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text} is not a count from 0 to {2**31 - 1}")
    return value


def _route_limit_arg(text: str) -> tuple[str, str]:
    from chatterbot.api_keys import route_limit

    try:
        return route_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _route_limits_pb(limits: list[tuple[str, str]]) -> list[Any]:
    from chatterbot.v1 import store_pb2

    return [store_pb2.RouteLimit(route=route, limit=spec) for route, spec in limits]


def _limits_in_force(record: ApiKeyRecord, defaults: str) -> str:
    """The route limits the edge holds a key to (one word): its own, `none` (only its own rpm/tpm), or
    `default:` and the route defaults."""
    from chatterbot.api_keys import Principal, route_limits_text

    if Principal.of(record).has_own_limits:
        return route_limits_text(record.route_limits) or "none"
    return f"default:{defaults}" if defaults else "none"


def _describe(record: ApiKeyRecord) -> str:
    from chatterbot.api_keys import USER

    who = f"user key for {record.user_id!r}" if record.kind == USER else f"{record.kind} key"
    limits = [
        f"{record.requests_per_minute} requests/min" if record.requests_per_minute else "",
        f"{record.tokens_per_minute} tokens/min" if record.tokens_per_minute else "",
        *(f"{route} {spec}" for route, spec in record.route_limits),
    ]
    return ", ".join([who, *filter(None, limits)] + ([f"name {record.name!r}"] if record.name else []))


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def cmd_certs(args: argparse.Namespace) -> int:
    from chatterbot.tls import PARTNER, parse_hosts, write_dev_certificates

    try:
        hosts = parse_hosts(args.hosts)
        out = Path(args.out) if args.out else Path(get_settings().data_dir) / "tls"
        made = write_dev_certificates(out, hosts, args.days)
    except (ValueError, OSError) as exc:
        print(f"chatterbot certs: {exc}", file=sys.stderr)
        return 2
    out = made.directory.resolve()
    ca = "made a new CA" if made.created_ca else "kept the CA already there"
    print(f"wrote certificates in {out} ({ca}; keys are mode 0600, keep ca-key.pem private):")
    for name, names in made.names.items():
        print(f"  {name + '.pem':<15} {', '.join(names)}")
    print(
        "\nMutual TLS between services (each process its own component's pair, e.g. chat):\n"
        f"  CHATTERBOT_GRPC_TLS_CA={out}/ca.pem\n"
        f"  CHATTERBOT_GRPC_TLS_CERT={out}/chat.pem\n"
        f"  CHATTERBOT_GRPC_TLS_KEY={out}/chat-key.pem\n"
        "TLS on chat_svc's partner port (CHATTERBOT_PARTNER_GRPC_PORT):\n"
        f"  CHATTERBOT_PARTNER_TLS_CERT={out}/{PARTNER}.pem\n"
        f"  CHATTERBOT_PARTNER_TLS_KEY={out}/{PARTNER}-key.pem"
    )
    return 0


def cmd_env_example(args: argparse.Namespace) -> int:
    from chatterbot.settings import env_example

    sys.stdout.write(env_example())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatterbot", description="ChatterBot chat backend")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start the whole mesh on this machine (embedded servers unless URLs are set)"
    )
    up.add_argument("--data-dir", help="where data, logs and keys live (default: CHATTERBOT_DATA_DIR)")
    up.add_argument(
        "--mode",
        choices=("combined", "split"),
        help="combined: processes that each run every component, in process (default: CHATTERBOT_UP_MODE, "
        "combined); split: a process per service",
    )
    up.add_argument(
        "--processes",
        type=int,
        help="combined mode: processes sharing the ports (default: CHATTERBOT_UP_PROCESSES; 0 = one per core but one, at least one)",
    )
    # Defaults (None here) are RestartPolicy's, listed in the README's "Supervision".
    up.add_argument(
        "--restart-delay",
        type=float,
        help="seconds before the first restart of a process that exited; doubled (and jittered) for each "
        "exit in a row",
    )
    up.add_argument(
        "--restart-burst",
        type=int,
        help="restarts allowed within --restart-window; past them a process is reported and left stopped",
    )
    up.add_argument("--restart-window", type=float, help="seconds over which --restart-burst counts")
    up.set_defaults(func=cmd_up)

    status_of_up = sub.add_parser(
        "status",
        help="every process of the running `chatterbot up`: pid, uptime, restarts, health",
        description="Reads the status the running launcher keeps in its data dir. Exit status: 0 when every "
        "process runs, 1 when one is restarting or was given up, 3 when no launcher runs there.",
    )
    status_of_up.add_argument("--data-dir", help="the launcher's data dir (default: CHATTERBOT_DATA_DIR)")
    status_of_up.add_argument("--json", action="store_true", help="the status as JSON")
    status_of_up.set_defaults(func=cmd_status)

    serve = sub.add_parser(
        "serve",
        help="run one service (what compose and Kubernetes run), or several in one process",
        description="Run components: one (edge, chat, context, store, inference, worker), a comma-separated "
        "list of them, or all. Components in one process call each other in process; every one still "
        "listens on its own port.",
    )
    serve.add_argument("service", metavar="COMPONENTS", help="e.g. edge, or edge,chat,context,store, or all")
    serve.add_argument("--ready-file", help="write this file once every component serves (removed at exit)")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations to every shard")
    migrate.add_argument("--dsn", help="one database only (default: every shard of the settings)")
    migrate.add_argument("--shards", help="comma-separated shard DSNs (default: CHATTERBOT_POSTGRES_SHARDS)")
    migrate.set_defaults(func=cmd_migrate)

    shards = sub.add_parser("shards", help="the PostgreSQL shards of store_svc").add_subparsers(
        dest="shards_command", required=True
    )
    rebalance = shards.add_parser(
        "rebalance", help="after the shard list grew, move the users whose shard changed (resumable)"
    )
    rebalance.add_argument(
        "--shards", help="comma-separated shard DSNs (default: CHATTERBOT_POSTGRES_SHARDS)"
    )
    rebalance.add_argument("--concurrency", type=int, default=4, help="users moved at once")
    rebalance.add_argument("--max-users", type=int, default=None, help="stop after moving this many")
    rebalance.set_defaults(func=cmd_shards_rebalance)
    status = shards.add_parser("status", help="row counts per shard and users not yet on their shard")
    status.add_argument("--shards", help="comma-separated shard DSNs (default: CHATTERBOT_POSTGRES_SHARDS)")
    status.set_defaults(func=cmd_shards_status)

    dlq = sub.add_parser("dlq", help="jobs that failed their last try").add_subparsers(
        dest="dlq_command", required=True
    )
    dlq.add_parser("list", help="list dead-lettered jobs").set_defaults(func=cmd_dlq)
    dlq_replay = dlq.add_parser("replay", help="queue a dead-lettered job again")
    dlq_replay.add_argument("correlation_id")
    dlq_replay.set_defaults(func=cmd_dlq)

    keys = sub.add_parser("keys", help="API keys kept by store_svc (hashed)").add_subparsers(
        dest="keys_command", required=True
    )
    store_help = "store_svc address (default: CHATTERBOT_STORE_ADDR, else the running `chatterbot up`'s)"
    create = keys.add_parser("create", help="make a key and print it, once")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="USER_ID", help="a user key: acts only for this user_id")
    who.add_argument("--service", action="store_true", help="a service key: acts for any user_id")
    who.add_argument("--admin", action="store_true", help="an admin key: any user_id, and /debug routes")
    create.add_argument(
        "--rpm", type=_count, default=0, help="requests per minute across every route (0: none)"
    )
    create.add_argument(
        "--tpm", type=_count, default=0, help="tokens (max_tokens asked for) per minute (0: none)"
    )
    limit_help = (
        "a limit of this key on one route, ROUTE=LIMIT (e.g. /stream-chat=600/minute; several limits of a "
        "route joined by ';'); repeatable. A key with any limit of its own (--limit, --rpm, --tpm) is not "
        "held to the route defaults (CHATTERBOT_RATE_LIMITS)"
    )
    create.add_argument(
        "--limit", type=_route_limit_arg, action="append", default=[], metavar="ROUTE=LIMIT", help=limit_help
    )
    create.add_argument("--name", default="", help="a note on who or what uses it")
    create.add_argument("--store", help=store_help)
    create.set_defaults(func=cmd_keys)
    listing = keys.add_parser("list", help="every key: prefix, kind, user, limits, created, revoked")
    listing.add_argument("--user", metavar="USER_ID", help="only this user's keys")
    listing.add_argument("--store", help=store_help)
    listing.set_defaults(func=cmd_keys)
    update = keys.add_parser("update", help="change a key's limits, keeping the key")
    update.add_argument("key", metavar="ID_OR_PREFIX")
    update.add_argument("--rpm", type=_count, help="requests per minute across every route (0: none)")
    update.add_argument("--tpm", type=_count, help="tokens per minute (0: none)")
    update.add_argument(
        "--limit",
        type=_route_limit_arg,
        action="append",
        metavar="ROUTE=LIMIT",
        help="replaces all of the key's route limits with these; repeatable",
    )
    update.add_argument("--clear-limits", action="store_true", help="drop all of the key's route limits")
    update.add_argument("--store", help=store_help)
    update.set_defaults(func=cmd_keys)
    revoke = keys.add_parser("revoke", help="revoke a key by its id, its prefix, or the key itself")
    revoke.add_argument("key", metavar="ID_OR_PREFIX")
    revoke.add_argument("--store", help=store_help)
    revoke.set_defaults(func=cmd_keys)
    for command in (create, listing, update, revoke):
        command.add_argument(
            "--admin-key",
            help="the admin key store_svc asks for (default: CHATTERBOT_ADMIN_KEY, else the first of "
            "CHATTERBOT_ADMIN_KEYS, else the running `chatterbot up`'s); the variable keeps it out of `ps`",
        )

    certs = sub.add_parser(
        "certs",
        help="make a development CA and a TLS certificate per component (mesh mutual TLS, the partner port)",
        description="Writes ca.pem and ca-key.pem (an existing CA in --out is kept and signs the new "
        "certificates), and <name>.pem and <name>-key.pem for chat, context, inference, store, worker, edge "
        "(server and client certificates) and partner (server only). Each certificate names its component, "
        "localhost, 127.0.0.1 and ::1, and every --hosts entry.",
    )
    certs.add_argument("--out", help="directory to write to (default: CHATTERBOT_DATA_DIR/tls)")
    certs.add_argument(
        "--hosts",
        default="",
        help="more names for every certificate, comma-separated: DNS names, wildcards, IP addresses; "
        "{name} stands for the component (e.g. {name}.chatterbot.svc.cluster.local,grpc.example.com)",
    )
    certs.add_argument("--days", type=int, default=365, help="how long the certificates are valid")
    certs.set_defaults(func=cmd_certs)

    example = sub.add_parser(
        "env-example", help="print every setting with its default (the .env.example text)"
    )
    example.set_defaults(func=cmd_env_example)

    from ops.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
