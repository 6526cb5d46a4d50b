"""deploy/kubernetes, validated offline: the Kustomize list is rendered (by reading
kustomization.yaml; where kubectl is installed its own ``kubectl kustomize`` must agree), every
object is valid against the Kubernetes schemas of the ``kubernetes-validate`` package (strict:
an unknown field fails), the RayCluster against the vendored KubeRay CRD's openAPIV3Schema
(unknown fields fail too, as the API server's strict field validation would), its pod templates
against Kubernetes' PodTemplate, and the deployment says what docs/DEPLOY.md says: a 0-CPU
head, CPU and GPU worker groups, GCS fault tolerance through Redis, the autoscaler on, the API
ready on /readyz and alive on /healthz, a migration Job, Secret templates without values,
least-privilege secrets, NetworkPolicies that select real pods, resources and a non-root
securityContext on every container. The negative tests break a manifest and see it refused."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.test_docker_compose import CONSTRAINTS, resolve_cli

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZE_DIR = REPO / "deploy" / "kubernetes"
CRD_FILE = KUSTOMIZE_DIR / "schemas" / "ray.io_rayclusters.yaml"
# The Kubernetes versions validated against: the oldest KubeRay 1.7 supports that we claim,
# and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version() + ".0")
CLUSTER_SCOPED = {"Namespace"}
PLACEHOLDER = "REPLACE_ME"
WORKLOADS = ("Deployment", "Job")


# ------------------------------------------------------------------ rendering

def render(directory: Path = KUSTOMIZE_DIR) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` makes of ``directory``, for the features used here:
    ``resources`` (files, in order) and ``namespace`` (set on every namespaced object)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "namespace", "resources"}
    assert not unsupported, f"render() does not implement {sorted(unsupported)}"
    objects = []
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((directory / resource).read_text()):
            if document is None:
                continue
            if kustomization.get("namespace") and document["kind"] not in CLUSTER_SCOPED:
                document.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
            objects.append(document)
    return objects


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render()


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, pod template)`` of every workload and every RayCluster group."""
    for o in objects:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in WORKLOADS:
            yield name, o["spec"]["template"]
        elif o["kind"] == "RayCluster":
            yield f"{name} head", o["spec"]["headGroupSpec"]["template"]
            for group in o["spec"]["workerGroupSpecs"]:
                yield f"{name} {group['groupName']}", group["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def environment(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# ------------------------------------------------------------------ validation

@functools.cache
def crd_schema() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 0.9 MB of YAML
    crd = yaml.load(CRD_FILE.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
    version, = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the API server would prune them
    (an object with ``properties`` and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields``); ``metadata`` is ObjectMeta's to check."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def problems(objects: list[dict[str, Any]], schema: dict[str, Any] | None = None) -> list[str]:
    """Every schema violation in ``objects``, one line each (empty: all valid)."""
    schema = schema or crd_schema()
    found = []
    for o in objects:
        name = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        if o.get("kind") == "RayCluster":
            validator = jsonschema.Draft7Validator(schema)
            found += [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in validator.iter_errors(o)]
            templates = [o.get("spec", {}).get("headGroupSpec", {}).get("template", {})]
            templates += [g.get("template", {}) for g in o.get("spec", {}).get("workerGroupSpecs", [])]
            checked = [{"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{o['metadata']['name']}-{i}"}, "template": t}
                       for i, t in enumerate(templates)]
        else:
            checked = [o]
        for item in checked:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(item, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    found.append(f"{name} (Kubernetes {version}): {error.message}")
                except kubernetes_validate.SchemaNotFoundError as error:
                    found.append(f"{name}: no schema: {error}")
    return found


def test_kustomization_renders_every_file_once():
    kustomization = yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUSTOMIZE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, (listed ^ on_disk)
    assert len(kustomization["resources"]) == len(listed)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_render_agrees_with_kubectl_kustomize(objects):
    result = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE_DIR)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = [o for o in yaml.safe_load_all(result.stdout) if o]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731 (kustomize sorts)
    assert sorted(theirs, key=key) == sorted(objects, key=key)


def test_every_object_is_valid(objects):
    assert problems(objects) == []


def test_names_are_unique(objects):
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))


