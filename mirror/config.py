"""One typed, frozen configuration: defaults, then the YAML file, then MIRROR_* env, then checks.

Every problem is reported as one `ConfigError` line that names the key, so a bad file
stops start-up with a message an operator can act on.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import ipaddress
import json
import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DOCKER_HUB = "docker.io"
# Names under which clients refer to Docker Hub; all mean the `docker.io` upstream.
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")

_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE_UNITS |= {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass(frozen=True)
class TtlRule:
    """`manifest_ttl_rules` entry: tags whose `<repository>:<tag>` matches get `ttl`."""

    match: str  # shell pattern, e.g. "*:latest" or "library/*:3.*"
    ttl: float  # seconds; math.inf for `forever`

    def applies(self, repository: str, tag: str) -> bool:
        return fnmatch.fnmatchcase(f"{repository}:{tag}", self.match)


@dataclass(frozen=True)
class EcrConfig:
    """Amazon ECR: credentials from GetAuthorizationToken (needs `mirror[ecr]`)."""

    region: str
    registry_id: str | None = None  # the account; default: the caller's
    endpoint_url: str | None = None  # another ECR API endpoint (VPC endpoint, tests)
    renew_before: float = 3600.0  # seconds before the 12-hour token expires to renew it


@dataclass(frozen=True)
class AcrConfig:
    """Azure Container Registry: an Azure AD refresh token exchanged for a registry one."""

    refresh_token_file: str  # file holding the AAD refresh token
    tenant: str | None = None
    exchange_url: str | None = None  # default: <url>/oauth2/exchange


DEFAULT_MANIFEST_TTL = 300.0
DEFAULT_NEGATIVE_TTL = 30.0
DEFAULT_MAX_TRANSFERS = 16


@dataclass(frozen=True)
class UpstreamConfig:
    """One registry the mirror may contact."""

    name: str  # the registry name clients use: docker.io, ghcr.io, ...
    url: str  # base URL of its API, e.g. https://registry-1.docker.io
    username: str | None = None  # None: anonymous
    password: str | None = None
    auth_hosts: tuple[str, ...] = ()  # extra hosts trusted to receive credentials as token realm
    manifest_ttl: float = DEFAULT_MANIFEST_TTL  # default: the global manifest_ttl
    ttl_rules: tuple[TtlRule, ...] = ()  # this upstream's rules, then the global ones
    offline: bool = False  # never contact this upstream; default: the global `offline`
    serve_stale_on_404: bool = False  # an upstream 404 for a cached tag serves the cached copy
    prefetch: bool = True  # fetch an image's layers as soon as its manifest passes through
    max_transfers: int = DEFAULT_MAX_TRANSFERS  # concurrent blob transfers from this upstream
    range_connections: int = 4  # connections one large blob may use (free transfer slots)
    ecr: EcrConfig | None = None  # log in with Amazon ECR tokens
    acr: AcrConfig | None = None  # log in with an Azure AD refresh token
    proxy: str | None = None  # outbound proxy URL; None: HTTPS_PROXY/HTTP_PROXY/NO_PROXY
    ca_file: str | None = None  # PEM CAs trusted for this upstream, besides the system's
    cert_file: str | None = None  # client certificate (PEM) for registries requiring mTLS
    key_file: str | None = None  # its private key (PEM)
    tls_verify: bool = True  # false: accept any certificate (a lab registry; loud warning)
    aliases: tuple[str, ...] = ()  # more registry names that mean this upstream (for ns=)
    docker_hub: bool = False  # one-part names get library/; default: named or hosted so
    hosted: bool = False  # a namespace pushed to, not mirrored: no url, never an upstream

    def names(self) -> tuple[str, ...]:
        """Every registry name clients may use for this upstream (ns=, path prefix)."""
        hub = DOCKER_HUB_ALIASES if self.docker_hub else ()
        return (self.name.lower(), *self.aliases, *hub)  # registry names: any case

    def ttl_for(self, repository: str, tag: str) -> float:
        """Seconds a tag's digest is trusted: the first matching rule, else manifest_ttl."""
        for rule in self.ttl_rules:
            if rule.applies(repository, tag):
                return rule.ttl
        return self.manifest_ttl


