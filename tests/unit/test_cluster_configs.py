"""The cluster launcher YAMLs and KubeRay manifests in cluster/: valid for the installed Ray, and shaped
the way the cluster README describes (GPU-less head, autoscaling GPU workers, a GPU driver node)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raypd.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
SCHEMA = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
IMAGE = f"rayproject/ray:{ray.__version__}-py311-cu128"
KUBE_IMAGE = "YOUR-REGISTRY/raypd:0.1.0-cu128"  # built from cluster/Dockerfile
STACK = CLUSTER / "requirements-gpu.txt"
DRIVER_RESOURCE = "raypd_driver"
# Spot / preemptible variants and the on-demand file they must otherwise equal.
VARIANTS = {"aws-spot.yaml": "aws.yaml", "gcp-preemptible.yaml": "gcp.yaml"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def node_type_bounds_errors(config: dict) -> list[str]:
    """Per node type min_workers <= max_workers <= the global max_workers, which Ray does not check."""
    errors = []
    for name, node in config["available_node_types"].items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", config["max_workers"])
        if lo > hi:
            errors.append(f"{name}: min_workers {lo} > max_workers {hi}")
        if hi > config["max_workers"]:
            errors.append(f"{name}: max_workers {hi} > the cluster's max_workers {config['max_workers']}")
    return errors


def ray_prepare_and_validate(config: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud: defaults, merges, validation."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpus(node_type: dict) -> int:
    return node_type["resources"].get("GPU", 0)


def test_the_expected_launcher_files_exist():
    assert {p.name for p in LAUNCHERS} >= {"aws.yaml", "aws-spot.yaml", "gcp.yaml", "gcp-preemptible.yaml"}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_matches_rays_schema(path):
    jsonschema.validate(load(path), SCHEMA)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_rays_own_preparation_and_validation(path):
    config = load(path)
    prepared = ray_prepare_and_validate(config)
    assert prepared["head_node_type"] == config["head_node_type"]
    # Our own settings survive the merge with the provider's defaults.
    assert prepared["docker"]["image"] == IMAGE
    assert prepared["setup_commands"] == config["setup_commands"]
    assert node_type_bounds_errors(prepared) == []


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_node_types(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert gpus(head) == 0 and "guestAccelerators" not in head["node_config"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    training = {name: t for name, t in workers.items() if gpus(t) == 8}
    assert training, "no 8-GPU worker type"
    assert all(t["min_workers"] == 0 for t in workers.values()), "every worker type starts at 0 nodes"
    assert any(t["max_workers"] > 0 for t in training.values()), "no 8-GPU type may scale up"
    drivers = [t for t in workers.values() if t["resources"].get(DRIVER_RESOURCE)]
    assert len(drivers) == 1 and gpus(drivers[0]) == 1 and drivers[0]["max_workers"] == 1
    if config["provider"]["type"] == "gcp":
        for t in workers.values():
            (acc,) = t["node_config"]["guestAccelerators"]
            assert acc["acceleratorCount"] == gpus(t)
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_the_stack_and_enables_token_auth(path):
    config = load(path)
    extra = "s3" if config["provider"]["type"] == "aws" else "gcs"
    # exactly the pinned stack, then raypd without letting pip pick other versions; no op is compiled
    assert config["setup_commands"] == ['pip install --no-cache-dir -r "$HOME/raypd-src/cluster/requirements-gpu.txt"',
                                        'pip install --no-cache-dir --no-deps "$HOME/raypd-src"']
    assert f"{'s3fs' if extra == 's3' else 'gcsfs'}==" in STACK.read_text()
    assert config["file_mounts"]["~/raypd-src"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in config[key])
    # Runs keep their files in a bucket: no node depends on a shared file system being mounted.
    assert not config["initialization_commands"]
    assert not any("/mnt/shared" in option for option in config["docker"]["run_options"])


EFA_CARDS = {"p4d.24xlarge": 4, "p5.48xlarge": 32}  # network cards, one EFA interface each


@pytest.mark.parametrize("path", [p for p in LAUNCHERS if load(p)["provider"]["type"] == "aws"], ids=lambda p: p.name)
def test_aws_training_nodes_get_efa_and_a_cluster_placement_group(path):
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    config = load(path)
    readme = (CLUSTER / "README.md").read_text()
    assert config["provider"]["use_internal_ips"] is True  # several interfaces: no public IP
    assert "-v /opt/amazon:/opt/amazon:ro" in config["docker"]["run_options"]
    assert any("/opt/amazon/ofi-nccl/lib" in c and "ray start" in c for c in config["worker_start_ray_commands"])
    subnets, groups = set(), set()
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        if gpus(t) != 8:
            subnets.update(node["SubnetIds"])
            groups.update(node["SecurityGroupIds"])
            continue
        cards = node["NetworkInterfaces"]
        assert len(cards) == EFA_CARDS[node["InstanceType"]], name
        assert [c["NetworkCardIndex"] for c in cards] == list(range(len(cards)))
        assert [c["DeviceIndex"] for c in cards] == [0] + [1] * (len(cards) - 1)
        assert all(c["InterfaceType"] == "efa" and c["DeleteOnTermination"] for c in cards)
        subnets.update(c["SubnetId"] for c in cards)
        groups.update(g for c in cards for g in c["Groups"])
        group = node["Placement"]["GroupName"]
        assert f"--group-name {group} --strategy cluster" in readme, group
        options = t["docker"]["worker_run_options"]
        assert {"--device=/dev/infiniband", "--env FI_PROVIDER=efa", "--env FI_EFA_USE_DEVICE_RDMA=1"} <= set(options)
    assert subnets == {"YOUR-SUBNET-ID"} and groups == {"YOUR-SECURITY-GROUP-ID"}, "one subnet, one security group"
    # Ray's own AWS bootstrap step for NetworkInterfaces (no cloud call) accepts them
    prepared = _configure_from_network_interfaces(prepare_config(copy.deepcopy(config)))
    for t in prepared["available_node_types"].values():
        assert set(t["node_config"]["SubnetIds"]) == {"YOUR-SUBNET-ID"}


@pytest.mark.parametrize("path", [p for p in LAUNCHERS if load(p)["provider"]["type"] == "gcp"], ids=lambda p: p.name)
def test_gcp_training_nodes_get_gvnic_and_compact_placement(path):
    config = load(path)
    readme = (CLUSTER / "README.md").read_text()
    region, project = config["provider"]["region"], config["provider"]["project_id"]
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        (nic,) = node["networkInterfaces"]  # every node type names its network: Ray fills in none of them
        assert nic["network"] == f"projects/{project}/global/networks/default", name
        assert nic["subnetwork"] == f"projects/{project}/regions/{region}/subnetworks/default", name
        if gpus(t) != 8:
            continue
        assert nic["nicType"] == "GVNIC"
        (policy,) = node["resourcePolicies"]
        prefix = f"projects/{project}/regions/{region}/resourcePolicies/"
        assert policy.startswith(prefix), name
        assert f"group-placement {policy[len(prefix):]} " in readme and f"--region={region}" in readme


@pytest.mark.parametrize("variant, base", VARIANTS.items())
def test_spot_variants_differ_only_in_the_training_nodes_market(variant, base):
    spot, on_demand = load(CLUSTER / variant), load(CLUSTER / base)
    assert spot["cluster_name"] != on_demand["cluster_name"]
    for name, t in spot["available_node_types"].items():
        other = copy.deepcopy(on_demand["available_node_types"][name])
        node = copy.deepcopy(t["node_config"])
        if gpus(t) == 8:
            if spot["provider"]["type"] == "aws":
                assert node.pop("InstanceMarketOptions")["MarketType"] == "spot"
            else:
                scheduling = node["scheduling"]
                assert scheduling.pop("provisioningModel") == "SPOT"
                assert scheduling.pop("instanceTerminationAction") == "DELETE"
                assert scheduling.pop("automaticRestart") is False
        assert node == other.pop("node_config"), name
        assert {k: v for k, v in t.items() if k != "node_config"} == other, name
    skip = ("cluster_name", "available_node_types")
    assert {k: v for k, v in spot.items() if k not in skip} == {k: v for k, v in on_demand.items() if k not in skip}


# ---- Ray's validation catches what it should (and our check covers what it does not) -------------


def test_ray_rejects_an_unknown_head_node_type():
    config = load(CLUSTER / "aws.yaml")
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_prepare_and_validate(config)


def test_ray_rejects_more_min_workers_than_the_cluster_max():
    config = load(CLUSTER / "gcp.yaml")
    config["available_node_types"]["gpu_a100x8"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        ray_prepare_and_validate(config)


def test_ray_rejects_a_misspelled_node_type_key():
    config = load(CLUSTER / "aws.yaml")
    config["available_node_types"]["gpu_a100x8"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        ray_prepare_and_validate(config)


def test_per_type_min_above_max_needs_our_own_check():
    config = load(CLUSTER / "aws.yaml")
    config["available_node_types"]["gpu_a100x8"].update(min_workers=3, max_workers=2)
    ray_prepare_and_validate(config)  # Ray only compares the sum of min_workers with the global max
    assert node_type_bounds_errors(config) == ["gpu_a100x8: min_workers 3 > max_workers 2"]


# ---- KubeRay ----------------------------------------------------------------------------------------


def cluster_spec_problems(spec: dict) -> list[str]:
    """What the manifests' Ray cluster must have: autoscaling, a GPU-less head, GPU workers from 0."""
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')} is not the installed {ray.__version__}")
    containers = lambda group: group["template"]["spec"]["containers"]  # noqa: E731
    for c in containers(spec["headGroupSpec"]):
        for section in ("limits", "requests"):
            if "nvidia.com/gpu" in c.get("resources", {}).get(section, {}):
                problems.append(f"the head asks for GPUs ({section})")
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        limits = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers(group)]
        if group["minReplicas"] != 0 or not group["minReplicas"] < group["maxReplicas"]:
            problems.append(f"{group['groupName']}: replicas must autoscale from 0 up")
        if sum(limits):
            gpu_groups.append((group, sum(limits)))
    if not any(n == 8 for _, n in gpu_groups):
        problems.append("no worker group with 8 GPUs per pod")
    if not any(DRIVER_RESOURCE in g["rayStartParams"].get("resources", "") and n == 1 for g, n in gpu_groups):
        problems.append("no 1-GPU driver group offering the raypd_driver resource")
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in containers(group):
            if c["image"] != KUBE_IMAGE:
                problems.append(f"image {c['image']} is not {KUBE_IMAGE}")
            if "/mnt/shared" in [m["mountPath"] for m in c.get("volumeMounts", [])]:
                problems.append(f"{c['name']} mounts a shared file system (runs keep their files in a bucket)")
    return problems


