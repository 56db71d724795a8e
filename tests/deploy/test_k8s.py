"""The Kubernetes manifests and the image, checked against the schemas and against the code.

Rendering is kustomize's own (``kubectl kustomize``; kubectl comes with the machine image).
Standard kinds are validated offline against the Kubernetes OpenAPI schemas shipped by
``kubernetes-validate``, strictly (unknown fields fail), for the oldest Kubernetes the
manifests support and the newest the package knows. The base and the overlays dev and prod hold
no prometheus-operator kinds (they must apply on a cluster without its CRDs); those are the
optional component k8s/components/prometheus-operator, rendered by the overlay prod-monitoring.
They have no schema in the package: they are checked against the subset of their CRD schemas
written below, and the PrometheusRule's rules by promtool (``tests/deploy/test_ops.py``). The
production image is the one the release names by commit SHA or digest (docs/deploy.md).
"""

import dataclasses
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from service.app import create_app as create_service_app
from shared.settings import (
    PROGRAMS,
    ServiceSettings,
    SidecarSettings,
    WorkerSettings,
    load_settings,
    variables,
)
from sidecar.app import create_app as create_sidecar_app
from tests.support.paths import ROOT_DIR

ROOT = ROOT_DIR
K8S = ROOT / "k8s"
# prod on a managed Redis Cluster: readings in partitions, REDIS_URL a cluster's endpoint.
REDIS_CLUSTER_TARGET = "overlays/redis-cluster"
# What applies on any cluster: no CRD kinds.
TARGETS = ("base", "overlays/dev", "overlays/prod", REDIS_CLUSTER_TARGET)
# prod plus the optional prometheus-operator component.
MONITORING_TARGET = "overlays/prod-monitoring"
ALL_TARGETS = (*TARGETS, MONITORING_TARGET)
COMPONENT = K8S / "components" / "prometheus-operator"
OPERATOR_GROUP = "monitoring.coreos.com"
# The API groups a cluster serves without any CRD: the core group, these, and *.k8s.io.
BUILT_IN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling"})
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PROD_IMAGE = "registry.example.com/pulsecal/pulsecal"
# The committed tag until a release sets one: not a valid tag, so no pod can run it.
UNRELEASED_TAG = "{commit-sha}"
# The docker reference grammar's tag; a reference whose tag fails it is refused by the kubelet.
_VALID_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# The tags that name one build for good: a git commit SHA, or a digest instead of a tag.
_COMMIT_TAG = re.compile(r":[0-9a-f]{40}$")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# The oldest Kubernetes the manifests need: 1.29 (native sidecars on by default;
# ContainerResource metrics in the HPA since 1.27), and the newest the package knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
HADOLINT = Path(sys.executable).with_name("hadolint")

Manifest = dict[str, Any]

# Programs the manifests may run before setup.cfg declares them (none now).
PENDING_PROGRAMS: frozenset[str] = frozenset()
# Variables the manifests set that no program's settings declare: read by the OpenTelemetry SDK, or
# only expanded into other variables.
EXTRA_VARIABLES = frozenset({"POD_NAMESPACE", "OTEL_RESOURCE_ATTRIBUTES"})
# How each program's listening port is configured, and its default.
PROGRAM_PORTS = {
    "pulsecal-service": ("PORT", ServiceSettings().port),
    "pulsecal-sidecar": ("SIDECAR_PORT", SidecarSettings().sidecar_port),
    "pulsecal-worker": ("WORKER_PORT", WorkerSettings().worker_port),
    "pulsecal-analysis": ("PORT", 8000),
}
# The seed's probe timings ("Health Check Monitoring").
SEED_PROBES = {
    "livenessProbe": ("/health/liveness", 30, 10, None),
    "readinessProbe": ("/health/readiness", 5, 5, None),
    "startupProbe": ("/health/startup", 10, 5, 30),
}
SETTINGS_VARIABLES = frozenset(variable.name for variable in variables())
# Each program's settings class, by the name its container runs.
PROGRAM_SETTINGS = {program.program: program for program in PROGRAMS}
# Stand-ins for the Secret's values where a test loads a container's settings.
SECRET_STAND_INS = {
    "DATABASE_URL": "postgresql://pulsecal@db.example:5432/pulsecal",
    "REDIS_URL": "redis://redis.example:6379/0",
    "METRICS_TOKEN": "token",
    "ADMIN_TOKEN": "admin-token",
}

