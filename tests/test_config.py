"""mirror.yaml: defaults, ${VAR}, MIRROR_* overrides, and one clear line per mistake."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.config import (
    ConfigError,
    exposure_warnings,
    from_mapping,
    load,
    naming_warnings,
    parse_size,
    usable_cores,
)
from mirror.routing import resolve


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(text)
    return path


def test_repository_default_file_is_valid() -> None:
    config = load(Path(__file__).parent.parent / "mirror.yaml", env={})
    assert config.default_upstream == "docker.io"
    assert {"docker.io", "ghcr.io", "quay.io", "gcr.io", "registry.k8s.io"} <= set(config.upstreams)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 5000)
    assert config.storage.path == Path("./cache")


def test_full_file_with_env_vars(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
listen: 127.0.0.1:5001
storage: {path: /var/lib/mirror, max_size: 2GiB}
manifest_ttl: 60
default_upstream: docker.io
upstreams:
  docker.io:
    url: https://registry-1.docker.io
    username: ${HUB_USER}
    password: ${HUB_TOKEN}
  ghcr.io: {url: https://ghcr.io}
""",
    )
    config = load(path, env={"HUB_USER": "bob", "HUB_TOKEN": "s3cret"})
    assert config.listen_port == 5001
    assert config.storage.max_size == 2 * 1024**3
    assert config.manifest_ttl == 60
    hub = config.upstreams["docker.io"]
    assert (hub.username, hub.password) == ("bob", "s3cret")
    assert config.upstream_named("index.docker.io") is hub
    # unset variables leave the upstream anonymous
    anonymous = load(path, env={})
    assert anonymous.upstreams["docker.io"].username is None


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen: 127.0.0.1:5001\n")
    config = load(
        path,
        env={
            "MIRROR_LISTEN": "127.0.0.1:6000",
            "MIRROR_STORAGE_MAX_SIZE": "10MiB",
            "MIRROR_MANIFEST_TTL": "5",
        },
    )
    assert config.listen_port == 6000
    assert config.storage.max_size == 10 * 1024**2
    assert config.manifest_ttl == 5


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "key.json"
    secret.write_text("from-a-file\n")
    path = _write(
        tmp_path,
        f"""
upstreams:
  gcr.io: {{url: https://gcr.io, username: _json_key, password_file: {secret}}}
default_upstream: gcr.io
""",
    )
    assert load(path, env={}).upstreams["gcr.io"].password == "from-a-file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: nowhere\n", "listen:"),
        ("storage: {path: /x, max_size: lots}\n", "storage.max_size:"),
        ("storage: {max_size: -1}\n", "storage.max_size:"),
        ("storage: {paht: /x}\n", "storage.paht: unknown key"),
        ("colour: blue\n", "colour: unknown key"),
        ("manifest_ttl: soon\n", "manifest_ttl:"),
        ("default_upstream: quay.io\n", "default_upstream:"),
        (
            "upstreams: {ghcr.io: {}}\ndefault_upstream: ghcr.io\n",
            "upstreams.ghcr.io.url: required",
        ),
        ("upstreams: {ghcr.io: {url: ftp://x}}\n", "upstreams.ghcr.io.url:"),
        ("upstreams: {ghcr.io: {url: https://ghcr.io, token: x}}\n", "upstreams.ghcr.io.token"),
        (
            "upstreams: {docker.io: {url: https://r, username: u}}\n",
            "upstreams.docker.io: username and password",
        ),
        ("upstreams: []\n", "upstreams: expected a mapping"),
        ("timeouts: {read: 0}\n", "timeouts.read:"),
        ("log_level: loud\n", "log_level:"),
        ("- a list\n", "expected a mapping"),
        ("listen: [unclosed\n", "not valid YAML at line"),
        (
            "listen: 0.0.0.0:5000\nstorage: {path: /a}\nlisten: 127.0.0.1:1\n",
            "line 3: key 'listen' is given twice (first on line 1)",
        ),
        (
            "upstreams:\n  ghcr.io: {url: https://a}\n  ghcr.io: {url: https://b}\n",
            "key 'ghcr.io' is given twice",
        ),
        # unquoted secrets that YAML turns into numbers or booleans
        (
            "upstreams: {docker.io: {url: https://r, username: u, password: 0123456}}\n",
            "upstreams.docker.io.password: YAML read this as int 42798",
        ),
        (
            "upstreams: {docker.io: {url: https://r, username: u, password: yes}}\n",
            "upstreams.docker.io.password: YAML read this as bool True",
        ),
        (
            "upstreams: {docker.io: {url: https://r, username: 12345, password: p}}\n",
            "upstreams.docker.io.username: YAML read this as",
        ),
        ("access: {rules: []}\n", "access.rules: required"),
        ("access: {rules: [{anonymous: true}]}\n", "access.rules[0].repositories: required"),
        (
            "access: {rules: [{repositories: ['*'], users: [ci]}]}\n",
            "access.rules[0]: names users, but access.users_file is not set",
        ),
        (
            "access: {rules: [{repositories: ['*'], networks: [10.0.0.0/33]}]}\n",
            "access.rules[0].networks: '10.0.0.0/33' is not a network",
        ),
        (
            "access: {rules: [{repositories: ['*'], actions: [delete]}]}\n",
            "access.rules[0].actions: 'delete' is not pull or push",
        ),
        ("access: {rules: [{repositories: ['*'], anonymous: yes please}]}\n", "anonymous:"),
        ("access: {users_file: /nonexistent, rules: []}\n", "access.users_file: cannot read"),
        (
            "access: {rules: [{repositories: ['*'], user: [ci]}]}\n",
            "access.rules[0].user: unknown key",
        ),
        (
            "access: {rules: [{repositories: ['*']}], operations: {networks: x}}\n",
            "access.operations.networks",
        ),
        ("ops_listen: 9000\n", "ops_listen: expected host:port"),
        ("warm: {images: []}\n", "warm.images: required"),
        ("warm: {images: [alpine], platforms: [amd64]}\n", "warm.platforms: 'amd64' is not"),
        ("warm: {images: [alpine], every: 1s}\n", "warm.every: must be at least 10"),
        ("cluster: {}\n", "cluster.redis: required"),
        ("cluster: {redis: 'http://r:6379'}\n", "cluster.redis: expected redis://host:port/db"),
        ("cluster: {redis: 'redis://r:port/0'}\n", "cluster.redis: expected redis://host:port/db"),
        ("cluster: {redis: 'redis://r/0', lease: 0.5}\n", "cluster.lease: at least 1s"),
        ("cluster: {redis: 'redis://r/0', leases: 5}\n", "cluster.leases: unknown key"),
        ("storage: {s3: {endpoint: 'http://s3:8333'}}\n", "storage.s3.bucket: required"),
        ("storage: {s3: {bucket: bkt, endpoint: 's3:8333'}}\n", "storage.s3.endpoint: expected"),
        ("storage: {s3: {bucket: bkt, access_key: k}}\n", "access_key and secret_key go together"),
        ("storage: {s3: {bucket: 'Bad_Bucket!'}}\n", "storage.s3.bucket: 'Bad_Bucket!' is not"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(_write(tmp_path, text), env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("1KiB", 1024),
        ("50GiB", 50 * 1024**3),
        ("1.5 MiB", 1572864),
        ("2MB", 2 * 10**6),
    ],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "k") == size