def test_raycluster_manifest():
    doc = load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert cluster_spec_problems(doc["spec"]) == []


def test_the_kuberay_check_catches_a_gpu_head_and_a_fixed_size_group():
    spec = copy.deepcopy(load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"])
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    spec["workerGroupSpecs"][-1]["minReplicas"] = 4
    problems = cluster_spec_problems(spec)
    assert "the head asks for GPUs (limits)" in problems
    assert any("autoscale from 0" in p for p in problems)


def test_rayjob_manifest_runs_the_pipeline_on_a_valid_config():
    doc = load(CLUSTER / "kuberay" / "rayjob.yaml")
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True
    assert cluster_spec_problems(spec["rayClusterSpec"]) == []

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "raypd.distill"]
    config = argv[argv.index("--config") + 1]
    assert config.startswith("/home/ray/raypd-src/")  # the image's copy of the repository (cluster/Dockerfile)
    config = config.removeprefix("/home/ray/raypd-src/")
    assert (ROOT / config).is_file() and "COPY --chown=ray:users . /home/ray/raypd-src" in (CLUSTER / "Dockerfile").read_text()
    overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
    cfg = load_config(ROOT / config, overrides)  # the job's settings are valid as submitted
    assert cfg.data.shards.startswith("s3://") and "{" in cfg.data.shards
    storage = argv[argv.index("--storage") + 1]
    assert load_config(ROOT / config, [*overrides, f"run.storage_path={storage}"]).run.storage_path.startswith("s3://")

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "pip" not in runtime_env and "uv" not in runtime_env  # the image has the pinned stack and raypd
    # The driver lands on the driver group; every group starts at zero pods, and the training GPUs the
    # config needs fit under the groups' maxima (the job asks the autoscaler for them)
    assert json.loads(spec["entrypointResources"]) == {DRIVER_RESOURCE: 1} and spec["entrypointNumGpus"] == 1
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["replicas"] == 0 for g in groups)
    most_gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                           .get("nvidia.com/gpu", 0))
                    for g in groups if DRIVER_RESOURCE not in g["rayStartParams"].get("resources", ""))
    assert most_gpus >= cfg.dist.workers


