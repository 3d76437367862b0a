"""The `appliance` command line.

Errors a user can fix (bad config, bad arguments, a port in use, a node
that does not exist) print one line and exit 2; a missing key exits 1.
Tracebacks are shown only with APPLIANCE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SYSTEM_CONFIG, Layout
from .systemd import DEFAULT_USER

if TYPE_CHECKING:
    from .client import Client
    from .config import Settings

EXIT_NOT_FOUND, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """A problem the user can fix; exit 2."""


def _settings(args: argparse.Namespace) -> tuple[Settings, Path | None]:
    from .config import find_config, load_settings

    path = find_config(args.config)
    return load_settings(path), path


# Commands ------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .box_run import Appliance, check_ports
    from .config import load_settings
    from .config.checks import secret_problems

    settings, path = _settings(args)
    logs.setup(settings.node.log_level, "run")
    problems = secret_problems(settings)
    if problems:
        raise UsageError("; ".join(problems))
    clashes = check_ports(settings)
    if clashes:
        raise UsageError("ports already in use: " + "; ".join(clashes))
    return Appliance(settings, path, lambda: load_settings(path)).run()


def cmd_worker(args: argparse.Namespace) -> int:
    from . import logs
    from .supervision.conf import worker_name
    from .worker import run

    settings, _ = _settings(args)
    logs.setup(settings.node.log_level, worker_name(args.index))
    if not 0 <= args.index < settings.node.workers:
        raise UsageError(f"--index must be from 0 to {settings.node.workers - 1}")
    return run(settings, args.index)


def cmd_controller(args: argparse.Namespace) -> int:
    from . import logs
    from .cluster.run import run_controller

    settings, _ = _settings(args)
    logs.setup(settings.node.log_level, "controller")
    return run_controller(settings)


def _client(args: argparse.Namespace, *, writes: bool = False) -> Client:
    from .client import Client, settings_kwargs

    settings, _ = _settings(args)
    if args.peers:
        peers = args.peers.split(",")
        node = settings.node
        kwargs = settings_kwargs(settings)
        if not writes and settings.auth.reads == "open":
            # --peers may name any address: a read that needs no credential
            # must not hand the box's token to it.
            kwargs["cluster_token"] = None
        return Client(peers, replicas=node.replicas, scheme=node.ring_hash, **kwargs)
    # One command, a few calls: the ring read once is enough, no watch.
    return Client.from_settings(settings, follow=False)


def cmd_get(args: argparse.Namespace) -> int:
    from .cache import errors

    with _client(args) as client:
        try:
            value = client.get(args.group, args.key, timeout=args.timeout)
        except errors.KeyNotFound:
            print(f"appliance: key {args.key!r} not found in group {args.group!r}", file=sys.stderr)
            return EXIT_NOT_FOUND
        except errors.CacheError as exc:
            raise UsageError(f"{type(exc).__name__}: {exc}") from None
    sys.stdout.buffer.write(value)
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    return 0


def _print_change(verb: str, args: argparse.Namespace, response: Any) -> int:
    unreachable = [p.addr for p in response.peers if not p.confirmed]
    confirmed = len(response.peers) - len(unreachable)
    print(f"{verb} {args.group}/{args.key} (owner {response.owner}): {confirmed} peer(s) confirmed", end="")
    print(f", unreachable: {', '.join(unreachable)}" if unreachable else "")
    return 0


def _write_error(args: argparse.Namespace, exc: Exception) -> UsageError:
    from .cache import errors

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, errors.Unauthenticated):
        settings, _ = _settings(args)
        text += (
            f" (the CLI presents the box's token, {Layout(settings).token_path()}, when this user may read it:"
            " run it as root or as the service user)"
        )
    return UsageError(text)


def cmd_set(args: argparse.Namespace) -> int:
    from .cache import errors

    value = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    with _client(args, writes=True) as client:
        try:
            response = client.set(args.group, args.key, value, ttl=args.ttl)
        except errors.CacheError as exc:
            raise _write_error(args, exc) from None
    return _print_change("set", args, response)


def cmd_remove(args: argparse.Namespace) -> int:
    from .cache import errors

    with _client(args, writes=True) as client:
        try:
            response = client.remove(args.group, args.key)
        except errors.CacheError as exc:
            raise _write_error(args, exc) from None
    return _print_change("removed", args, response)


def cmd_peers(args: argparse.Namespace) -> int:
    """ADDR<TAB>BOX of every live worker (the box from its registration)."""
    if args.peers:
        with _client(args) as client:
            for peer in client.peers():
                print(peer)
        return 0
    settings, _ = _settings(args)
    client, members = _cluster_view(settings)
    client.close()
    for addr, member in sorted(members.items()):
        print(f"{addr}\t{_box_of(member)}")
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for key in args.keys:
            print(f"{key}\t{client.locate(key) or '-'}")
    return 0


def _local_workers(settings: Settings) -> list[tuple[int, str, Path]]:
    layout = Layout(settings)
    return [(i, settings.node.address(i), layout.admin_socket(i)) for i in range(settings.node.workers)]


STATS_COLUMNS = (
    "gets",
    "hits",
    "loads",
    "loads_deduped",
    "peer_loads",
    "peer_errors",
    "local_loads",
    "main_bytes",
    "hot_bytes",
    "main_evictions",
)


def _cluster_view(settings: Settings):
    """(etcd client, {addr: Member}) of the cluster, or raise UsageError."""
    from .cluster import etcd

    try:
        client = etcd.connect_to(settings)
        members, _ = etcd.call(client, lambda c: etcd.read_members(c, settings.cluster.service))
    except Exception as exc:
        raise UsageError(f"cannot read the cluster from etcd ({etcd.describe(exc)})") from None
    return client, {m.addr: m for m in members.values()}


def _box_token(settings: Settings, what: str) -> str:
    """The cluster token, which cluster-wide requests are signed with."""
    from .tokens import TokenFileError, read_token

    try:
        return read_token(Layout(settings).token_path())
    except TokenFileError as exc:
        raise UsageError(
            f"{what} is signed with the cluster token, which this user cannot read ({exc}): "
            "run it as root or as the service user"
        ) from None


def _box_of(member) -> str:
    return str((member.metadata or {}).get("box") or "-")


def cmd_stats(args: argparse.Namespace) -> int:
    """Every worker of the cluster, with its box: each box's controller
    answers for its own workers through etcd (cluster.box_ops)."""
    from .cluster import box_ops

    settings, _ = _settings(args)
    client, members = _cluster_view(settings)
    try:
        boxes = ({_box_of(m) for m in members.values()} - {"-"}) | {settings.node.host}
        answers = box_ops.gather_stats(client, settings.cluster.service, boxes, token=_box_token(settings, "stats"))
    finally:
        client.close()
    report: dict[str, dict[str, Any]] = {}
    for box, doc in sorted(answers.items()):
        for addr, st in sorted((doc.get("workers") or {}).items()):
            report[addr] = {**st, "box": box}
    for addr, member in sorted(members.items()):  # live workers whose box did not answer
        report.setdefault(addr, {"box": _box_of(member), "error": "its box did not answer"})
    silent = sorted(boxes - set(answers))
    if silent:
        print(
            f"appliance: no answer from box(es) {', '.join(silent)} (controller down, or cut off from etcd)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("\t".join(("box", "worker", "group", "revision") + STATS_COLUMNS))
    for addr, st in report.items():
        if "error" in st:
            print(f"{st['box']}\t{addr}\t-\t-\t{st['error']}")
            continue
        for group, g in st["groups"].items():
            print("\t".join([st["box"], addr, group, str(st["revision"])] + [str(g[c]) for c in STATS_COLUMNS]))
    return 0


def cmd_stop_node(args: argparse.Namespace) -> int:
    import xmlrpc.client

    from . import addr as addrs
    from .supervision import conf, rpc

    settings, _ = _settings(args)
    try:
        addrs.split(args.addr)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    match = [i for i, a, _ in _local_workers(settings) if a == args.addr]
    if not match:
        return _stop_remote_node(settings, args.addr)
    name = conf.worker_name(match[0])
    try:
        supervisor = conf.supervisor(settings)
        left = rpc.stop_all(supervisor, [name], settings.node.stop_grace)
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError) as exc:
        raise UsageError(
            f"cannot reach the supervisor of this box ({exc}); is `appliance run` running, "
            "and is this root or the service user?"
        ) from None
    if left:
        raise UsageError(f"{args.addr} did not stop in time")
    print(f"{args.addr} stopped ({name}); it stays stopped until `appliance run` restarts or reloads")
    return 0


def _stop_remote_node(settings: Settings, addr: str) -> int:
    """stop-node of another box's worker: a drain request in etcd that the
    owning box's controller acts on (no remote admin port)."""
    from .cluster import box_ops

    client, members = _cluster_view(settings)
    try:
        if addr not in members:
            raise UsageError(
                f"{addr} is not a live worker of the cluster (live: {', '.join(sorted(members)) or 'none'})"
            )
        box = _box_of(members[addr])
        try:
            doc = box_ops.request_drain(
                client,
                settings.cluster.service,
                addr,
                token=_box_token(settings, "stop-node of another box's worker"),
                timeout=settings.node.stop_grace + 10,
            )
        except box_ops.Unclaimed as exc:
            raise UsageError(f"{exc} (is the controller of box {box} running?)") from None
    finally:
        client.close()
    state = doc.get("state")
    if state == "stopped":
        print(
            f"{addr} stopped ({doc.get('worker')} on box {doc.get('box', box)}); it left the ring and stays "
            "stopped until that box's `appliance run` restarts or reloads"
        )
        return 0
    detail = doc.get("error") or "it did not leave the ring within the drain timeout"
    print(f"appliance: {addr} on box {box}: {state}: {detail}", file=sys.stderr)
    return 1