_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
_SECRET_KEY = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
    "additionalProperties": False,
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
    r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
# The fields these manifests use, typed as in monitoring.coreos.com/v1's CRDs.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "authorization": {
                                    "type": "object",
                                    "properties": {
                                        "type": {"type": "string"},
                                        "credentials": _SECRET_KEY,
                                    },
                                    "additionalProperties": False,
                                },
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "labels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                            "annotations": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def _kustomize(directory: Path) -> tuple[Manifest, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is not on PATH"
    output = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(output) if doc)


@functools.cache
def _render(target: str) -> tuple[Manifest, ...]:
    return _kustomize(K8S / target)


def _k8s_copy(tmp_path: Path) -> Path:
    """A scratch copy of k8s/, to render what an edit of it would give."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    return copy


def _set_image(overlay: Path, reference: str) -> None:
    """What `kustomize edit set image pulsecal=<reference>` does to the overlay's entry."""
    kustomization = overlay / "kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text())
    [entry] = [image for image in data["images"] if image["name"] == "pulsecal"]
    name, _, digest = reference.partition("@")
    if digest:
        entry.pop("newTag", None)
        entry.update(newName=name, digest=digest)
    else:
        name, _, tag = name.rpartition(":")
        entry.pop("digest", None)
        entry.update(newName=name, newTag=tag)
    kustomization.write_text(yaml.safe_dump(data))


def _is_mutable(image: str) -> bool:
    """Whether the reference may name another build tomorrow: a pullable tag that is not a
    commit SHA (``latest``, a version like the old ``0.1.0``, or none, which means ``latest``).
    A placeholder the kubelet cannot parse names nothing and runs nothing."""
    if _COMMIT_TAG.search(image) or _DIGEST.search(image):
        return False
    last = image.rsplit("/", 1)[-1]
    tag = last.partition(":")[2] if ":" in last else None
    return tag is None or bool(_VALID_TAG.match(tag))


def _mutable_images(docs: tuple[Manifest, ...]) -> list[str]:
    return [
        f"{deployment['metadata']['name']}/{container['name']}: {container['image']}"
        f" ({container.get('imagePullPolicy', 'default')})"
        for deployment, _, container in _all_containers(docs)
        if _is_mutable(container["image"])
    ]


@pytest.fixture(params=ALL_TARGETS)
def rendered(request: pytest.FixtureRequest) -> tuple[Manifest, ...]:
    return _render(request.param)