def test_readme_names_only_existing_files():
    text = (CLUSTER / "README.md").read_text()
    for word in text.replace("`", " ").replace("(", " ").replace(")", " ").split():
        if word.startswith(("configs/", "cluster/")) and word.endswith((".yaml", ".md")):
            assert (ROOT / word).is_file(), word


def test_readme_runtime_env_pip_list_covers_the_dependencies():
    """The README's pip list for clusters without the stack: every dependency of raypd but Ray itself."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    (raw,) = re.findall(r"--runtime-env-json '(\{.*?\})'", (CLUSTER / "README.md").read_text())
    listed = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in json.loads(raw)["pip"]}
    needed = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in
              tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert needed - {"ray"} <= listed


def _pins() -> dict[str, str]:
    pins = {}
    for line in STACK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            pins[re.split(r"\[", name)[0].lower()] = version
    return pins


def test_the_gpu_stack_is_pinned_once_and_everything_agrees_on_it():
    """cluster/requirements-gpu.txt pins every dependency of raypd within pyproject.toml's ranges; the Dockerfile,
    the launcher files and the manifests run that stack on Ray's CUDA 12.8 image, whose Ray is the pinned one."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        assert dep.name.lower() in pins, f"{dep.name} is not pinned in {STACK.name}"
        assert dep.specifier.contains(pins[dep.name.lower()], prereleases=True), (dep, pins[dep.name.lower()])
    cuda = "cu128"
    assert pins["torch"].endswith(f"+{cuda}") and pins["torchvision"].endswith(f"+{cuda}")
    assert f"--extra-index-url https://download.pytorch.org/whl/{cuda}" in STACK.read_text()
    assert pins["ray"] == ray.__version__  # the Ray the tests validate the files against
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, flags=re.M) == [IMAGE]
    assert "pip install --no-cache-dir -r /tmp/requirements-gpu.txt" in dockerfile and "--no-deps" in dockerfile
    assert "DS_BUILD" not in dockerfile
    for path in LAUNCHERS:
        assert load(path)["docker"]["image"] == IMAGE, path.name
    assert KUBE_IMAGE.endswith(f"{project['version']}-{cuda}") and f"-t {KUBE_IMAGE}" in dockerfile