# ------------------------------------------------------------------ negative tests

def _broken(objects: list[dict[str, Any]], kind: str, edit) -> list[dict[str, Any]]:  # noqa: ANN001
    """The first object of ``kind``, valid (checked) and then edited by ``edit``."""
    broken = copy.deepcopy(next(o for o in objects if o["kind"] == kind))
    assert problems([broken]) == []
    edit(broken)
    return [broken]


def test_an_unknown_field_in_a_deployment_is_refused(objects):
    def edit(o: dict[str, Any]) -> None:
        o["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    assert any("readinesProbe" in line for line in problems(_broken(objects, "Deployment", edit)))


def test_a_wrong_type_in_a_job_is_refused(objects):
    def edit(o: dict[str, Any]) -> None:
        o["spec"]["backoffLimit"] = "three"
    assert any("Job/" in line for line in problems(_broken(objects, "Job", edit)))


def test_a_misspelt_raycluster_field_is_refused(objects):
    def edit(o: dict[str, Any]) -> None:
        o["spec"]["enableInTreeAutoscalling"] = o["spec"].pop("enableInTreeAutoscaling")
    found = problems(_broken(objects, "RayCluster", edit))
    assert any("enableInTreeAutoscalling" in line for line in found), found


def test_a_raycluster_worker_group_without_its_bounds_is_refused(objects):
    def edit(o: dict[str, Any]) -> None:
        del o["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    found = problems(_broken(objects, "RayCluster", edit))
    assert any("maxReplicas" in line for line in found), found


def test_a_bad_raycluster_pod_template_is_refused(objects):
    def edit(o: dict[str, Any]) -> None:
        o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = {
            "limits": {"cpu": "two"}}
    assert problems(_broken(objects, "RayCluster", edit))


def test_a_gcs_backend_outside_the_enum_is_refused(objects):
    def edit(o: dict[str, Any]) -> None:
        o["spec"]["gcsFaultToleranceOptions"]["backend"] = "etcd"
    assert any("etcd" in line for line in problems(_broken(objects, "RayCluster", edit)))


# ------------------------------------------------------------------ what the deployment says

def test_the_ray_cluster_head_takes_no_work_and_the_autoscaler_is_on(objects):
    cluster, = by_kind(objects, "RayCluster").values()
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert (head.get("num-cpus"), head.get("num-gpus"), head.get("memory")) == ("0", "0", "0")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == next(line.split("==")[1] for line in
                                      CONSTRAINTS.read_text().splitlines()
                                      if line.startswith("ray=="))
    assert spec["upgradeStrategy"]["type"] == "Recreate"  # one metaserve version per cluster
    assert spec["authOptions"]["mode"] == "token"
    token = by_kind(objects, "Secret")[spec["authOptions"]["secretName"]]
    assert "auth_token" in token["stringData"]


def test_cpu_and_gpu_worker_groups_scale(objects):
    cluster, = by_kind(objects, "RayCluster").values()
    gpus = {}
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], group["groupName"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus[group["groupName"]] = int(limits.get("nvidia.com/gpu", 0))
    assert 0 in gpus.values() and any(gpus.values()), gpus


def test_gcs_fault_tolerance_uses_the_redis_service(objects):
    cluster, = by_kind(objects, "RayCluster").values()
    options = cluster["spec"]["gcsFaultToleranceOptions"]
    host, port = options["redisAddress"].rsplit(":", 1)
    service = by_kind(objects, "Service")[host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    redis, = [d for d in by_kind(objects, "Deployment").values()
              if _selects(service["spec"]["selector"], d["spec"]["template"])]
    secret = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    server_env = environment(redis["spec"]["template"]["spec"]["containers"][0])
    assert server_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert "$(REDIS_PASSWORD)" in redis["spec"]["template"]["spec"]["containers"][0]["args"]


def _selects(selector: dict[str, str], template: dict[str, Any]) -> bool:
    labels = template.get("metadata", {}).get("labels", {})
    return all(labels.get(key) == value for key, value in selector.items())


def test_deployments_select_their_own_pods(objects):
    for name, deployment in by_kind(objects, "Deployment").items():
        assert _selects(deployment["spec"]["selector"]["matchLabels"],
                        deployment["spec"]["template"]), name


def test_the_api_is_probed_on_readyz_and_healthz_and_served(objects):
    api = by_kind(objects, "Deployment")["metaserve-api"]
    container, = api["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == 8000
    assert environment(container)["METASERVE_HOST"]["value"] == "0.0.0.0"
    service = by_kind(objects, "Service")["metaserve-api"]
    assert _selects(service["spec"]["selector"], api["spec"]["template"])
    assert service["spec"]["ports"][0]["targetPort"] in ports


def test_every_metaserve_command_exists_in_the_cli(objects):
    commands = {}
    for where, template in pod_specs(objects):
        for container in containers(template):
            command = container.get("command", [])
            if command[:1] == ["metaserve"]:
                commands[where] = resolve_cli(command[1:])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                check = container.get(probe, {}).get("exec", {}).get("command", [])
                if check[:1] == ["metaserve"]:
                    assert resolve_cli(check[1:]) == ["dispatcher"], (where, check)
    assert commands == {"Job/metaserve-migrate": ["db", "upgrade"],
                        "Deployment/metaserve-api": ["serve"],
                        "Deployment/metaserve-dispatcher": ["dispatcher"]}
    api = by_kind(objects, "Deployment")["metaserve-api"]
    assert "--no-dispatcher" in api["spec"]["template"]["spec"]["containers"][0]["command"]


def test_draining_processes_finish_before_the_kubelet_kills_them(objects):
    for name in ("metaserve-api", "metaserve-dispatcher"):
        deployment = by_kind(objects, "Deployment")[name]
        spec = deployment["spec"]["template"]["spec"]
        drain = float(environment(spec["containers"][0])["METASERVE_DRAIN_GRACE_S"]["value"])
        assert spec["terminationGracePeriodSeconds"] >= drain + 10, name


def test_the_autoscaling_setting_matches_the_ray_cluster(objects):
    from metaserve.service.settings import Settings

    cluster, = by_kind(objects, "RayCluster").values()
    config = by_kind(objects, "ConfigMap")["metaserve"]["data"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert Settings(cluster_autoscaling=config["METASERVE_CLUSTER_AUTOSCALING"]).cluster_autoscaling


def test_the_dispatcher_reaches_the_kuberay_head_service(objects):
    dispatcher = by_kind(objects, "Deployment")["metaserve-dispatcher"]
    env = environment(dispatcher["spec"]["template"]["spec"]["containers"][0])
    cluster, = by_kind(objects, "RayCluster").values()
    # KubeRay names the head's Service <cluster>-head-svc (GenerateHeadServiceName)
    assert env["METASERVE_RAY_ADDRESS"]["value"] == f"{cluster['metadata']['name']}-head-svc:6379"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def test_secrets_are_templates_and_every_reference_resolves(objects):
    secrets = by_kind(objects, "Secret")
    for name, secret in secrets.items():
        assert "data" not in secret, name
        assert secret["stringData"] and set(secret["stringData"].values()) == {PLACEHOLDER}, name
    config_maps = by_kind(objects, "ConfigMap")
    for where, template in pod_specs(objects):
        for container in containers(template):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (where, ref)
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, where


# Which Secrets each workload may read (docs/DEPLOY.md): the API never holds the Ray token,
# the Ray nodes no database or S3 credential (KubeRay adds the token from authOptions).
SECRETS_OF = {
    "Deployment/metaserve-api": {"metaserve-database", "metaserve-s3"},
    "Deployment/metaserve-dispatcher": {"metaserve-database", "metaserve-s3",
                                        "metaserve-ray-token"},
    "Job/metaserve-migrate": {"metaserve-database"},
    "Deployment/metaserve-redis": {"metaserve-redis"},
    "RayCluster/metaserve-ray head": set(),
    "RayCluster/metaserve-ray cpu": set(),
    "RayCluster/metaserve-ray gpu": set(),
}


def test_each_workload_reads_only_the_secrets_it_uses(objects):
    seen = {}
    for where, template in pod_specs(objects):
        names = set()
        for container in containers(template):
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})}
            names |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
        names |= {v["secret"]["secretName"] for v in template["spec"].get("volumes", [])
                  if "secret" in v}
        seen[where] = names
    assert seen == SECRETS_OF


def test_every_container_has_resources(objects):
    for where, template in pod_specs(objects):
        for container in containers(template):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources.get(kind, {}).keys(), (where, kind)
    cluster, = by_kind(objects, "RayCluster").values()
    autoscaler = cluster["spec"]["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= autoscaler["limits"].keys()


def test_every_pod_runs_unprivileged(objects):
    for where, template in pod_specs(objects):
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, where
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in containers(template):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("privileged"), where
    cluster, = by_kind(objects, "RayCluster").values()
    autoscaler = cluster["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["allowPrivilegeEscalation"] is False


def test_images_are_pinned_and_metaserve_runs_one_build(objects):
    metaserve_images = set()
    for where, template in pod_specs(objects):
        for container in containers(template):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, (where, image)
            if name.endswith("/metaserve"):
                metaserve_images.add(tag)
    assert metaserve_images == {"0.1.0", "0.1.0-cuda"}, metaserve_images


def test_network_policies_select_real_pods_and_fence_ray_redis_and_the_database(objects):
    policies = by_kind(objects, "NetworkPolicy")
    templates = dict(pod_specs(objects))
    # default deny for every pod of the namespace
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies.values())

    def pods(selector: dict[str, Any]) -> set[str]:
        return {w for w, t in templates.items() if _selects(selector.get("matchLabels", {}), t)}

    for name, policy in policies.items():
        if policy["spec"]["podSelector"] and name != "metaserve-postgresql":
            assert pods(policy["spec"]["podSelector"]), f"{name} selects no pod"
    api_pods = pods({"matchLabels": {"app.kubernetes.io/name": "metaserve-api"}})
    ray = policies["metaserve-ray"]
    assert pods(ray["spec"]["podSelector"]) == {w for w in templates if "RayCluster" in w} | {
        "Deployment/metaserve-dispatcher"}
    ray_clients = set().union(*(pods(rule["podSelector"]) for rule in ray["spec"]["ingress"][0]["from"]))
    assert not ray_clients & api_pods, "the API reaches Ray"
    redis_clients = pods(policies["metaserve-redis"]["spec"]["ingress"][0]["from"][0]["podSelector"])
    assert not redis_clients & (api_pods | {"Deployment/metaserve-dispatcher"})
    database_clients = pods(
        policies["metaserve-postgresql"]["spec"]["ingress"][0]["from"][0]["podSelector"])
    holders = {w for w, names in SECRETS_OF.items() if "metaserve-database" in names}
    assert database_clients == holders
    assert policies["metaserve-api"]["spec"]["ingress"][0]["ports"][0]["port"] == 8000


def test_the_redis_policy_matches_the_labels_kuberay_puts_on_its_pods(objects):
    """KubeRay labels every pod of a RayCluster ray.io/cluster=<name> (utils.RayClusterLabelKey);
    the template labels here do not carry it, so check the policy names that label exactly."""
    cluster, = by_kind(objects, "RayCluster").values()
    selector = by_kind(objects, "NetworkPolicy")["metaserve-redis"]["spec"]["ingress"][0]["from"][0]
    assert selector["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