def _etcd_cluster(args: argparse.Namespace):
    settings, _ = _settings(args)
    if not Layout(settings).etcd_clustered():
        raise UsageError(
            "`appliance etcd` manages an embedded etcd cluster: this config has "
            + ("one endpoint" if settings.cluster.embedded_etcd else "an external etcd (manage it with etcdctl)")
        )
    return settings


def cmd_etcd_members(args: argparse.Namespace) -> int:
    from .cluster import etcd, membership

    settings = _etcd_cluster(args)
    try:
        found = membership.members(settings)
    except Exception as exc:
        raise UsageError(f"no member of the etcd cluster answers ({etcd.describe(exc)})") from None
    print("\t".join(("name", "peer URL", "client URL", "health")))
    for m in sorted(found, key=lambda m: list(m.peer_urls)):
        print(
            "\t".join(
                (
                    m.name or "(not started)",
                    ",".join(m.peer_urls),
                    ",".join(m.client_urls) or "-",
                    membership.health(settings, m),
                )
            )
        )
    return 0


def cmd_etcd_add_member(args: argparse.Namespace) -> int:
    from .cluster import etcd, membership

    settings = _etcd_cluster(args)
    try:
        membership.add_member(settings, args.host)
    except membership.MembershipError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        raise UsageError(f"cannot add {args.host}: {etcd.describe(exc)}") from None
    print(
        f"added the etcd member of {args.host}. Next: list its endpoint in cluster.etcd on every box "
        f"(and SIGHUP them, or restart at the next change), then start `appliance run` on {args.host} "
        "with an empty state directory: it joins the running cluster."
    )
    return 0