@dataclass(frozen=True)
class S3Config:
    """A shared blob tier in an S3-compatible object store, behind each replica's disk:
    looked in before an upstream, and given every blob and manifest fetched."""

    bucket: str
    endpoint: str | None = None  # e.g. http://seaweedfs:8333; None: AWS S3 itself
    region: str = "us-east-1"
    prefix: str = ""  # object keys begin with this (e.g. mirror/)
    access_key: str | None = None  # None: the standard AWS environment and files
    secret_key: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("./cache")  # everything the mirror keeps lives below this folder
    max_size: int = 50 * 1024**3  # LRU bound on cached content, bytes (default 50 GiB)
    s3: S3Config | None = None  # None: no shared tier, the disk only
    # Bound on pushed content (never evicted); None: max_size. Pushes past it are refused.
    hosted_max_size: int | None = None
    upload_expiry: float = 86400.0  # seconds an upload in progress lives unused


@dataclass(frozen=True)
class ClusterConfig:
    """Several replicas sharing what they learn through Redis."""

    redis: str  # redis://host:port/db
    lease: float = 10.0  # seconds a replica's claim on a fetch lasts unless it renews it


@dataclass(frozen=True)
class TlsConfig:
    """Serve HTTPS with this certificate (chain) and key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = 10.0  # seconds to open a connection to an upstream
    read: float = 60.0  # seconds an upstream may stay silent mid-answer
    transfer: float = 3600.0  # seconds one blob transfer may take in all
    revalidate: float = 5.0  # seconds a tag's revalidation may take before it is served stale


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
ACTIONS = ("pull", "push")


@dataclass(frozen=True)
class AccessRule:
    """Who may do what to the repositories it names. A rule applies to a request when a
    pattern matches `<upstream>/<repository>` and the client's address is in `networks`;
    the first that applies decides, granting `actions` to the clients it names."""

    repositories: tuple[str, ...] = ("*",)  # shell patterns over <upstream>/<repository>
    users: tuple[str, ...] = ()  # users of users_file granted
    groups: tuple[str, ...] = ()  # groups of access.groups granted
    anonymous: bool = False  # true: every client, with or without credentials
    networks: tuple[Network, ...] = ()  # client addresses it applies to; empty: all
    actions: tuple[str, ...] = ("pull",)

    def applies(self, path: str, address: str | None) -> bool:
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in self.repositories):
            return False
        return not self.networks or in_networks(address, self.networks)

    def grants(self, user: str | None, groups: Mapping[str, tuple[str, ...]]) -> bool:
        if self.anonymous:
            return True
        if user is None:
            return False
        return user in self.users or any(user in groups.get(g, ()) for g in self.groups)


def in_networks(address: str | None, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return False  # a unix socket, or nothing: no network holds it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


@dataclass(frozen=True)
class AccessConfig:
    """Who may pull what (None on Config: everyone may pull everything)."""

    users_file: Path | None = None  # htpasswd file of bcrypt entries (htpasswd -B)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # group: users
    rules: tuple[AccessRule, ...] = ()  # first that applies decides; none: refused
    # Who may read /metrics and the status page; None: this machine only on the main
    # port, everyone on ops_listen (an address only monitoring reaches).
    operations: AccessRule | None = None
    token_ttl: float = 300.0  # seconds a token the mirror issues is valid
    login_attempts: int = 10  # failed logins per client address per minute before 429


@dataclass(frozen=True)
class WarmConfig:
    """Images the server fills the cache with at start-up and keeps fresh (their tags
    revalidated, new layers fetched) before anyone asks."""

    images: tuple[str, ...]
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; empty: the machine's
    every: float = 3600.0  # seconds between rounds


@dataclass(frozen=True)
class Config:
    listen_host: str = "0.0.0.0"  # from `listen: host:port`, default 0.0.0.0:5000
    listen_port: int = 5000
    storage: StorageConfig = field(default_factory=StorageConfig)
    manifest_ttl: float = DEFAULT_MANIFEST_TTL  # seconds a tag's digest is trusted
    negative_ttl: float = DEFAULT_NEGATIVE_TTL  # seconds an upstream 404 for a manifest is kept
    offline: bool = False  # never contact any upstream (air-gapped): serve the cache only
    default_upstream: str = DOCKER_HUB  # where un-prefixed, un-ns'd requests go
    upstreams: Mapping[str, UpstreamConfig] = field(
        default_factory=lambda: {
            DOCKER_HUB: UpstreamConfig(name=DOCKER_HUB, url="https://registry-1.docker.io")
        }
    )
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    log_level: str = "info"  # debug, info, warning, error
    log_format: str = "text"  # text, or json: one object per line
    tls: TlsConfig | None = None  # None: plain HTTP
    workers: int = 1  # processes serving one port (SO_REUSEPORT) over one store
    workers_auto: bool = False  # `workers: auto` gave that number (one per usable core)
    access: AccessConfig | None = None  # None: no client authentication, every pull allowed
    # Plain-HTTP address for /healthz, /readyz, /metrics and the status page; None: none.
    ops_listen: tuple[str, int] | None = None
    # Reverse proxies (a load balancer) whose X-Forwarded-For names the client; empty: none.
    trusted_proxies: tuple[Network, ...] = ()
    warm: WarmConfig | None = None  # images the server keeps fetched and fresh
    cluster: ClusterConfig | None = None  # None: one machine, all state in-process
    unset_variables: tuple[str, ...] = ()  # ${VAR}s the file names that the environment lacks

    def upstream_named(self, name: str) -> UpstreamConfig | None:
        """The upstream a registry name refers to: its name or one of its aliases (Docker
        Hub's names for the Docker Hub upstream)."""
        found = self.upstreams.get(name)
        if found is not None:
            return found
        wanted = name.lower()
        return next((u for u in self.upstreams.values() if wanted in u.names()), None)


def naming_warnings(config: Config) -> list[str]:
    """Upstreams containerd could never reach with `?ns=`: it names the registry as the
    image reference does (the registry's host), which must be the upstream's name or one
    of its aliases."""
    warnings = []
    for upstream in config.upstreams.values():
        parts = urlsplit(upstream.url)
        host = (parts.hostname or "").lower()
        registry = f"{host}:{parts.port}" if parts.port else host
        if upstream.docker_hub or upstream.hosted or registry in upstream.names():
            continue
        warnings.append(
            f"upstreams.{upstream.name}: containerd's hosts.toml asks with ns={registry}, "
            f"which names no upstream: add aliases: [{registry}] (or name it {registry})"
        )
    return warnings


def variable_warnings(config: Config) -> list[str]:
    """${VAR}s the file names that are not set: empty now (an upstream's credentials so,
    anonymous), which is rarely what was meant."""
    return [
        f"${{{name}}} is not set in the environment: it reads as empty"
        for name in config.unset_variables
    ]


def exposure_warnings(config: Config) -> list[str]:
    """A mirror without access rules hands whatever its credentials reach to anyone who
    reaches its port: say so when that is more than this machine."""
    if config.access is not None:
        return []
    try:
        loopback = ipaddress.ip_address(config.listen_host).is_loopback
    except ValueError:
        loopback = config.listen_host == "localhost"
    holding = sorted(u.name for u in config.upstreams.values() if u.username or u.ecr or u.acr)
    if loopback or not holding:
        return []
    return [
        f"listening on {config.listen_host}:{config.listen_port} with no access rules: anyone "
        f"who reaches this port pulls with the credentials of {', '.join(holding)} "
        "(set access: in the config, see README 'Access control')"
    ]


def trust_warnings(config: Config) -> list[str]:
    """A trusted proxy network that holds every address: any client may then name any
    address in X-Forwarded-For, and pass for it."""
    return [
        f"trusted_proxies: {network} holds every address: any client can pass for any "
        "address with X-Forwarded-For (name the load balancer's own addresses)"
        for network in config.trusted_proxies
        if network.prefixlen == 0
    ]


def hosted_warnings(config: Config) -> list[str]:
    """Hosted namespaces without access rules: who may push is this machine alone."""
    if config.access is not None:
        return []
    return [
        f"upstreams.{u.name}: hosted, and no access rules: only clients on this machine may "
        "push (set access: with a rule granting push, see README 'Pushing your own images')"
        for u in config.upstreams.values()
        if u.hosted
    ]


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a string like `50GiB`, `512 MiB`, `1.5TiB`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 50GiB, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
            if size > 0:
                return size
    raise ConfigError(f"{key}: expected a positive size like 50GiB or 1073741824, got {value!r}")


def _expand_vars(value: Any, env: Mapping[str, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string, recursively."""
    if isinstance(value, str):
        return _VAR_RE.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_vars(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_vars(v, env) for v in value]
    return value


def _check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in section:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{name}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _number(value: Any, key: str, *, minimum: float = 0.0) -> float:
    """Seconds, from a number or a duration with its unit: `30s`, `5m`, `1h`, `7d`."""
    match = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, bool) or not (isinstance(value, int | float) or match):
        raise ConfigError(
            f"{key}: expected seconds or a duration like 30s, 5m, 1h or 7d, got {value!r}"
        )
    number = float(value) if match is None else float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if (not math.isfinite(number) and number != math.inf) or number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum:g} seconds, got {value!r}")
    return number


def parse_duration(value: object, key: str) -> float:
    """Seconds from `90`, `30s`, `5m`, `1h`, `7d`: never negative, never NaN."""
    return _number(value, key)


def _count(value: Any, key: str, *, minimum: int = 1) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected a whole number of at least {minimum}, got {value!r}")
    return value


def _optional_str(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | int):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


def _credential(value: Any, key: str) -> str | None:
    """A username or password: a string as written. YAML reads unquoted 0123456, yes or
    1e3 as a number or a boolean, which would silently change the secret."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(
            f"{key}: YAML read this as {type(value).__name__} {value!r}, not as text; "
            "put the value in quotes"
        )
    return value


def _parse_listen(value: Any, key: str = "listen") -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected host:port like 0.0.0.0:5000, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_ttl(value: Any, key: str) -> float:
    if value == "forever":
        return math.inf
    return _number(value, key)


def _parse_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _parse_rules(value: Any, key: str) -> tuple[TtlRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {{match: PATTERN, ttl: SECONDS}}")
    rules = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        entry = _mapping(item, where)
        _check_keys(entry, {"match", "ttl"}, where)
        if not isinstance(entry.get("match"), str) or "ttl" not in entry:
            raise ConfigError(f"{where}: needs match (a pattern like '*:latest') and ttl")
        rules.append(TtlRule(entry["match"], _parse_ttl(entry["ttl"], f"{where}.ttl")))
    return tuple(rules)


UPSTREAM_KEYS = {
    "url",
    "hosted",
    "username",
    "password",
    "password_file",
    "auth_hosts",
    "manifest_ttl",
    "manifest_ttl_rules",
    "offline",
    "serve_stale_on_404",
    "prefetch",
    "max_transfers",
    "range_connections",
    "ecr",
    "acr",
    "proxy",
    "ca_file",
    "cert_file",
    "key_file",
    "tls_verify",
    "aliases",
    "docker_hub",
}


def _strings(value: Any, key: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of {what}")
    return tuple(value)


def _networks(value: Any, key: str) -> tuple[Network, ...]:
    networks = []
    for text in _strings(value, key, "networks like 10.0.0.0/8"):
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not a network like 10.0.0.0/8") from None
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            # (::ffff:10.0.0.5 is 10.0.0.5 to a dual-stack socket, and so to in_networks)
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


def _access_rule(value: Any, where: str, *, repositories: bool = True) -> AccessRule:
    entry = _mapping(value, where)
    allowed = {"users", "groups", "anonymous", "networks"}
    _check_keys(entry, allowed | ({"repositories", "actions"} if repositories else set()), where)
    patterns: tuple[str, ...] = ("*",)
    actions: tuple[str, ...] = ("pull",)
    if repositories:
        patterns = _strings(entry.get("repositories"), f"{where}.repositories", "patterns")
        if not patterns:
            raise ConfigError(
                f"{where}.repositories: required, patterns like 'docker.io/*' or 'ghcr.io/acme/*'"
            )
        actions = _strings(entry.get("actions", ["pull"]), f"{where}.actions", "pull, push")
        for action in actions:
            if action not in ACTIONS:
                raise ConfigError(f"{where}.actions: {action!r} is not pull or push")
    return AccessRule(
        repositories=patterns,
        users=_strings(entry.get("users"), f"{where}.users", "user names"),
        groups=_strings(entry.get("groups"), f"{where}.groups", "group names"),
        anonymous=_parse_bool(entry.get("anonymous", False), f"{where}.anonymous"),
        networks=_networks(entry.get("networks"), f"{where}.networks"),
        actions=actions,
    )


def _parse_access(value: Any) -> AccessConfig:
    section = _mapping(value, "access")
    _check_keys(
        section,
        {"users_file", "groups", "rules", "operations", "token_ttl", "login_attempts"},
        "access",
    )
    defaults = AccessConfig()
    users_file = _readable_file(section, "users_file", "access")
    groups_raw = _mapping(section.get("groups"), "access.groups")
    groups = {
        str(name): _strings(members, f"access.groups.{name}", "user names")
        for name, members in groups_raw.items()
    }
    rules_raw = section.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        raise ConfigError(
            "access.rules: required, a list of {repositories, users, groups, anonymous, "
            "networks, actions}"
        )
    rules = tuple(_access_rule(item, f"access.rules[{i}]") for i, item in enumerate(rules_raw))
    operations = (
        _access_rule(section["operations"], "access.operations", repositories=False)
        if section.get("operations") is not None
        else None
    )
    for index, rule in enumerate((*rules, *([operations] if operations else []))):
        where = f"access.rules[{index}]" if index < len(rules) else "access.operations"
        if (rule.users or rule.groups) and users_file is None:
            raise ConfigError(f"{where}: names users, but access.users_file is not set")
        for group in rule.groups:
            if group not in groups:
                raise ConfigError(f"{where}.groups: {group!r} is not in access.groups")
    attempts = _count(
        section.get("login_attempts", defaults.login_attempts), "access.login_attempts"
    )
    return AccessConfig(
        users_file=Path(users_file) if users_file is not None else None,
        groups=groups,
        rules=rules,
        operations=operations,
        token_ttl=_number(
            section.get("token_ttl", defaults.token_ttl), "access.token_ttl", minimum=10
        ),
        login_attempts=attempts,
    )


def _parse_warm(value: Any) -> WarmConfig:
    section = {"images": value} if isinstance(value, list) else _mapping(value, "warm")
    _check_keys(section, {"images", "platforms", "every"}, "warm")
    images = _strings(section.get("images"), "warm.images", "image references")
    if not images:
        raise ConfigError("warm.images: required, references like alpine:3.20")
    platforms = _strings(section.get("platforms"), "warm.platforms", "platforms like linux/amd64")
    for text in platforms:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"warm.platforms: {text!r} is not a platform like linux/amd64")
    return WarmConfig(
        images=images,
        platforms=platforms,
        every=_number(section.get("every", 3600.0), "warm.every", minimum=10),
    )


def _names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of registry names like [registry.example]")
    return tuple(v.lower() for v in value)


def _readable_file(section: Mapping[str, Any], key: str, where: str) -> str | None:
    path = _optional_text(section, key, where)
    if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise ConfigError(f"{where}.{key}: cannot read {path} (not a readable file)")
    return path


def _check_tls_files(ca: str | None, cert: str | None, key: str | None, where: str) -> None:
    """Load them once here, so a wrong file is a line naming its key, not a crash later."""
    context = ssl.create_default_context()
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError, ValueError):
            raise ConfigError(f"{where}.ca_file: {ca} holds no PEM certificate") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError, ValueError):
            raise ConfigError(
                f"{where}.cert_file, key_file: {cert} and {key} are not a PEM certificate "
                "and its matching private key"
            ) from None


def proxy_url(value: str) -> str | None:
    """A proxy URL as aiohttp takes it (`host:port` alone, as curl accepts, means http),
    or None when it is not one."""
    url = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if port is not None and port <= 0:
        return None
    return url


def _optional_text(section: Mapping[str, Any], key: str, where: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _parse_ecr(raw: Any, where: str) -> EcrConfig:
    section = _mapping(raw, where)
    _check_keys(section, {"region", "registry_id", "endpoint_url", "renew_before"}, where)
    region = _optional_text(section, "region", where)
    if region is None:
        raise ConfigError(f"{where}.region: required, e.g. us-east-1")
    if importlib.util.find_spec("botocore") is None:
        raise ConfigError(f"{where}: needs botocore: pip install 'mirror[ecr]'")
    registry_id = section.get("registry_id")
    return EcrConfig(
        region=region,
        registry_id=None if registry_id is None else str(registry_id),
        endpoint_url=_optional_text(section, "endpoint_url", where),
        renew_before=_number(section.get("renew_before", 3600), f"{where}.renew_before"),
    )


def _parse_acr(raw: Any, where: str) -> AcrConfig:
    section = _mapping(raw, where)
    _check_keys(section, {"refresh_token_file", "tenant", "exchange_url"}, where)
    token_file = _optional_text(section, "refresh_token_file", where)
    if token_file is None:
        raise ConfigError(f"{where}.refresh_token_file: required, a file with the AAD token")
    return AcrConfig(
        refresh_token_file=token_file,
        tenant=_optional_text(section, "tenant", where),
        exchange_url=_optional_text(section, "exchange_url", where),
    )


def _parse_s3(raw: Any) -> S3Config:
    where = "storage.s3"
    section = _mapping(raw, where)
    _check_keys(
        section, {"endpoint", "bucket", "region", "prefix", "access_key", "secret_key"}, where
    )
    bucket = _optional_text(section, "bucket", where)
    if bucket is None:
        raise ConfigError(f"{where}.bucket: required, the bucket the shared tier lives in")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ConfigError(
            f"{where}.bucket: {bucket!r} is not a bucket name (3 to 63 of a-z, 0-9, '.' and "
            "'-', beginning and ending with a letter or digit)"
        )
    endpoint = _optional_text(section, "endpoint", where)
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"{where}.endpoint: expected an http(s):// URL, got {endpoint!r}")
    access_key = _optional_text(section, "access_key", where)
    secret_key = _optional_text(section, "secret_key", where)
    if (access_key is None) != (secret_key is None):
        raise ConfigError(f"{where}: access_key and secret_key go together (or neither)")
    prefix = _optional_text(section, "prefix", where) or ""
    return S3Config(
        bucket=bucket,
        endpoint=endpoint,
        region=_optional_text(section, "region", where) or "us-east-1",
        prefix=prefix if not prefix or prefix.endswith("/") else prefix + "/",
        access_key=access_key,
        secret_key=secret_key,
    )


def _parse_cluster(raw: Any) -> ClusterConfig:
    section = _mapping(raw, "cluster")
    _check_keys(section, {"redis", "lease"}, "cluster")
    url = _optional_text(section, "redis", "cluster")
    if url is None:
        raise ConfigError("cluster.redis: required, e.g. redis://redis:6379/0")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"cluster.redis: expected redis://host:port/db, got {url!r}")
    try:
        parts.port  # noqa: B018 (a bad port raises here)
        int(parts.path.strip("/") or 0)
    except ValueError:
        raise ConfigError(f"cluster.redis: expected redis://host:port/db, got {url!r}") from None
    lease = parse_duration(section.get("lease", 10.0), "cluster.lease")
    if lease < 1:
        raise ConfigError(f"cluster.lease: at least 1s, got {lease:g}")
    return ClusterConfig(redis=url, lease=lease)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: those it is pinned to, fewer under a container's
    CPU quota (cgroup v2 `cpu.max`, what a Kubernetes CPU limit sets)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _parse_upstream(
    name: str, raw: Any, env: Mapping[str, str], defaults: UpstreamConfig
) -> UpstreamConfig:
    where = f"upstreams.{name}"
    section = _mapping(raw, where)
    _check_keys(section, UPSTREAM_KEYS, where)
    if _parse_bool(section.get("hosted", False), f"{where}.hosted"):
        others = sorted(set(section) - {"hosted", "aliases"})
        if others:
            raise ConfigError(
                f"{where}: a hosted namespace takes no {', '.join(others)} (it has no upstream)"
            )
        return UpstreamConfig(
            name=name,
            url="",
            hosted=True,
            aliases=_names(section.get("aliases"), f"{where}.aliases"),
        )
    url = section.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where}.url: required, the registry's base URL like https://{name}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: expected an http(s) URL, got {url!r}")
    password = _credential(section.get("password"), f"{where}.password")
    password_file = _optional_str(section.get("password_file"), f"{where}.password_file")
    if password_file is not None:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.password_file: cannot read: {exc.strerror}") from None
    username = _credential(section.get("username"), f"{where}.username")
    if (username is None) != (password is None):
        raise ConfigError(f"{where}: username and password go together; one of them is empty")
    hosts = section.get("auth_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ConfigError(f"{where}.auth_hosts: expected a list of host names")
    ecr = _parse_ecr(section["ecr"], f"{where}.ecr") if section.get("ecr") is not None else None
    acr = _parse_acr(section["acr"], f"{where}.acr") if section.get("acr") is not None else None
    if (ecr or acr) and username is not None:
        raise ConfigError(f"{where}: ecr/acr log in by themselves; drop username and password")
    if ecr and acr:
        raise ConfigError(f"{where}: ecr and acr exclude each other")
    proxy = _optional_text(section, "proxy", where)
    if proxy is not None and proxy_url(proxy) is None:
        # never the value itself in the message: it may hold the proxy's password
        raise ConfigError(f"{where}.proxy: expected an http(s) URL like http://host:3128")
    files = {
        key: _readable_file(section, key, where) for key in ("ca_file", "cert_file", "key_file")
    }
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(f"{where}: cert_file and key_file go together; one of them is missing")
    _check_tls_files(files["ca_file"], files["cert_file"], files["key_file"], where)
    max_transfers = section.get("max_transfers", defaults.max_transfers)
    if isinstance(max_transfers, bool) or not isinstance(max_transfers, int) or max_transfers < 1:
        raise ConfigError(f"{where}.max_transfers: expected a whole number >= 1")
    range_connections = section.get("range_connections", defaults.range_connections)
    if (
        isinstance(range_connections, bool)
        or not isinstance(range_connections, int)
        or not 1 <= range_connections <= 4
    ):
        raise ConfigError(f"{where}.range_connections: expected a whole number from 1 to 4")
    return UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        username=username,
        password=password,
        auth_hosts=tuple(hosts),
        manifest_ttl=_parse_ttl(
            section.get("manifest_ttl", defaults.manifest_ttl), f"{where}.manifest_ttl"
        ),
        ttl_rules=_parse_rules(section.get("manifest_ttl_rules"), f"{where}.manifest_ttl_rules")
        + defaults.ttl_rules,
        offline=_parse_bool(section.get("offline", defaults.offline), f"{where}.offline"),
        prefetch=_parse_bool(section.get("prefetch", defaults.prefetch), f"{where}.prefetch"),
        serve_stale_on_404=_parse_bool(
            section.get("serve_stale_on_404", False), f"{where}.serve_stale_on_404"
        ),
        max_transfers=max_transfers,
        range_connections=range_connections,
        ecr=ecr,
        acr=acr,
        proxy=proxy,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        tls_verify=_parse_bool(section.get("tls_verify", True), f"{where}.tls_verify"),
        aliases=_names(section.get("aliases"), f"{where}.aliases"),
        docker_hub=_parse_bool(
            section.get(
                "docker_hub",
                name == DOCKER_HUB or (parts.hostname or "").lower() in DOCKER_HUB_ALIASES,
            ),
            f"{where}.docker_hub",
        ),
    )