def test_upstream_names_aliases_and_docker_hub_by_url() -> None:
    config = from_mapping(
        {
            "default_upstream": "hub",
            "upstreams": {
                "hub": {"url": "https://registry-1.docker.io"},  # Docker Hub by its URL
                "corp": {"url": "https://registry.corp.example:5000", "aliases": ["corp.io"]},
                "ghcr.io": {"url": "https://ghcr.io"},
            },
        },
        env={},
    )
    hub = config.upstreams["hub"]
    assert hub.docker_hub and config.upstream_named("docker.io") is hub
    assert config.upstream_named("index.docker.io") is hub
    assert config.upstream_named("corp.io") is config.upstreams["corp"]
    assert resolve(config, "alpine", None).repository == "library/alpine"
    assert resolve(config, "alpine", "docker.io").upstream is hub
    assert resolve(config, "team/app", "corp.io").upstream.name == "corp"
    assert not config.upstreams["corp"].docker_hub
    assert naming_warnings(config) == [
        "upstreams.corp: containerd's hosts.toml asks with ns=registry.corp.example:5000, "
        "which names no upstream: add aliases: [registry.corp.example:5000] "
        "(or name it registry.corp.example:5000)"
    ]


def test_a_registry_name_means_one_upstream() -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping(
            {
                "upstreams": {
                    "docker.io": {"url": "https://registry-1.docker.io"},
                    "mine": {"url": "https://r.example", "aliases": ["docker.io"]},
                }
            },
            env={},
        )
    assert "upstreams.mine: 'docker.io' already means upstream 'docker.io'" in str(caught.value)


