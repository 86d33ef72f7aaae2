"""mirror: a pull-through cache for container registries (mirror serve --config FILE)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import uvloop
from aiohttp import web

from . import logs, maintenance
from .app import UPSTREAMS, create_app
from .config import (
    Config,
    ConfigError,
    exposure_warnings,
    hosted_warnings,
    load,
    naming_warnings,
    parse_duration,
    parse_size,
    trust_warnings,
    variable_warnings,
)
from .hosted.registry import Hosted
from .http.server import Serving
from .images import commands
from .metrics import share_between_workers, start_worker_metrics
from .store.disk import DiskStore
from .upstream.network import environment_warnings
from .version import VERSION

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirror {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True)
    subcommands = {
        "serve": "run the mirror",
        "check-config": "read the config as serve would, check its files, and say what it sets",
        "verify": "re-hash every stored blob and manifest; remove corrupt ones (exit 1 if any)",
        "gc": "evict cached content down to a size or by age",
        "du": "show cache usage by upstream and repository",
        "warm": "fill the cache with whole images, as pulls would",
        "export": "write images to an OCI image layout archive (tar)",
        "import": "keep the images of OCI layout archives or directories, verified, pinned",
        "ls": "list the cached images",
        "rm": "forget an image and drop what no other cached image uses",
        "unpin": "let eviction remove an imported image again",
    }
    for name, help_text in subcommands.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--config",
            type=Path,
            default=Path(os.environ.get("MIRROR_CONFIG", "mirror.yaml")),
            help="configuration file (default: $MIRROR_CONFIG or ./mirror.yaml)",
        )
        if name in ("warm", "export"):
            command.add_argument("images", nargs="*", metavar="IMAGE")
            command.add_argument("--from-file", type=Path, help="more images, one per line")
            command.add_argument(
                "--platform",
                action="append",
                help="os/arch[/variant], repeatable (default: this machine's)",
            )
            command.add_argument("--all-platforms", action="store_true")
            command.add_argument("--jobs", type=int, default=4, help="transfers at once")
        if name == "export":
            command.add_argument("--output", "-o", type=Path, required=True)
            command.add_argument(
                "--offline", action="store_true", help="from the cache only, never an upstream"
            )
            command.add_argument(
                "--since",
                type=Path,
                help="an earlier archive (or a file of digests) whose blobs to leave out",
            )
        if name == "import":
            command.add_argument("files", nargs="+", type=Path, metavar="FILE")
        if name == "ls":
            command.add_argument("--json", action="store_true")
        if name in ("rm", "unpin"):
            command.add_argument("images", nargs="+", metavar="IMAGE")
        if name == "gc":
            command.add_argument(
                "--max-size", help="evict down to this size (default: storage.max_size)"
            )
            command.add_argument(
                "--dry-run", action="store_true", help="say what would be evicted; evict nothing"
            )
            command.add_argument(
                "--older-than",
                metavar="DURATION",
                help="evict everything not used for this long (seconds, or 30m, 12h, 7d)",
            )
    return parser


class CannotServe(Exception):
    """The config is fine, but this machine will not let the server start (a port held,
    a folder it cannot write): said as what it is, not as a mistake in the file."""


def _can_serve(config: Config) -> None:
    """What would stop the server, said in one line before it starts: a port another
    process holds (another mirror too: its workers' SO_REUSEPORT is not shared with us),
    a storage folder this user cannot write."""
    addresses = [("listen", (config.listen_host, config.listen_port))]
    if config.ops_listen is not None:
        addresses.append(("ops_listen", config.ops_listen))
    for key, (host, port) in addresses:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # as the server binds (TIME_WAIT is no obstacle), but without SO_REUSEPORT:
                # a listening socket there, another mirror's included, is
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            raise CannotServe(f"{key}: cannot listen on {host}:{port}: {exc.strerror}") from None
    path = config.storage.path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotServe(f"storage.path: cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CannotServe(f"storage.path: {path} is not writable by this user")


def serve(config: Config, path: Path) -> None:
    logs.configure(config.log_level, config.log_format)
    _can_serve(config)
    # uvloop: a cold fill costs ~10% less CPU than on asyncio's loop (hits do not need
    # loop.sendfile, which uvloop lacks: see sendfile.py)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    ops = (
        f", operations on {config.ops_listen[0]}:{config.ops_listen[1]}"
        if config.ops_listen
        else ""
    )
    logging.getLogger("mirror").info(
        "listening on %s:%d%s, %d worker(s), cache in %s, upstreams: %s",
        config.listen_host,
        config.listen_port,
        ops,
        config.workers,
        config.storage.path.resolve(),
        ", ".join(sorted(config.upstreams)),
    )
    warnings = [
        *naming_warnings(config),
        *exposure_warnings(config),
        *trust_warnings(config),
        *hosted_warnings(config),
        *variable_warnings(config),
        *environment_warnings(os.environ),
    ]
    for warning in warnings:
        logging.getLogger("mirror").warning("%s", warning)
    if config.workers == 1:
        _run(config, path, worker=False)
    else:
        _supervise(config, path)


def _die_with(parent: int) -> None:
    """Ask the kernel to end this worker when its supervisor dies (even by SIGKILL): an
    orphan would go on serving an old config beside the next start."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we asked
        os._exit(0)


SHUTDOWN_WAIT = 20.0  # seconds a stop waits for requests in flight (a download, a push)


def _run(config: Config, path: Path, *, worker: bool, parent: int = 0) -> None:
    if worker:
        _die_with(parent)
        # A forked worker inherits the supervisor's handlers: a SIGTERM that came before
        # the server set its own would run the supervisor's code here and be ignored.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # set again below
        start_worker_metrics()
    ssl_context = None
    if config.tls is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls.cert, config.tls.key)
    signal.signal(signal.SIGHUP, lambda signum, frame: _reload(path, config, ssl_context, None))

    async def serve() -> None:
        app = await create_app(config, repair_store=not worker)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, _reload, path, config, ssl_context, app)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        serving = await Serving.start(
            app,
            config.listen_host,
            config.listen_port,
            ssl_context=ssl_context,
            reuse_port=worker,
            shutdown_timeout=SHUTDOWN_WAIT,
        )
        try:
            await stop.wait()
        finally:
            await serving.stop()

    asyncio.run(serve())