def cmd_etcd_remove_member(args: argparse.Namespace) -> int:
    from .cluster import etcd, membership

    settings = _etcd_cluster(args)
    try:
        gone = membership.remove_member(settings, args.host)
    except membership.MembershipError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        raise UsageError(f"cannot remove {args.host}: {etcd.describe(exc)}") from None
    print(f"removed the etcd member {gone.name or args.host} ({','.join(gone.peer_urls)})")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from .config import check_file

    print(check_file(args.file))
    return 0


def cmd_systemd_install(args: argparse.Namespace) -> int:
    from .systemd import install

    for line in install(prefix=Path(args.root), user=args.user, config_source=args.config_source):
        print(line)
    return 0


# Parser --------------------------------------------------------------------


# The commands that route keys to owners, and so take --peers.
ROUTED = ("get", "set", "remove", "peers", "locate")
CONFIG_HELP = f"TOML config (default: $APPLIANCE_CONFIG, {SYSTEM_CONFIG}, built-in demo)"
PEERS_HELP = "static peer list instead of the live ring from etcd"


def parser() -> argparse.ArgumentParser:
    """The CLI's parser. --config (and --peers for the commands that route
    keys) are accepted before the command and after it; after wins."""
    p = argparse.ArgumentParser(prog="appliance", description="groupcache appliance: a distributed read-through cache")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--peers", metavar="A,B,C", help=PEERS_HELP + f" ({', '.join(ROUTED)})")
    # On a command, SUPPRESS leaves the value given before the command unless repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    routed = argparse.ArgumentParser(add_help=False)
    routed.add_argument("--peers", metavar="A,B,C", default=argparse.SUPPRESS, help=PEERS_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help: str, parents: tuple[argparse.ArgumentParser, ...] = (common,)) -> Any:
        if name in ROUTED:
            parents = (*parents, routed)
        sp = sub.add_parser(name, help=help, parents=list(parents), description=help)
        sp.set_defaults(fn=fn, takes_config=common in parents)
        return sp

    add("run", cmd_run, "run the appliance in the foreground (supervisord, etcd, workers, controller)")
    sp = add("worker", cmd_worker, "run one worker (started by `run`)")
    sp.add_argument("--index", type=int, required=True)
    add("controller", cmd_controller, "run the ring controller (started by `run`)")
    sp = add("get", cmd_get, "print the value of KEY in GROUP")
    sp.add_argument("group")
    sp.add_argument("key")
    sp.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    sp = add("set", cmd_set, "write VALUE (or stdin with -) to KEY at its owner; drop hot copies")
    sp.add_argument("group")
    sp.add_argument("key")
    sp.add_argument("value", help="the value, or - to read it from stdin")
    sp.add_argument("--ttl", type=float, default=0.0, help="seconds; 0 = the group's ttl")
    sp = add("remove", cmd_remove, "remove KEY from its owner and every hot cache")
    sp.add_argument("group")
    sp.add_argument("key")
    add("peers", cmd_peers, "list the live peers")
    sp = add("locate", cmd_locate, "print KEY<TAB>OWNER for each key")
    sp.add_argument("keys", nargs="+", metavar="KEY")
    sp = add("stats", cmd_stats, "per-worker counters of every box of the cluster")
    sp.add_argument("--json", action="store_true")
    sp = add("stop-node", cmd_stop_node, "gracefully stop the worker serving ADDR, on any box of the cluster")
    sp.add_argument("addr", metavar="ADDR")
    sp = add("etcd", None, "the members of an embedded etcd cluster (several boxes)")
    esub = sp.add_subparsers(dest="etcd_command", required=True, metavar="SUBCOMMAND")
    for name, fn, help in (
        ("members", cmd_etcd_members, "list the members, their URLs and health"),
        ("add-member", cmd_etcd_add_member, "add the member of a new box HOST (before starting it)"),
        ("remove-member", cmd_etcd_remove_member, "remove the member of box HOST (a dead or retired box)"),
    ):
        ep = esub.add_parser(name, help=help, description=help, parents=[common])
        if name != "members":
            ep.add_argument("host", metavar="HOST", help="the box's node.host")
        ep.set_defaults(fn=fn, takes_config=True)
    sp = add("config", None, "configuration tools")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cp = csub.add_parser("check", help="validate a config file without starting anything")
    cp.add_argument("file")
    cp.set_defaults(fn=cmd_config_check)
    sp = add("systemd", None, "systemd integration", ())
    ssub = sp.add_subparsers(dest="systemd_command", required=True, metavar="SUBCOMMAND")
    ip = ssub.add_parser("install", help="create the user, directories, config and unit (idempotent)")
    ip.add_argument("--root", default="/", help="install under this root (for packaging and tests)")
    ip.add_argument("--user", default=DEFAULT_USER)
    ip.add_argument(
        "--config-source", default=None, help="config to install if none exists (default: the annotated example)"
    )
    ip.set_defaults(fn=cmd_systemd_install)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, and refuse a global option given to a command it does not apply to."""
    p = parser()
    args = p.parse_args(argv)
    if args.peers is not None and args.command not in ROUTED:
        p.error(f"--peers applies only to {', '.join(ROUTED)}, not to {args.command}")
    if args.config is not None and not args.takes_config:
        p.error(f"--config does not apply to {args.command}")
    return args


def main(argv: list[str] | None = None) -> int:
    # grpc's C core logs connection chatter at INFO; children inherit this.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .cluster.membership import MembershipError
    from .config import ConfigError
    from .supervision.private_files import UnsafeDirectory
    from .systemd import InstallError

    args = parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, UsageError, InstallError, MembershipError, UnsafeDirectory) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        print(f"appliance: {type(exc).__name__}: {exc} (set APPLIANCE_DEBUG=1 for details)", file=sys.stderr)
        return 1