def test_registry_names_are_any_case_and_ports_count() -> None:
    config = from_mapping(
        {
            "default_upstream": "registry.corp",
            "upstreams": {
                "registry.corp": {"url": "https://registry.corp:5000"},
                "Corp.Example": {"url": "https://corp.example"},
            },
        },
        env={},
    )
    assert config.upstream_named("CORP.EXAMPLE") is config.upstreams["Corp.Example"]
    # containerd asks with ns=registry.corp:5000: the name without the port is not enough
    assert [w.split(":")[0] for w in naming_warnings(config)] == ["upstreams.registry.corp"]
    with pytest.raises(ConfigError) as caught:
        from_mapping(
            {
                "upstreams": {
                    "GHCR.io": {"url": "https://ghcr.io"},
                    "docker.io": {"url": "https://registry-1.docker.io", "aliases": ["ghcr.io"]},
                }
            },
            env={},
        )
    assert "'ghcr.io' already means upstream" in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"proxy": "http://user:s3cret@127.0.0.1:notaport"}, "proxy: expected an http(s) URL"),
        ({"proxy": "http://"}, "proxy: expected an http(s) URL"),
        ({"ca_file": "NOT_PEM"}, "ca_file: "),
        ({"ca_file": "DIRECTORY"}, "ca_file: "),
        ({"cert_file": "NOT_PEM", "key_file": "NOT_PEM"}, "cert_file, key_file: "),
    ],
)
def test_proxy_and_tls_mistakes_name_the_key_and_hide_secrets(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    files = {"NOT_PEM": str(not_pem), "DIRECTORY": str(tmp_path)}
    upstream = {"url": "https://r.example", **{k: files.get(v, v) for k, v in settings.items()}}
    with pytest.raises(ConfigError) as caught:
        from_mapping({"upstreams": {"docker.io": upstream}}, env={})
    assert f"upstreams.docker.io.{message}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_groups_must_exist_and_rules_read_as_written(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    users.write_text("")
    with pytest.raises(
        ConfigError, match=r"access.rules\[0\].groups: 'ops' is not in access.groups"
    ):
        from_mapping(
            {
                "access": {
                    "users_file": str(users),
                    "rules": [{"repositories": ["*"], "groups": ["ops"]}],
                }
            },
            env={},
        )
    config = from_mapping(
        {
            "ops_listen": "127.0.0.1:9090",
            "access": {
                "users_file": str(users),
                "groups": {"ops": ["alice"]},
                "rules": [{"repositories": "ghcr.io/acme/*", "groups": ["ops"]}],
                "operations": {"networks": ["10.0.0.0/8"]},
            },
        },
        env={},
    )
    assert config.ops_listen == ("127.0.0.1", 9090)
    assert config.access is not None
    rule = config.access.rules[0]
    assert rule.applies("ghcr.io/acme/deep/tool", "10.1.2.3") and not rule.applies(
        "ghcr.io/x", None
    )
    assert rule.grants("alice", config.access.groups) and not rule.grants(
        None, config.access.groups
    )
    assert config.access.operations.applies("*", "::ffff:10.0.0.1")  # v4-mapped: still 10/8
    assert not config.access.operations.applies("*", "192.168.0.1")


def test_an_open_mirror_holding_credentials_is_warned_about() -> None:
    def warnings(listen: str, **access: object) -> list[str]:
        upstreams = {"docker.io": {"url": "https://r", "username": "u", "password": "s3cr3t"}}
        raw: dict[str, object] = {"listen": listen, "upstreams": upstreams}
        if access:
            raw["access"] = access
        return exposure_warnings(from_mapping(raw, env={}))

    (warning,) = warnings("0.0.0.0:5000")
    assert "anyone who reaches this port pulls with the credentials of docker.io" in warning
    assert (
        "p" not in warning.split("credentials of")[1].replace("port", "").replace("(set", "")[:12]
    )
    assert warnings("127.0.0.1:5000") == []
    assert warnings("0.0.0.0:5000", rules=[{"repositories": ["*"], "anonymous": True}]) == []


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
    ],
)
def test_durations_with_units(value: object, seconds: float) -> None:
    config = from_mapping({"manifest_ttl": value, "timeouts": {"revalidate": value}}, env={})
    assert config.manifest_ttl == seconds and config.timeouts.revalidate == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "-1s", "1w", True])