def _reload(
    path: Path, config: Config, context: ssl.SSLContext | None, app: web.Application | None
) -> None:
    """SIGHUP: the certificate and key read again (renewed by certbot, cert-manager), for
    the connections that come next, and the upstreams' usernames and passwords from the
    config file (a `password_file` rotated, say); connections open go on. The users file
    needs no signal: it is read again when it changes. Anything else in the file takes a
    restart."""
    log = logging.getLogger("mirror")
    if context is not None and config.tls is not None:
        try:
            context.load_cert_chain(config.tls.cert, config.tls.key)
        except (ssl.SSLError, OSError) as exc:
            log.error("SIGHUP: tls.cert, tls.key not reloaded, the old ones stay: %s", exc)
        else:
            log.info("SIGHUP: reloaded %s", config.tls.cert)
    upstreams = app.get(UPSTREAMS) if app is not None else None
    if upstreams is None:
        return
    try:
        fresh = load(path)
    except ConfigError as exc:
        log.error("SIGHUP: %s not reloaded, the running config stays: %s", path, exc)
        return
    changed = upstreams.renew_logins(fresh)
    log.info(
        "SIGHUP: upstream logins %s",
        f"renewed for {', '.join(changed)}" if changed else "unchanged",
    )


def _supervise(config: Config, path: Path) -> None:
    """Run `workers` processes on one port (SO_REUSEPORT) over one store; restart any
    that dies; stop them all on SIGTERM or SIGINT."""
    log = logging.getLogger("mirror.workers")
    DiskStore(config.storage.path, config.storage.max_size).close()  # repair once, here
    share_between_workers(config.storage.path / "metrics")
    context = multiprocessing.get_context("fork")

    def start(number: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_run, args=(config, path), kwargs={"worker": True, "parent": os.getpid()}
        )
        process.name = f"mirror-worker-{number}"
        process.start()
        return process

    workers = {number: start(number) for number in range(config.workers)}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers.values():
            if process.is_alive():
                process.terminate()

    def forward(signum: int, frame: object) -> None:
        for process in workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward)  # the workers reload certificates and logins
    while workers:
        for number, process in list(workers.items()):
            process.join(timeout=0.2)
            if process.exitcode is None:
                continue
            if stopping:
                del workers[number]
            else:
                log.error("worker %d exited with %s; starting it again", number, process.exitcode)
                _sweep_temporaries(config, log)
                time.sleep(0.5)
                if stopping:  # asked to stop while we waited: start nothing new
                    del workers[number]
                    continue
                workers[number] = start(number)


def _sweep_temporaries(config: Config, log: logging.Logger) -> None:
    """A dead worker's half-written temporaries take space nothing counts: remove them now
    (their locks are free), not at the next start."""
    store = DiskStore(config.storage.path, config.storage.max_size, repair=False)
    try:
        removed = store.remove_stale_temporaries()
    finally:
        store.close()
    if removed:
        log.warning("removed %d temporaries the worker left", removed)


