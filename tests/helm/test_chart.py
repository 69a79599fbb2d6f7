"""The Helm chart, offline: lint, render, every object against its schema, and the chart against the code.

  1. `helm lint --strict` and `helm template` with each values file in helm/llm-cluster/ci/ (minimal;
     1P1D on GPUs with the in-chart Redis and autoscaling; TP=2 pools from an init container; an
     external Redis; monitoring with a PodMonitor and another slo:);
  2. every built-in object passes `kubernetes-validate --strict` for two Kubernetes versions; every
     custom resource passes its CRD's OpenAPI schema (../shared/kuberay-crds, prometheus-operator-crds);
  3. the cluster YAML the chart renders loads with `cluster.config.load_cluster_config`, and every
     command line a container runs parses with `cluster.cli.build_parser`: the chart cannot drift from
     the code; the PrometheusRule is dashboards/rules.py's rules for the same slo:, the dashboards
     ConfigMap holds dashboards/grafana/ as it is;
  4. a bad value fails `helm template` with a message naming it.
"""
from __future__ import annotations

import json
import os

import jsonschema
import pytest
import yaml

from cluster.cli import build_parser
from cluster.config import SloConfig, load_cluster_config
from cluster.config.autoscale import AutoscaleConfig, PoolLimits
from cluster.config.cluster import ApiConfig, PoolConfig
from cluster.metrics import LATENCY_BUCKETS_S
from dashboards.rules import rule_groups
from dashboards.slo import SloText
from tests.helm.conftest import CHART, KUBERNETES_VERSIONS, ROOT, VALUES, by_kind, helm, render, values_of

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "kuberay-crds/ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "kuberay-crds/ray.io_rayjobs.yaml",
    ("ray.io/v1", "RayService"): "kuberay-crds/ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-crds/monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-crds/monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        "prometheus-operator-crds/monitoring.coreos.com_prometheusrules.yaml",
}
NAMES = [os.path.basename(v) for v in VALUES]
K8S_POOL_KEYS = {"minReplicas", "maxReplicas", "resources", "nodeSelector", "tolerations", "affinity"}
K8S_API_KEYS = {"serviceType", "apiKeysSecret", "resources", "preStopSleepSeconds", "terminationGracePeriodSeconds"}