def test_durations_that_are_not(value: object) -> None:
    with pytest.raises(ConfigError, match="manifest_ttl: expected seconds or a duration like 30s"):
        from_mapping({"manifest_ttl": value}, env={})


def test_an_unset_variable_is_named() -> None:
    from mirror.config import variable_warnings

    raw = {
        "upstreams": {
            "docker.io": {
                "url": "https://r",
                "username": "${HUB_USER}",
                "password": "${HUB_TOKEN}",
            },
            "quay.io": {"url": "${QUAY_URL:-https://quay.io}"},
        }
    }
    config = from_mapping(raw, env={})
    assert variable_warnings(config) == [
        "${HUB_TOKEN} is not set in the environment: it reads as empty",
        "${HUB_USER} is not set in the environment: it reads as empty",
    ]  # QUAY_URL has a default: not named
    assert config.upstreams["docker.io"].username is None  # anonymous, as documented


def test_workers_auto_is_one_per_usable_core(tmp_path: Path) -> None:
    path = _write(tmp_path, "workers: auto\nupstreams: {docker.io: {url: http://127.0.0.1:9}}\n")
    assert load(path, env={}).workers == min(len(os.sched_getaffinity(0)), 64)
    assert load(path, env={"MIRROR_WORKERS": "AUTO"}).workers == load(path, env={}).workers
    with pytest.raises(ConfigError, match=r"MIRROR_WORKERS \(for workers\): expected a whole"):
        load(path, env={"MIRROR_WORKERS": "many"})


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("garbage", None)],
)
def test_workers_auto_respects_a_container_cpu_limit(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    """A Kubernetes CPU limit of 1.5 cores is two workers, not one per core of the node."""
    cgroup = tmp_path / "cpu.max"
    cgroup.write_text(cpu_max + "\n")
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(cgroup) == (cores if expected is None else min(cores, expected))
    assert usable_cores(tmp_path / "absent") == cores


def test_a_bad_value_from_the_environment_names_the_variable() -> None:
    """The file says 50GiB; MIRROR_STORAGE_MAX_SIZE says huge: the line points there."""
    with pytest.raises(ConfigError) as caught:
        from_mapping({"storage": {"max_size": "50GiB"}}, {"MIRROR_STORAGE_MAX_SIZE": "huge"})
    assert str(caught.value).startswith("MIRROR_STORAGE_MAX_SIZE (for storage.max_size): ")
    with pytest.raises(ConfigError, match=r"^storage\.max_size: "):
        from_mapping({"storage": {"max_size": "huge"}}, {})


def test_cluster_and_shared_tier_keys(tmp_path: Path) -> None:
    text = (
        "cluster: {redis: 'redis://:pw@redis:6380/2', lease: 30s}\n"
        "storage: {s3: {bucket: cache, endpoint: 'http://s3:8333', prefix: mirror,"
        " access_key: k, secret_key: s}}\n"
    )
    config = load(_write(tmp_path, text), env={})
    assert config.cluster is not None and config.cluster.lease == 30
    assert config.cluster.redis == "redis://:pw@redis:6380/2"
    s3 = config.storage.s3
    assert s3 is not None and (s3.bucket, s3.prefix, s3.region) == ("cache", "mirror/", "us-east-1")
    assert load(_write(tmp_path, "{}\n"), env={}).cluster is None
    from_env = load(_write(tmp_path, "{}\n"), env={"MIRROR_CLUSTER_REDIS": "redis://r:1/0"})
    assert from_env.cluster is not None and from_env.cluster.redis == "redis://r:1/0"
