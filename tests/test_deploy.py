"""The deploy files, checked by what can be checked offline: they parse, name the right
ports, paths and probes, carry a valid mirror.yaml, and the systemd unit verifies."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mirror.app import STOP_LIMIT
from mirror.cli import SHUTDOWN_WAIT
from mirror.config import from_mapping, load, usable_cores
from tests.support.engines import haproxy_check

DEPLOY = Path(__file__).parent.parent / "deploy"


def _kube() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "mirror.yaml").read_text()))
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in documents}


def test_kubernetes_manifests() -> None:
    found = _kube()
    # nothing that needs the Prometheus operator's CRDs: apply works on any cluster
    assert set(found) == {
        "ConfigMap/mirror-config",
        "StatefulSet/mirror",
        "Service/mirror",
        "Service/mirror-ops",
    }
    kinds = {name.split("/")[0]: doc for name, doc in found.items() if name != "Service/mirror-ops"}
    (monitor_doc,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "servicemonitor.yaml").read_text())
    kinds["ServiceMonitor"] = monitor_doc
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["mirror.yaml"])
    parsed = from_mapping(config, env={})
    assert parsed.listen_port == 5000 and str(parsed.storage.path) == "/var/lib/mirror"
    assert parsed.ops_listen == ("0.0.0.0", 9000)
    assert config["workers"] == "auto" and parsed.workers == usable_cores()
    spec = kinds["StatefulSet"]["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 5000, "ops": 9000}
    # a stop's shutdown wait and its clean-up, before the kubelet's SIGKILL
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_WAIT + STOP_LIMIT
    # probes on the plain-HTTP operations port: they work when the main port serves TLS
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert (
        container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"]
        >= 600
    )  # ten minutes of start-up repair before the liveness probe counts
    assert container["imagePullPolicy"] == "Never" and ":latest" not in container["image"]
    ops_service = found["Service/mirror-ops"]
    assert ops_service["spec"]["clusterIP"] == "None"  # headless: the StatefulSet's service
    assert spec["serviceName"] == "mirror-ops"
    monitor = kinds["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == ops_service["metadata"]["labels"]
    assert monitor["endpoints"][0]["port"] == ops_service["spec"]["ports"][0]["name"] == "ops"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["cache"] == "/var/lib/mirror"
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "cache"
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    service = kinds["Service"]["spec"]
    assert service["ports"][0]["port"] == 5000
    assert service["selector"] == spec["selector"]["matchLabels"]
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("version", ["1.27", "1.30"])
def test_kubernetes_manifests_match_the_api_schemas(version: str) -> None:
    """Every object against the Kubernetes API's own schema (bundled: no cluster, no
    network), strictly: a misspelt field is an error, not ignored. The ServiceMonitor is a
    CRD of the Prometheus Operator, with no bundled schema: test_kubernetes_manifests
    checks what it says."""
    documents = [
        document
        for name in ("mirror.yaml", "servicemonitor.yaml")
        for document in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text())
    ]
    checked = 0
    for document in documents:
        if document["kind"] == "ServiceMonitor":
            continue
        kubernetes_validate.validate(document, version, strict=True)
        checked += 1
    assert checked == 4  # the ConfigMap, the StatefulSet and its two Services
    broken = json.loads(json.dumps(next(d for d in documents if d["kind"] == "StatefulSet")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mirror", "prometheus", "grafana"}
    assert "5000:5000" in services["mirror"]["ports"]
    assert "../mirror.yaml:/etc/mirror/mirror.yaml:ro" in [
        v.split("  ")[0] for v in services["mirror"]["volumes"]
    ]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert any(v.endswith(":/var/lib/mirror") for v in services["mirror"]["volumes"])
    assert services["mirror"]["build"]["dockerfile"] == "deploy/Dockerfile"
    # Docker's default 10 s would SIGKILL a stop before its shutdown wait and clean-up end
    assert (
        int(services["mirror"]["stop_grace_period"].removesuffix("s")) > SHUTDOWN_WAIT + STOP_LIMIT
    )
    for mount in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        assert (DEPLOY / source).exists(), source
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["mirror:9000"]


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = [line.split()[0] for line in lines if line.split()[0].isupper()]
    assert instructions[0] == "FROM"
    assert "USER mirror" in lines and "VOLUME /var/lib/mirror" in lines
    assert "EXPOSE 5000 9000" in lines
    assert 'RUN pip install --no-cache-dir ".[ecr]" && rm -rf /src' in lines  # ECR logins
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("http://127.0.0.1:9000/healthz" in line for line in lines)
    assert any("MIRROR_OPS_LISTEN=0.0.0.0:9000" in line for line in lines)
    assert any(line.startswith("MIRROR_WORKERS=auto") for line in lines)  # one per core
    copied = [line.split()[1] for line in lines if line.startswith("COPY")]
    root = DEPLOY.parent
    for source in copied:
        assert (root / source).exists(), source
    load(root / "mirror.yaml", env={})  # the config it ships is valid


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is needed: scripts/test installs systemd")
    # The command beside this interpreter (the venv scripts/test made), not one on PATH:
    # a fresh machine has none there.
    mirror = str(Path(sys.executable).parent / "mirror")
    assert os.access(mirror, os.X_OK), "the mirror command is installed by scripts/test"
    unit = (DEPLOY / "systemd" / "mirror.service").read_text()
    assert "ExecStart=/opt/mirror/bin/mirror serve" in unit
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit
    # the store's place is in the config file the commands read, not in the unit's env
    assert "MIRROR_STORAGE_PATH" not in unit
    assert "Environment=MIRROR_WORKERS=auto" in unit  # one worker per core
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit  # systemctl reload sends SIGHUP
    install = next(line for line in unit.splitlines() if line.startswith("#          sed "))
    command = install.removeprefix("#          ").split(" > ")[0]
    root = DEPLOY.parent
    made = subprocess.run(
        ["bash", "-c", command], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert from_mapping(yaml.safe_load(made), env={}).storage.path == Path("/var/lib/mirror")
    local = tmp_path / "mirror.service"
    local.write_text(unit.replace("/opt/mirror/bin/mirror", mirror))
    result = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mirror.service" not in result.stdout + result.stderr  # no warning about it


def test_grafana_dashboard_is_per_instance() -> None:
    """Two mirrors scraped by one Prometheus are not summed: every query is scoped by the
    $instance variable; the disk-full series has a panel of its own."""
    dashboard = json.loads((DEPLOY / "grafana" / "mirror-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "mirror_build_info" in variables["instance"]["definition"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for metric in re.findall(r"mirror_[a-z_]+(?:\{[^}]*\})?", target["expr"]):
                assert 'instance=~"$instance"' in metric, (panel["title"], target["expr"])
        exprs = " ".join(t["expr"] for t in panel.get("targets", []))
        assert "disk_full" not in exprs or "token" not in exprs, panel["title"]


def test_cluster_files(tmp_path: Path) -> None:
    """deploy/cluster: HAProxy's config is valid to HAProxy itself with the compose names
    as its defaults; the compose file runs three replicas on the replica config, which
    loads; the S3 server's key is the one the replicas use."""
    cluster = DEPLOY / "cluster"
    config = (cluster / "haproxy.cfg").read_text()
    env = {f"MIRROR_{n}": f"127.0.0.1:{5000 + n}" for n in (1, 2, 3)}
    checked = haproxy_check(tmp_path, config, env={"LISTEN": "127.0.0.1:5000", **env})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in ("mirror1", "mirror2", "mirror3"):
        assert f'"${{MIRROR_{name[-1]}-{name}:5000}}"' in config  # the compose names by default
    assert "balance hash var(txn.spread)" in config and "hash-type consistent" in config
    assert "http-check send meth GET uri /readyz" in config

    compose = yaml.safe_load((cluster / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"haproxy", "mirror1", "mirror2", "mirror3", "redis", "s3"}
    for name in ("mirror1", "mirror2", "mirror3"):
        mounts = services[name]["volumes"]
        assert "./mirror.yaml:/etc/mirror/mirror.yaml:ro" in mounts
        assert any(m.endswith(":/var/lib/mirror") for m in mounts)
    assert services["haproxy"]["ports"] == ["5000:5000"]
    replica_env = services["mirror1"]["environment"]
    s3_keys = json.loads((cluster / "s3.json").read_text())["identities"][0]["credentials"][0]
    assert replica_env["S3_ACCESS_KEY"] == s3_keys["accessKey"]
    replica = load(
        cluster / "mirror.yaml", env={"S3_ACCESS_KEY": "mirror", "S3_SECRET_KEY": "secret"}
    )
    assert replica.cluster is not None and replica.cluster.redis == "redis://redis:6379/0"
    assert replica.storage.s3 is not None and replica.storage.s3.endpoint == "http://s3:8333"
    assert replica.ops_listen == ("0.0.0.0", 9000)
    # the replicas believe HAProxy's X-Forwarded-For, and no other address's
    assert "option forwardfor" in config
    assert "http-reuse never" in config  # each client's connection keeps the fast path
    balancer = services["haproxy"]["networks"]["default"]["ipv4_address"]
    assert [str(n) for n in replica.trusted_proxies] == [f"{balancer}/32"]
    pool = compose["networks"]["default"]["ipam"]["config"][0]
    assert ipaddress.ip_address(balancer) in ipaddress.ip_network(pool["subnet"])
    # Docker hands the other containers addresses from ip_range alone: never HAProxy's
    assert ipaddress.ip_address(balancer) not in ipaddress.ip_network(pool["ip_range"])