def crd_schema(api_version: str, kind: str) -> dict:
    path = os.path.join(SHARED, CRD_FILES[(api_version, kind)])
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: the CRD schemas live in ../shared/ beside the checkout "
                    "(see ../shared/kuberay-crds/README.md)", pytrace=False)
    with open(path) as f:
        crd = yaml.safe_load(f)
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return served["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("values", VALUES, ids=NAMES)
def test_lint_strict(values):
    out = helm("lint", "--strict", CHART, "-f", values)
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_values_file_renders_what_it_asks_for(rendered):
    kinds = {name: sorted({o["kind"] for o in objects}) for name, objects in rendered.items()}
    assert kinds["minimal-values.yaml"] == ["ConfigMap", "PodDisruptionBudget", "RayCluster", "Service"]
    assert {"Deployment", "ServiceMonitor", "PrometheusRule"} <= set(kinds["1p1d-gpu-values.yaml"])
    assert "PodMonitor" in kinds["monitoring-values.yaml"] and "ServiceMonitor" not in kinds["monitoring-values.yaml"]
    (cluster,) = by_kind(rendered["tp2-values.yaml"], "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert groups["decode"]["replicas"] == 2
    worker = groups["prefill"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2  # tp 2 x 1 GPU a rank
    assert worker["initContainers"][0]["name"] == "fetch-model"
    (cluster,) = by_kind(rendered["minimal-values.yaml"], "RayCluster")
    assert "nvidia.com/gpu" not in json.dumps(cluster) and "gcsFaultToleranceOptions" not in cluster["spec"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_objects_pass_kubernetes_validate_strict(rendered, version):
    import kubernetes_validate

    checked = 0
    for name, objects in rendered.items():
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in CRD_FILES:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{name}: {obj['kind']} {obj['metadata']['name']}: {exc.message} "
                                     f"at {list(exc.path)}") from None
            checked += 1
    assert checked >= 20


def test_custom_resources_pass_their_crd_schema(rendered):
    seen = set()
    for name, objects in rendered.items():
        for obj in objects:
            key = (obj["apiVersion"], obj["kind"])
            if key not in CRD_FILES:
                assert "." not in obj["apiVersion"].split("/")[0] or obj["apiVersion"].startswith(
                    ("apps/", "policy/")), f"{name}: {key} has no schema here"
                continue
            errors = sorted(jsonschema.Draft7Validator(crd_schema(*key)).iter_errors(obj), key=str)
            assert not errors, f"{name}: {obj['kind']}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
            seen.add(obj["kind"])
    assert seen == {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_a_crd_schema_refuses_a_wrong_field(rendered):
    """The check above has teeth: a misspelt RayCluster field and a wrong type are refused."""
    (cluster,) = by_kind(rendered["minimal-values.yaml"], "RayCluster")
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["enableInTreeAutoscaling"] = "yes"
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    messages = [e.message for e in jsonschema.Draft7Validator(crd_schema("ray.io/v1", "RayCluster")).iter_errors(bad)]
    assert any("'yes' is not of type 'boolean'" in m for m in messages), messages


@pytest.mark.parametrize("values", VALUES, ids=NAMES)
def test_cluster_yaml_loads_with_the_package_config_loader(rendered, values, tmp_path):
    objects = rendered[os.path.basename(values)]
    (config_map,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config")]
    path = tmp_path / "cluster.yaml"
    path.write_text(config_map["data"]["cluster.yaml"])
    config = load_cluster_config(str(path))
    v = values_of(values)
    assert config.slo == SloConfig(**v["slo"])
    for pool in ("prefill", "decode"):
        got = getattr(config, pool)
        assert (got.instances, got.tp, got.pp, got.num_gpus_per_rank) == tuple(
            v[pool][k] for k in ("instances", "tp", "pp", "num_gpus_per_rank"))
        assert got.ray_resources == {f"llm_cluster_{pool}": 1}
    assert config.engine.model.path == v["model"]["path"]
    assert (config.api.host, config.api.port) == ("0.0.0.0", v["api"]["port"])
    assert config.disagg.link_host == "auto" and config.ray_address == "auto" and config.ray_join_timeout_s > 0
    assert config.detached_instances  # a crashed API container leaves its instances to the restarted one
    assert config.autoscale.enabled == v["autoscale"]["enabled"]
    redis = v["redis"]["url"] or ("redis://rel-llm-cluster-redis:6379/0" if v["redis"]["deploy"] else None)
    assert config.store.redis_url == redis
    (cluster,) = by_kind(objects, "RayCluster")
    gcs = cluster["spec"].get("gcsFaultToleranceOptions", {}).get("redisAddress")
    assert gcs == (redis.split("://")[1].rsplit("/", 1)[0] if redis else None)


@pytest.mark.parametrize("values", VALUES, ids=NAMES)
def test_container_commands_parse_with_the_package_cli(rendered, values):
    (cluster,) = by_kind(rendered[os.path.basename(values)], "RayCluster")
    (api,) = [c for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "api"]
    assert api["command"][0] == "llm-cluster"
    args = build_parser().parse_args(api["command"][1:])
    assert args.command == "up" and args.config == "/etc/llm-cluster/cluster.yaml"
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert mounts[args.config]["subPath"] == "cluster.yaml"
    assert mounts["/tmp/ray"]["name"] == "ray-tmp"  # the head's raylet, shared
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/health"
    assert api["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


@pytest.mark.parametrize("values", ["1p1d-gpu-values.yaml", "monitoring-values.yaml"])
def test_prometheus_rule_is_the_rules_code_for_the_same_slo(rendered, values):
    (rule,) = by_kind(rendered[values], "PrometheusRule")
    slo = SloConfig(**values_of(os.path.join(CHART, "ci", values))["slo"])
    assert rule["spec"] == rule_groups(SloText.of(slo))


def test_dashboards_config_map_holds_the_dashboards_folder(rendered):
    (board_map,) = [o for o in by_kind(rendered["monitoring-values.yaml"], "ConfigMap")
                    if o["metadata"]["name"].endswith("-dashboards")]
    assert board_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    folder = os.path.join(ROOT, "dashboards", "grafana")
    assert board_map["data"] == {name: open(os.path.join(folder, name)).read() for name in os.listdir(folder)}


BAD_VALUES = [  # --set ..., what the error must name
    ("slo.ttft_s=0.4", "/slo/ttft_s"),
    ("prefill.tpp=2", "'tpp' not allowed"),
    ("decode.tp=0", "/decode/tp"),
    ("monitoring.kind=Prometheus", "/monitoring/kind"),
    ("autoscale.mode=sometimes", "/autoscale/mode"),
    ("redis.url=http://redis:6379", "/redis/url"),
    ("api.port=70000", "/api/port"),
    ("prefill.instances=9", "prefill.instances=9 must be within prefill.minReplicas"),
    ("redis.deploy=true,redis.url=redis://r:6379/0", "redis.url and redis.deploy"),
    ("model.pvc.claimName=", "model.pvc.claimName"),
]


@pytest.mark.parametrize("setting, named", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_fails_naming_it(setting, named):
    out = helm("template", "rel", CHART, "--set", setting)
    assert out.returncode != 0 and named in out.stderr, out.stderr


def test_schema_agrees_with_the_code():
    """values.schema.json lists the latency buckets as SLO targets, and its keys other than the
    Kubernetes ones (left out of the cluster YAML by templates/_helpers.tpl) are the config's own
    fields: a renamed field fails here, not at a user's `helm install`."""
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)["properties"]
    assert schema["slo"]["properties"]["ttft_s"]["enum"] == list(LATENCY_BUCKETS_S)
    fields = lambda cls: set(cls.__dataclass_fields__)  # noqa: E731
    assert set(schema["slo"]["properties"]) == fields(SloConfig)
    assert set(schema["autoscale"]["properties"]) <= fields(AutoscaleConfig)
    assert set(schema["autoscale"]["properties"]["prefill"]["properties"]) == fields(PoolLimits)
    for pool in ("prefill", "decode"):
        assert set(schema[pool]["properties"]) - K8S_POOL_KEYS <= fields(PoolConfig)
    assert set(schema["api"]["properties"]) - K8S_API_KEYS <= fields(ApiConfig)
    defaults = render(None, "model.pvc.claimName=m")
    assert by_kind(defaults, "RayCluster")


def test_notes_say_how_to_reach_the_api():
    out = helm("install", "rel", CHART, "--dry-run=client", "--namespace", "serving")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "port-forward -n serving svc/rel-llm-cluster-api 8000:8000" in notes and "OpenAI(base_url=" in notes


def test_every_ray_node_has_the_environment_the_local_launcher_gives_its_raylet(rendered):
    """A scale-out on a worker Ray started ahead wants the same environment on a pod as the local Ray
    gets (cluster.runtime.launcher.RAYLET_ENV): the instance's module preloaded, one OpenMP thread."""
    from cluster.runtime.launcher import RAYLET_ENV

    (cluster,) = by_kind(rendered["1p1d-gpu-values.yaml"], "RayCluster")
    pods = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        ray_container = pod["spec"]["containers"][0]
        assert {e["name"]: e["value"] for e in ray_container["env"]} == RAYLET_ENV, ray_container["name"]