def check_config(path: Path, config: Config) -> int:
    """What serve would run with: one line per setting an operator checks first."""
    out = sys.stdout
    out.write(f"{path}: valid\n")
    out.write(f"listen {config.listen_host}:{config.listen_port}")
    out.write(f" (TLS, {config.tls.cert})\n" if config.tls else " (plain HTTP)\n")
    if config.ops_listen is not None:
        out.write(f"ops_listen {config.ops_listen[0]}:{config.ops_listen[1]} (plain HTTP)\n")
    bound = maintenance.human(config.storage.max_size)
    out.write(f"storage {config.storage.path.resolve()}, bound {bound}")
    out.write("" if config.storage.path.exists() else " (not there yet: serve creates it)")
    out.write(f"\nworkers {config.workers}")
    out.write(" (auto: one per core this process may use)\n" if config.workers_auto else "\n")
    for upstream in config.upstreams.values():
        login = (
            "with credentials" if upstream.username or upstream.ecr or upstream.acr else "anonymous"
        )
        flags = " offline" if upstream.offline else ""
        default = " (default)" if upstream.name == config.default_upstream else ""
        out.write(f"upstream {upstream.name}{default}: {upstream.url}, {login}{flags}\n")
    if config.trusted_proxies:
        proxies = ", ".join(str(network) for network in config.trusted_proxies)
        out.write(f"trusted_proxies {proxies}: X-Forwarded-For from them names the client\n")
    access = config.access
    out.write(
        "access: none, every client pulls everything\n"
        if access is None
        else f"access: {len(access.rules)} rule(s), users from {access.users_file or '-'}\n"
    )
    for warning in [
        *naming_warnings(config),
        *exposure_warnings(config),
        *trust_warnings(config),
        *hosted_warnings(config),
        *variable_warnings(config),
    ]:
        out.write(f"warning: {warning}\n")
    return 0


def maintain(command: str, config: Config, args: argparse.Namespace) -> int:
    logs.configure("warning")
    if not config.storage.path.exists():
        print(
            f"mirror {command}: storage.path {config.storage.path.resolve()} does not exist: "
            "is --config the file the server uses (and MIRROR_STORAGE_PATH the same)?",
            file=sys.stderr,
        )
        return 1
    # No repair: a server may be running on this store, and its work in progress (pending
    # rows, temporaries) is not a crash's leftovers.
    store = DiskStore(config.storage.path, config.storage.max_size, repair=False)
    try:
        if command == "verify":
            report = maintenance.verify(store, sys.stdout)
            return 1 if report.corrupt or report.missing else 0
        if command == "gc":
            older_than = (
                parse_duration(args.older_than, "--older-than")
                if args.older_than is not None
                else None
            )
            size = (
                parse_size(args.max_size, "--max-size")
                if args.max_size is not None
                else None
                if older_than is not None
                else config.storage.max_size
            )
            if any(upstream.hosted for upstream in config.upstreams.values()):
                hosted = Hosted(config, store)
                try:
                    unlinked, expired = hosted.collect(time.time(), dry_run=args.dry_run)
                finally:
                    hosted.close()
                would = "would unlink" if args.dry_run else "unlinked"
                print(
                    f"hosted: {would} {unlinked} blob(s) no manifest refers to; "
                    f"removed {expired} expired upload(s)"
                )
            maintenance.gc(store, sys.stdout, size, older_than, dry_run=args.dry_run)
            return 0
        maintenance.du(store, sys.stdout)
        return 0
    finally:
        store.close()


def images(command: str, config: Config, args: argparse.Namespace) -> int:
    """warm, export, import, ls, rm, unpin."""
    logs.configure("warning")
    out = sys.stdout
    if command in ("warm", "export"):
        refs = commands.references(args.images, args.from_file)
        try:
            wanted = commands.platforms(args.platform, args.all_platforms)
        except ValueError as exc:
            print(f"mirror {command}: --platform: {exc}", file=sys.stderr)
            return 2
        jobs = max(1, args.jobs)
        if command == "warm":
            return asyncio.run(commands.warm(config, refs, wanted, jobs, out))
        return asyncio.run(
            commands.export(config, refs, args.output, wanted, args.offline, args.since, jobs, out)
        )
    if command == "import":
        return commands.import_archives(config, args.files, out)
    if command == "ls":
        return commands.list_images(config, args.json, out)
    return commands.remove_images(config, args.images, command == "unpin", out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
        if args.command == "serve":
            serve(config, args.config)
            return 0
        if args.command == "check-config":
            return check_config(args.config, config)
        if args.command in ("warm", "export", "import", "ls", "rm", "unpin"):
            return images(args.command, config, args)
        return maintain(args.command, config, args)
    except ConfigError as error:
        print(f"mirror: config error: {error}", file=sys.stderr)
        return 2
    except CannotServe as error:
        print(f"mirror: serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mirror: {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"mirror: {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
