"""Every configured upstream, over one shared connection pool: what the app holds.

The HTTP client session lives here, inside the upstream package, so no other part of the
mirror ever holds an HTTP client.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import aiohttp

from ..clock import Clock
from ..config import Config
from ..metrics import Metrics
from .client import Upstream, UpstreamClient
from .network import Network
from .offline import OfflineClient

CONNECTIONS = 100  # open connections to all upstreams together


class Upstreams:
    """The clients of the configured upstreams, by name; `close` ends their connections."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        clock: Clock,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ  # proxies come from it
        # auto_decompress off and identity encoding: bytes are hashed exactly as the
        # upstream stored them, never as a transport encoding changed them.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS),
            auto_decompress=False,
            headers={"Accept-Encoding": "identity"},
        )
        # An offline upstream is a client that refuses: the policy never asks whether.
        self.by_name: dict[str, Upstream] = {
            name: (
                OfflineClient(name, upstream.max_transfers)
                if upstream.offline or upstream.hosted
                else UpstreamClient(
                    upstream,
                    self._session,
                    config.timeouts,
                    metrics,
                    clock,
                    Network(upstream, environ),
                )
            )
            for name, upstream in config.upstreams.items()
        }

    def renew_logins(self, config: Config) -> list[str]:
        """Each upstream's username and password from `config` (the file read again on
        SIGHUP); the names of those that changed. Upstreams added or removed need a
        restart."""
        return [
            name
            for name, upstream in config.upstreams.items()
            if name in self.by_name and self.by_name[name].renew_login(upstream)
        ]

    async def close(self) -> None:
        await self._session.close()