def _find(docs: tuple[Manifest, ...], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def _one(docs: tuple[Manifest, ...], kind: str, name: str) -> Manifest:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_spec(deployment: Manifest) -> Manifest:
    spec: Manifest = deployment["spec"]["template"]["spec"]
    return spec


def _containers(pod: Manifest) -> Iterator[Manifest]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _all_containers(docs: tuple[Manifest, ...]) -> Iterator[tuple[Manifest, Manifest, Manifest]]:
    for deployment in _find(docs, "Deployment"):
        pod = _pod_spec(deployment)
        for container in _containers(pod):
            yield deployment, pod, container


def _container(deployment: Manifest, name: str) -> Manifest:
    found = [c for c in _containers(_pod_spec(deployment)) if c["name"] == name]
    assert len(found) == 1, f"{deployment['metadata']['name']}: container {name}"
    return found[0]


def _config_map(docs: tuple[Manifest, ...], name: str) -> Mapping[str, str]:
    data: Mapping[str, str] = _one(docs, "ConfigMap", name)["data"]
    return data


def _environment(docs: tuple[Manifest, ...], container: Manifest) -> dict[str, str]:
    """The variables the container starts with (Secret values by stand-ins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_config_map(docs, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = SECRET_STAND_INS[var["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[var["name"]] = "pulsecal-api-7d9f8-abcde"  # a pod's name or namespace
    return env


def _program(container: Manifest) -> str:
    program: str = container["command"][0]
    return program


def _listening_port(docs: tuple[Manifest, ...], container: Manifest) -> int:
    variable, default = PROGRAM_PORTS[_program(container)]
    return int(_environment(docs, container).get(variable, default))


def _probe_port(container: Manifest, probe: Manifest) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"{container['name']}: no port named {port}"
    return int(numbers[0])


def _probes(container: Manifest) -> Iterator[tuple[str, Manifest]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in container:
            yield kind, container[kind]


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@functools.cache
def _get_routes(program: str) -> frozenset[str]:
    """The paths a program answers GET on, from its own router."""
    factory = {
        "pulsecal-service": lambda: create_service_app(ServiceSettings()),
        "pulsecal-sidecar": lambda: create_sidecar_app(SidecarSettings()),
    }
    app = factory[program]()
    return frozenset(
        resource.canonical
        for resource in app.router.resources()
        if isinstance(resource, web.PlainResource)
        and any(route.method == "GET" for route in resource)
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_manifest_validates_against_its_schema(target: str, version: str) -> None:
    docs = _render(target)
    assert docs
    for doc in docs:
        crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd_schema is not None:
            jsonschema.validate(doc, crd_schema)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_the_base_and_overlays_apply_on_a_cluster_without_the_operator(target: str) -> None:
    needs_crds = [
        f"{doc['apiVersion']} {doc['kind']}/{doc['metadata']['name']}"
        for doc in _render(target)
        if (group := doc["apiVersion"].rpartition("/")[0]) not in BUILT_IN_GROUPS
        and not group.endswith(".k8s.io")
    ]
    assert not needs_crds
    assert not [d for d in _render(target) if d["apiVersion"].startswith(f"{OPERATOR_GROUP}/")]


def test_the_operator_kinds_are_an_optional_component() -> None:
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert (component["apiVersion"], component["kind"]) == (
        "kustomize.config.k8s.io/v1alpha1",
        "Component",
    )
    overlay = yaml.safe_load((K8S / MONITORING_TARGET / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../prod"]
    assert overlay["components"] == ["../../components/prometheus-operator"]
    prod = _render("overlays/prod")
    monitored = _render(MONITORING_TARGET)
    added = [doc for doc in monitored if doc not in prod]
    # The component adds its two resources and changes nothing of prod's.
    assert len(monitored) == len(prod) + len(added)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in added) == [
        ("PrometheusRule", "pulsecal"),
        ("ServiceMonitor", "pulsecal"),
    ]
    for doc in added:
        jsonschema.validate(doc, CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])])
        assert doc["metadata"]["namespace"] == "pulsecal"
        assert doc["metadata"]["labels"] == {"app.kubernetes.io/part-of": "pulsecal"}
    [rule] = _find(monitored, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "ops" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


@pytest.mark.parametrize(("overlay", "namespace"), [("prod", "pulsecal"), ("dev", "pulsecal-dev")])
def test_one_components_line_opts_an_overlay_in(
    tmp_path: Path, overlay: str, namespace: str
) -> None:
    k8s = _k8s_copy(tmp_path)
    kustomization = k8s / "overlays" / overlay / "kustomization.yaml"
    kustomization.write_text(
        kustomization.read_text() + "components:\n  - ../../components/prometheus-operator\n"
    )
    docs = _kustomize(k8s / "overlays" / overlay)
    operator = [d for d in docs if d["apiVersion"] == f"{OPERATOR_GROUP}/v1"]
    assert sorted(d["kind"] for d in operator) == ["PrometheusRule", "ServiceMonitor"]
    assert {d["metadata"]["namespace"] for d in operator} == {namespace}
    if overlay == "prod":
        assert docs == _render(MONITORING_TARGET)
    else:  # the Secret dev generates keeps the name the ServiceMonitor gives
        [monitor] = _find(docs, "ServiceMonitor")
        credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
        assert credentials["key"] in _one(docs, "Secret", credentials["name"])["data"]


def test_the_validation_rejects_an_unknown_field() -> None:
    deployment = _one(_render("base"), "Deployment", "pulsecal-api")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_the_api_pod_runs_service_and_sidecar_under_one_pod_name(
    rendered: tuple[Manifest, ...],
) -> None:
    for name, main in (("pulsecal-api", "service"), ("pulsecal-worker", "worker")):
        deployment = _one(rendered, "Deployment", name)
        pod = _pod_spec(deployment)
        assert [c["name"] for c in pod["containers"]] == [main]
        sidecar = _container(deployment, "sidecar")
        # A native sidecar: started before the main container, stopped after it.
        assert sidecar["restartPolicy"] == "Always"
        assert _program(sidecar) == "pulsecal-sidecar"
        pod_names = [
            var["valueFrom"]["fieldRef"]["fieldPath"]
            for container in (pod["containers"][0], sidecar)
            for var in container["env"]
            if var["name"] == "POD_NAME"
        ]
        assert pod_names == ["metadata.name", "metadata.name"]
        service_env = _environment(rendered, pod["containers"][0])
        sidecar_env = _environment(rendered, sidecar)
        for shared in ("REDIS_URL", "REDIS_KEY_PREFIX", "POD_NAME", "HEARTBEAT_TTL"):
            assert service_env.get(shared) == sidecar_env.get(shared), shared


def test_probes_ask_paths_the_programs_serve_on_the_ports_they_listen_on(
    rendered: tuple[Manifest, ...],
) -> None:
    checked = 0
    for _, _, container in _all_containers(rendered):
        program = _program(container)
        for kind, probe in _probes(container):
            assert _probe_port(container, probe) == _listening_port(rendered, container), (
                f"{container['name']} {kind}"
            )
            if program in ("pulsecal-service", "pulsecal-sidecar"):
                assert probe["httpGet"]["path"] in _get_routes(program), (
                    f"{container['name']} {kind}"
                )
            checked += 1
    # The worker's and the analysis service's paths are asked of the running programs in
    # tests/deploy/test_ops.py.
    assert checked >= 10


def test_the_service_container_has_the_seeds_probes_and_timings(
    rendered: tuple[Manifest, ...],
) -> None:
    service = _container(_one(rendered, "Deployment", "pulsecal-api"), "service")
    for kind, (path, delay, period, failures) in SEED_PROBES.items():
        probe = service[kind]
        assert probe["httpGet"]["path"] == path
        assert (probe.get("initialDelaySeconds", 0), probe["periodSeconds"]) == (delay, period)
        if failures is not None:
            assert probe["failureThreshold"] == failures
    sidecar = _container(_one(rendered, "Deployment", "pulsecal-api"), "sidecar")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/health/liveness"
    # The sidecar's /health is 503 while any dependency is down: never its readiness.
    assert "readinessProbe" not in sidecar


def test_every_container_runs_unprivileged_on_a_read_only_root(
    rendered: tuple[Manifest, ...],
) -> None:
    seen = 0
    for deployment, pod, container in _all_containers(rendered):
        where = f"{deployment['metadata']['name']}/{container['name']}"
        pod_context = pod["securityContext"]
        context = {**pod_context, **container.get("securityContext", {})}
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] != 0, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["capabilities"] == {"drop": ["ALL"]}, where
        assert not context.get("privileged"), where
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), where
        assert "memory" in resources["limits"], where
        assert pod["automountServiceAccountToken"] is False, where
        assert not pod.get("hostNetwork"), where
        assert not pod.get("hostPID"), where
        # Only ephemeral volumes: the Pod Security "restricted" profile allows these.
        assert all(set(v) <= {"name", "emptyDir"} for v in pod.get("volumes", [])), where
        seen += 1
    assert seen == 6  # api: service + sidecar, worker: migrate + sidecar + worker, analysis


def test_the_image_user_is_the_one_the_pods_run_as(rendered: tuple[Manifest, ...]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert len(user) == 1
    for deployment in _find(rendered, "Deployment"):
        context = _pod_spec(deployment)["securityContext"]
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user[0]


def test_the_grace_period_outlasts_the_services_drain(rendered: tuple[Manifest, ...]) -> None:
    deployment = _one(rendered, "Deployment", "pulsecal-api")
    service = _container(deployment, "service")
    settings = load_settings(_environment(rendered, service), ServiceSettings)
    pre_stop = service["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    websocket_closes = 3.0  # service.app: devices get 3 s to answer the close frame
    aiohttp_shutdown = 2.0  # service.__main__: the AppRunner's own shutdown_timeout
    sidecar_final_save = 3.0 + 2.0  # sidecar.app: final checkpoint, then its AppRunner
    needed = (
        float(pre_stop[1])
        + websocket_closes
        + settings.shutdown_timeout
        + settings.write_timeout
        + aiohttp_shutdown
        + sidecar_final_save
    )
    assert _pod_spec(deployment)["terminationGracePeriodSeconds"] > needed


def test_devices_reach_the_ingestion_port_and_only_it(rendered: tuple[Manifest, ...]) -> None:
    api = _one(rendered, "Service", "pulsecal-api")
    assert [(p["port"], p["targetPort"]) for p in api["spec"]["ports"]] == [(3001, "http")]
    service = _container(_one(rendered, "Deployment", "pulsecal-api"), "service")
    assert [p["containerPort"] for p in service["ports"] if p["name"] == "http"] == [3001]
    for svc in _find(rendered, "Service"):
        ports = {p["port"] for p in svc["spec"]["ports"]} | {
            p["targetPort"] for p in svc["spec"]["ports"]
        }
        if 9464 in ports:
            assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics"
            assert svc["spec"]["clusterIP"] == "None"
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
            assert [p["port"] for p in svc["spec"]["ports"]] == [9464]


def test_only_prometheus_may_reach_the_metrics_port(rendered: tuple[Manifest, ...]) -> None:
    policies = _find(rendered, "NetworkPolicy")
    for deployment in (
        _one(rendered, "Deployment", "pulsecal-api"),
        _one(rendered, "Deployment", "pulsecal-worker"),
    ):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [
            p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert covering, deployment["metadata"]["name"]
        for policy in covering:
            assert "Ingress" in policy["spec"]["policyTypes"]
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports, "a rule without ports admits every port"
                if 9464 in ports:
                    assert ports == {9464}
                    [peer] = rule["from"]
                    assert peer["podSelector"]["matchLabels"] == {
                        "app.kubernetes.io/name": "prometheus"
                    }
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "monitoring"
                    }


def test_selectors_find_the_pods_and_ports_they_are_meant_for(
    rendered: tuple[Manifest, ...],
) -> None:
    templates = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in _find(rendered, "Deployment")
    }
    for deployment in _find(rendered, "Deployment"):
        assert _selects(
            deployment["spec"]["selector"]["matchLabels"],
            templates[deployment["metadata"]["name"]],
        )
    for svc in _find(rendered, "Service"):
        assert any(_selects(svc["spec"]["selector"], t) for t in templates.values())
    for pdb in _find(rendered, "PodDisruptionBudget"):
        assert any(_selects(pdb["spec"]["selector"]["matchLabels"], t) for t in templates.values())
    for policy in _find(rendered, "NetworkPolicy"):
        assert any(
            _selects(policy["spec"]["podSelector"]["matchLabels"], t) for t in templates.values()
        )
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                if "namespaceSelector" not in peer:  # peers in this namespace: ours
                    assert any(
                        _selects(peer["podSelector"]["matchLabels"], templates[name])
                        for name in ("pulsecal-api", "pulsecal-worker")
                    )
    for hpa in _find(rendered, "HorizontalPodAutoscaler"):
        target = _one(rendered, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        for metric in hpa["spec"]["metrics"]:
            _container(target, metric["containerResource"]["container"])
        assert hpa["spec"]["minReplicas"] <= target["spec"]["replicas"]


def test_the_servicemonitor_scrapes_the_sidecars_through_the_metrics_services() -> None:
    rendered = _render(MONITORING_TARGET)
    templates = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in _find(rendered, "Deployment")
    }
    [monitor] = _find(rendered, "ServiceMonitor")
    scraped = [
        s
        for s in _find(rendered, "Service")
        if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    # `job` is the Services' app.kubernetes.io/name: the jobs ops/alerts.yml selects.
    job_label = monitor["spec"]["jobLabel"]
    assert sorted(s["metadata"]["labels"][job_label] for s in scraped) == [
        "pulsecal-api",
        "pulsecal-worker",
    ]
    for svc in scraped:
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
        pods = [
            d
            for d in _find(rendered, "Deployment")
            if _selects(svc["spec"]["selector"], templates[d["metadata"]["name"]])
        ]
        assert [_program(_container(d, "sidecar")) for d in pods] == ["pulsecal-sidecar"]
        assert endpoint["path"] in _get_routes("pulsecal-sidecar")


def test_configuration_uses_the_names_and_values_the_programs_read(
    rendered: tuple[Manifest, ...],
) -> None:
    [config] = _find(rendered, "ConfigMap")
    known = SETTINGS_VARIABLES | EXTRA_VARIABLES
    assert set(config["data"]) <= known, set(config["data"]) - known
    for program in PROGRAMS:
        load_settings(config["data"], program)  # raises on a value a program would refuse
    for deployment, _, container in _all_containers(rendered):
        names = {var["name"] for var in container.get("env", [])}
        assert names <= known, (deployment["metadata"]["name"], names - known)
        environment = _environment(rendered, container)
        settings = load_settings(environment, PROGRAM_SETTINGS[_program(container)])
        if isinstance(settings, ServiceSettings | SidecarSettings):
            assert settings.environment == config["data"]["ENVIRONMENT"]
            assert settings.metrics_token is None or container["name"] == "sidecar"
        # The operator token goes only where /alerts is served.
        admin_token = load_settings(environment, ServiceSettings).admin_token
        assert admin_token is None or _program(container) == "pulsecal-service"


def test_the_operator_token_reaches_the_service_from_the_secret(
    rendered: tuple[Manifest, ...],
) -> None:
    service = _container(_one(rendered, "Deployment", "pulsecal-api"), "service")
    [reference] = [
        var["valueFrom"]["secretKeyRef"] for var in service["env"] if var["name"] == "ADMIN_TOKEN"
    ]
    assert (reference["name"], reference["key"]) == ("pulsecal-secrets", "ADMIN_TOKEN")
    settings = load_settings(_environment(rendered, service), ServiceSettings)
    assert settings.admin_token == SECRET_STAND_INS["ADMIN_TOKEN"]
    assert "/alerts" in _get_routes("pulsecal-service")


def test_secrets_come_from_the_secret_and_every_reference_resolves(
    rendered: tuple[Manifest, ...],
) -> None:
    secret_keys: set[str] = set()
    for _, _, container in _all_containers(rendered):
        for source in container.get("envFrom", []):
            assert "secretRef" not in source
            assert _find(rendered, "ConfigMap", source["configMapRef"]["name"])
        for var in container.get("env", []):
            if var["name"] in SECRET_STAND_INS:
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "pulsecal-secrets"
                secret_keys.add(ref["key"])
    [config] = _find(rendered, "ConfigMap")
    assert not set(SECRET_STAND_INS) & set(config["data"]), "a secret in the ConfigMap"
    for monitor in _find(rendered, "ServiceMonitor"):
        credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
        assert credentials["name"] == "pulsecal-secrets"
        assert credentials["key"] in secret_keys
    assert secret_keys == set(SECRET_STAND_INS)
    secrets = _find(rendered, "Secret", "pulsecal-secrets")
    if secrets:  # dev generates it; prod documents the command that creates it
        assert set(secrets[0]["data"]) == secret_keys
    else:
        for instructions in (K8S / "overlays" / "prod" / "kustomization.yaml", DEPLOY_DOC):
            for key in secret_keys:
                assert f"--from-literal={key}=" in instructions.read_text(), (instructions, key)


@pytest.mark.parametrize(
    ("target", "namespace", "image", "api_replicas"),
    [
        ("overlays/dev", "pulsecal-dev", "pulsecal:dev", 1),
        ("overlays/prod", "pulsecal", f"{PROD_IMAGE}:{UNRELEASED_TAG}", 3),
        (MONITORING_TARGET, "pulsecal", f"{PROD_IMAGE}:{UNRELEASED_TAG}", 3),
        (REDIS_CLUSTER_TARGET, "pulsecal", f"{PROD_IMAGE}:{UNRELEASED_TAG}", 3),
    ],
)
def test_overlays_set_namespace_image_and_size(
    target: str, namespace: str, image: str, api_replicas: int
) -> None:
    docs = _render(target)
    assert (
        _one(docs, "Namespace", namespace)["metadata"]["labels"][
            "pod-security.kubernetes.io/enforce"
        ]
        == "restricted"
    )
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    assert {c["image"] for _, _, c in _all_containers(docs)} == {image}
    assert _one(docs, "Deployment", "pulsecal-api")["spec"]["replicas"] == api_replicas
    assert _one(docs, "HorizontalPodAutoscaler", "pulsecal-api")["spec"]["minReplicas"] == (
        api_replicas
    )


def test_the_mutable_image_check_tells_builds_from_moving_tags() -> None:
    sha = "4915dbb" + "0" * 33
    for moving in ("pulsecal", "pulsecal:latest", f"{PROD_IMAGE}:0.1.0", "reg.example:5000/p"):
        assert _is_mutable(moving), moving
    for pinned in (f"{PROD_IMAGE}:{sha}", f"{PROD_IMAGE}@sha256:{'0f' * 32}"):
        assert not _is_mutable(pinned), pinned
    # The committed placeholder: the kubelet refuses it (InvalidImageName), nothing runs.
    assert not _VALID_TAG.match(UNRELEASED_TAG)
    assert not _is_mutable(f"{PROD_IMAGE}:{UNRELEASED_TAG}")


@pytest.mark.parametrize(
    "target", ["base", "overlays/prod", MONITORING_TARGET, REDIS_CLUSTER_TARGET]
)
def test_base_and_prod_never_run_a_moving_tag(target: str) -> None:
    docs = _render(target)
    assert not _mutable_images(docs)
    images = {c["image"] for _, _, c in _all_containers(docs)}
    assert all(image.endswith(f":{UNRELEASED_TAG}") for image in images), images
    assert {c["imagePullPolicy"] for _, _, c in _all_containers(docs)} == {"IfNotPresent"}


@pytest.mark.parametrize(
    "reference",
    [f"{PROD_IMAGE}:{'ab12' * 10}", f"{PROD_IMAGE}@sha256:{'0f' * 32}"],
    ids=["commit-sha", "digest"],
)
def test_the_release_step_pins_every_production_container(tmp_path: Path, reference: str) -> None:
    k8s = _k8s_copy(tmp_path)
    _set_image(k8s / "overlays" / "prod", reference)
    for target in ("overlays/prod", MONITORING_TARGET, REDIS_CLUSTER_TARGET):
        docs = _kustomize(k8s / target)
        assert {c["image"] for _, _, c in _all_containers(docs)} == {reference}, target
        assert not _mutable_images(docs)
    assert "kustomize edit set image pulsecal=" in DEPLOY_DOC.read_text()


@pytest.mark.parametrize("tag", ["latest", "0.1.0"])
def test_a_moving_tag_set_on_prod_is_caught(tmp_path: Path, tag: str) -> None:
    k8s = _k8s_copy(tmp_path)
    _set_image(k8s / "overlays" / "prod", f"{PROD_IMAGE}:{tag}")
    assert len(_mutable_images(_kustomize(k8s / "overlays" / "prod"))) == 6


def test_the_containers_run_the_packages_console_scripts(rendered: tuple[Manifest, ...]) -> None:
    scripts = set(re.findall(r"^\s+(pulsecal-[a-z]+) = ", (ROOT / "setup.cfg").read_text(), re.M))
    programs = {_program(c) for _, _, c in _all_containers(rendered)}
    assert programs - scripts <= PENDING_PROGRAMS, programs - scripts
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^CMD \["pulsecal-service"\]$', dockerfile, re.M)
    exposed = set(re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split())
    assert {str(PROGRAM_PORTS[p][1]) for p in programs & PROGRAM_PORTS.keys()} <= exposed


def test_the_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M)
        for source in line.split()[:-1]
    ]
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # everything is excluded, then the sources are let back in
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert set(sources) == kept
    packages = re.search(
        r"\[options\.packages\.find\]\ninclude =\n((?:\s+.+\n)+)", (ROOT / "setup.cfg").read_text()
    )
    assert packages
    top_level = {name.strip() for name in packages.group(1).split() if "." not in name}
    assert top_level <= kept


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "")


def _read_as(program: type[Any], environment: Mapping[str, str], variable: str) -> object | None:
    """What ``program`` reads from ``variable`` in ``environment``; None if it reads no such
    variable (yet)."""
    settings = load_settings(environment, program)
    for field in dataclasses.fields(settings):
        if field.metadata.get("env") == variable:
            value: object = getattr(settings, field.name)
            return value
    return None


def test_the_redis_cluster_overlay_is_prod_with_partitions_on_a_cluster() -> None:
    prod = _render("overlays/prod")
    docs = _render(REDIS_CLUSTER_TARGET)
    [prod_config] = _find(prod, "ConfigMap")
    [config] = _find(docs, "ConfigMap")
    # Prod's configuration, plus the cluster and the partitions; acks still wait for a replica.
    added = {k: v for k, v in config["data"].items() if prod_config["data"].get(k) != v}
    assert added == {"REDIS_CLUSTER": "true", "INGEST_PARTITIONS": "12"}
    assert config["data"]["ACK_MODE"] == "replicated"
    assert int(config["data"]["ACK_REPLICAS"]) >= 1
    assert 1 <= int(config["data"]["INGEST_PARTITIONS"]) <= 1024
    # Everything else is prod's: the same kinds and names, the same containers.
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap") == (
        sorted((d["kind"], d["metadata"]["name"]) for d in prod if d["kind"] != "ConfigMap")
    )
    # The service and the worker read the same partition count (one ConfigMap for both), and,
    # once their settings declare them, read the overlay's values.
    for deployment, container, program in (
        ("pulsecal-api", "service", ServiceSettings),
        ("pulsecal-worker", "worker", WorkerSettings),
    ):
        environment = _environment(
            docs, _container(_one(docs, "Deployment", deployment), container)
        )
        assert environment["INGEST_PARTITIONS"] == "12"
        assert environment["REDIS_CLUSTER"] == "true"
        assert environment["REDIS_URL"] == SECRET_STAND_INS["REDIS_URL"]
        assert _read_as(program, environment, "INGEST_PARTITIONS") in (None, 12)
        assert _read_as(program, environment, "REDIS_CLUSTER") in (None, True)
        assert _read_as(program, environment, "ACK_MODE") in (None, "replicated")


def test_the_redis_cluster_overlay_says_how_to_make_its_secret() -> None:
    instructions = (K8S / REDIS_CLUSTER_TARGET / "kustomization.yaml").read_text()
    for key in SECRET_STAND_INS:
        assert f"--from-literal={key}=" in instructions, key
    [url] = re.findall(r"--from-literal=REDIS_URL='([^']+)'", instructions)
    # A cluster has database 0 only: the configuration endpoint, no database number.
    assert re.fullmatch(r"rediss://:[^@]*@[a-z0-9.-]+:\d+", url), url
    assert "#running-on-a-managed-redis-cluster" in (ROOT / "docs" / "deploy.md").read_text()
