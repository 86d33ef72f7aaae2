"""The `mirror` command: `mirror serve --config FILE`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from .app import create_app
from .config import Config, ConfigError, load


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("MIRROR_CONFIG", "mirror.yaml")),
        help="configuration file (default: $MIRROR_CONFIG or ./mirror.yaml)",
    )
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(config: Config) -> None:
    _configure_logging(config.log_level)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    logging.getLogger("mirror").info(
        "listening on %s:%d, cache in %s, upstreams: %s",
        config.listen_host,
        config.listen_port,
        config.storage.path,
        ", ".join(sorted(config.upstreams)),
    )
    web.run_app(
        create_app(config),
        host=config.listen_host,
        port=config.listen_port,
        print=None,
        access_log_format='%a "%r" %s %b %Tf',
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = load(args.config)
        except ConfigError as error:
            print(f"mirror: config error: {error}", file=sys.stderr)
            return 2
        try:
            serve(config)
        except OSError as error:
            print(f"mirror: cannot start: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