# The environment variables that override a key of the file.
ENV_KEYS = {
    "MIRROR_LISTEN": ("listen",),
    "MIRROR_STORAGE_PATH": ("storage", "path"),
    "MIRROR_STORAGE_MAX_SIZE": ("storage", "max_size"),
    "MIRROR_MANIFEST_TTL": ("manifest_ttl",),
    "MIRROR_DEFAULT_UPSTREAM": ("default_upstream",),
    "MIRROR_LOG_LEVEL": ("log_level",),
    "MIRROR_LOG_FORMAT": ("log_format",),
    "MIRROR_WORKERS": ("workers",),
    "MIRROR_OPS_LISTEN": ("ops_listen",),
    "MIRROR_CLUSTER_REDIS": ("cluster", "redis"),
}


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """MIRROR_LISTEN, MIRROR_STORAGE_PATH, ... as a nested dict over the file's values."""
    overrides: dict[str, Any] = {}
    for var, path in ENV_KEYS.items():
        if var in env:
            target = overrides
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = env[var]
    return overrides


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML document (after env overrides) into a Config. A mistake in
    a value an environment variable set names that variable: the file is not where to
    look."""
    env = os.environ if env is None else env
    try:
        return _from_mapping(raw, env)
    except ConfigError as exc:
        for var, path in ENV_KEYS.items():
            key = ".".join(path)
            if var in env and str(exc).startswith(f"{key}:"):
                raise ConfigError(f"{var} (for {key}){str(exc)[len(key) :]}") from None
        raise


def _from_mapping(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    data = _merge(_expand_vars(dict(raw), env), _env_overrides(env))
    unset = sorted(
        {
            m.group(1)
            for m in _VAR_RE.finditer(json.dumps(raw, default=str))
            if m.group(1) not in env and m.group(2) is None
        }
    )
    top = {
        "listen",
        "storage",
        "manifest_ttl",
        "manifest_ttl_rules",
        "negative_ttl",
        "offline",
        "default_upstream",
        "upstreams",
        "timeouts",
        "log_level",
        "log_format",
        "tls",
        "workers",
        "access",
        "ops_listen",
        "warm",
        "prefetch",
        "cluster",
        "trusted_proxies",
    }
    _check_keys(data, top, "")
    defaults = Config()
    host, port = (
        _parse_listen(data["listen"])
        if "listen" in data
        else (defaults.listen_host, defaults.listen_port)
    )

    storage_raw = _mapping(data.get("storage"), "storage")
    _check_keys(
        storage_raw, {"path", "max_size", "s3", "hosted_max_size", "upload_expiry"}, "storage"
    )
    storage = StorageConfig(
        path=Path(str(storage_raw.get("path", defaults.storage.path))),
        max_size=parse_size(
            storage_raw.get("max_size", defaults.storage.max_size), "storage.max_size"
        ),
        s3=_parse_s3(storage_raw["s3"]) if storage_raw.get("s3") is not None else None,
        hosted_max_size=parse_size(storage_raw["hosted_max_size"], "storage.hosted_max_size")
        if storage_raw.get("hosted_max_size") is not None
        else None,
        upload_expiry=parse_duration(
            storage_raw.get("upload_expiry", 86400.0), "storage.upload_expiry"
        ),
    )

    timeouts_raw = _mapping(data.get("timeouts"), "timeouts")
    _check_keys(timeouts_raw, {"connect", "read", "transfer", "revalidate"}, "timeouts")
    timeouts = TimeoutConfig(
        **{
            key: _number(value, f"timeouts.{key}", minimum=0.1)
            for key, value in timeouts_raw.items()
        }
    )

    manifest_ttl = _parse_ttl(data.get("manifest_ttl", defaults.manifest_ttl), "manifest_ttl")
    upstream_defaults = UpstreamConfig(
        name="",
        url="",
        manifest_ttl=manifest_ttl,
        ttl_rules=_parse_rules(data.get("manifest_ttl_rules"), "manifest_ttl_rules"),
        offline=_parse_bool(data.get("offline", False), "offline"),
        prefetch=_parse_bool(data.get("prefetch", True), "prefetch"),
    )
    raw_upstreams = _mapping(
        data.get("upstreams", {DOCKER_HUB: {"url": "https://registry-1.docker.io"}}),
        "upstreams",
    )
    if not raw_upstreams:
        raise ConfigError("upstreams: at least one upstream is needed")
    upstreams = {
        str(name): _parse_upstream(str(name), value, env, upstream_defaults)
        for name, value in raw_upstreams.items()
    }
    for alias in DOCKER_HUB_ALIASES[1:]:
        if alias in upstreams:
            raise ConfigError(f"upstreams.{alias}: name Docker Hub 'docker.io' instead")
    claimed: dict[str, str] = {}
    for upstream in upstreams.values():
        for registry in upstream.names():
            other = claimed.setdefault(registry, upstream.name)
            if other != upstream.name:
                raise ConfigError(
                    f"upstreams.{upstream.name}: {registry!r} already means upstream {other!r}"
                )

    default_upstream = str(data.get("default_upstream", defaults.default_upstream))
    if default_upstream in DOCKER_HUB_ALIASES:
        default_upstream = DOCKER_HUB
    if default_upstream not in upstreams:
        raise ConfigError(
            f"default_upstream: {default_upstream!r} is not one of the upstreams "
            f"({', '.join(sorted(upstreams))})"
        )

    log_level = str(data.get("log_level", defaults.log_level)).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {log_level!r}")

    log_format = str(data.get("log_format", defaults.log_format)).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {log_format!r}")

    tls = None
    if data.get("tls") is not None:
        tls_raw = _mapping(data["tls"], "tls")
        _check_keys(tls_raw, {"cert", "key"}, "tls")
        files = {}
        for key in ("cert", "key"):
            value = tls_raw.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"tls.{key}: required, the path of a PEM file")
            if not os.access(value, os.R_OK):
                raise ConfigError(f"tls.{key}: cannot read {value}")
            files[key] = Path(value)
        tls = TlsConfig(cert=files["cert"], key=files["key"])
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
        except (ssl.SSLError, OSError, ValueError):
            raise ConfigError(
                f"tls.cert, tls.key: {tls.cert} and {tls.key} are not a PEM certificate (chain) "
                "and its matching private key"
            ) from None

    workers = data.get("workers", defaults.workers)
    workers_auto = isinstance(workers, str) and workers.strip().lower() == "auto"
    if workers_auto:
        workers = min(usable_cores(), 64)
    if isinstance(workers, str) and workers.isdigit():
        workers = int(workers)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ConfigError(f"workers: expected a whole number from 1 to 64 or auto, got {workers!r}")

    return Config(
        listen_host=host,
        listen_port=port,
        storage=storage,
        manifest_ttl=manifest_ttl,
        negative_ttl=_number(data.get("negative_ttl", defaults.negative_ttl), "negative_ttl"),
        offline=upstream_defaults.offline,
        default_upstream=default_upstream,
        upstreams=upstreams,
        timeouts=timeouts,
        log_level=log_level,
        log_format=log_format,
        tls=tls,
        workers=workers,
        workers_auto=workers_auto,
        access=_parse_access(data["access"]) if data.get("access") is not None else None,
        warm=_parse_warm(data["warm"]) if data.get("warm") is not None else None,
        cluster=_parse_cluster(data["cluster"]) if data.get("cluster") is not None else None,
        unset_variables=tuple(unset),
        ops_listen=_parse_listen(data["ops_listen"], "ops_listen")
        if data.get("ops_listen") is not None
        else None,
        trusted_proxies=_networks(data.get("trusted_proxies", []), "trusted_proxies"),
    )


class _StrictLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, except that a key given twice in one mapping is an
    error (safe_load lets the last one win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"line {line}: key {key!r} is given twice (first on line {seen[key]})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a mirror.yaml; every problem is a ConfigError naming the key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no tags run code
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError(
            f"{path}: not valid YAML{where}" + (f": {problem}" if problem else "")
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return from_mapping(raw, env)
