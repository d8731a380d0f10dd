"""cluster.yaml (AWS) and cluster-local.yaml (machines of your own) are configs `ray up`
accepts (Ray's own validation, offline), they keep the promises the launcher and the README
rely on, and what they share they say the same way."""
import copy
import json
import subprocess
import sys

import pytest
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from common.cluster_check import constraints_text, file_problems
from launch import LEARNER_HOST
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def local_cluster():
    return yaml.safe_load((ROOT / "cluster-local.yaml").read_text())


def test_ray_validates_cluster_yaml(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_ray_validates_cluster_local_yaml(local_cluster):
    validate_config(prepare_config(copy.deepcopy(local_cluster)))


def test_validation_would_catch_a_broken_config(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["head"]["node_confg"] = {}  # a typo ray up would refuse
    with pytest.raises(Exception, match="node_confg"):
        validate_config(prepare_config(broken))


def test_head_hosts_learner_and_replay_and_workers_scale_for_actors(cluster):
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]
    assert head["resources"] == {LEARNER_HOST: 1}
    assert "g5" in head["node_config"]["InstanceType"]  # a GPU instance for the learner
    workers = [n for name, n in nodes.items() if name != cluster["head_node_type"]]
    assert workers and all(LEARNER_HOST not in w["resources"] for w in workers)
    assert all(w["max_workers"] > w["min_workers"] for w in workers)  # autoscaling


def test_nodes_install_this_project_and_start_ray_securely(cluster):
    assert cluster["file_mounts"]["~/ray-apex-dqn"] == "."
    assert any("pip install" in c and "ray-apex-dqn" in c for c in cluster["setup_commands"])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "gpu" in extras and any("[gpu]" in c for c in cluster["head_setup_commands"])
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])


def test_the_cluster_is_locked_down_by_default(cluster):
    """SSH from one address the user sets (a placeholder AWS refuses until then, never
    0.0.0.0/0), least-privilege instance profiles, the token file private, images pinned to an
    exact Ray version."""
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    cidrs = [ip["CidrIp"] for r in rules for ip in r["IpRanges"]]
    assert cidrs == ["SET-YOUR-IP/32"] and "0.0.0.0/0" not in str(cluster)
    nodes = cluster["available_node_types"]
    profiles = {name: node["node_config"]["IamInstanceProfile"]["Name"]
                for name, node in nodes.items()}
    assert profiles == {"head": "ray-apex-dqn-head", "cpu_actor": "ray-apex-dqn-worker"}
    assert cluster["setup_commands"][0] == "chmod 600 ~/.ray/auth_token"
    docker = cluster["docker"]
    assert all(":2.60.0-py311-" in docker[key] for key in ("image", "worker_image"))


def shared_text(name: str) -> list[str]:
    """The lines of a cluster file from its file mounts to its last setup command, comments
    included."""
    lines = (ROOT / name).read_text().splitlines()
    start = lines.index("# The project itself and the auth token, on every node. Of the "
                        "checkout, the nodes get the code,")
    end = next(index for index, line in enumerate(lines) if line.startswith("  - grep -q "
                                                                            "RAY_AUTH_MODE"))
    return lines[start:end + 1]


def test_the_on_premise_file_says_what_it_shares_with_the_cloud_one_the_same_way(
        cluster, local_cluster):
    """The same text for what reaches the nodes and how they install it; the same start
    commands but for what Ray's local provider needs: the head's resource given to `ray start`
    (it takes no node types) and the first autoscaler (v2 starts one listed worker only)."""
    assert shared_text("cluster-local.yaml") == shared_text("cluster.yaml")
    for key in ("file_mounts", "rsync_exclude", "rsync_filter", "setup_commands",
                "worker_setup_commands", "worker_start_ray_commands"):
        assert local_cluster[key] == cluster[key], key
    local_head, cloud_head = (local_cluster["head_start_ray_commands"],
                              cluster["head_start_ray_commands"])
    assert local_head[:-1] == cloud_head[:-1]
    assert local_head[-1] == cloud_head[-1].replace(
        "RAY_AUTH_MODE=token ray start", "RAY_AUTH_MODE=token RAY_enable_autoscaler_v2=0 ray start"
    ) + f" --resources='{json.dumps({LEARNER_HOST: 1})}'"
    assert "--dashboard-host=127.0.0.1" in local_head[-1]
    assert "available_node_types" not in local_cluster
    # A GPU head installs what cluster.yaml's does: said in a comment, not done by default.
    assert local_cluster["head_setup_commands"] == []
    assert f"\n#   - {cluster['head_setup_commands'][0]}\nhead_setup_commands: []\n" in (
        ROOT / "cluster-local.yaml").read_text()


# --- `python -m common.cluster_check`: what Ray's validation lets through, refused before `ray up`

NO_NETWORK_CHECK = """
import runpy, sys
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        raise RuntimeError(f"the check reached for the network: {event} {args}")
sys.addaudithook(refuse)
sys.argv[0] = "cluster_check"
runpy.run_module("common.cluster_check", run_name="__main__")
"""
DIGEST = "@sha256:" + "0123456789abcdef" * 4


def run_check(*args) -> subprocess.CompletedProcess:
    """`python -m common.cluster_check ARGS` as a user runs it, any attempt to reach the
    network (a connection, a name lookup) refused."""
    return subprocess.run([sys.executable, "-c", NO_NETWORK_CHECK, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def filled(cluster):
    """cluster.yaml with its placeholders set as a user sets them."""
    config = copy.deepcopy(cluster)
    config["provider"]["security_group"]["IpPermissions"][0]["IpRanges"][0]["CidrIp"] = \
        "203.0.113.7/32"
    for key in ("image", "worker_image"):
        config["docker"][key] = config["docker"][key].split("@")[0] + DIGEST
    return config


def problems_of(config, tmp_path) -> list[str]:
    """The check's lines for `config` saved as tmp_path/cluster.yaml (its "." mounts tmp_path)."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return file_problems(path)


def test_the_check_refuses_the_shipped_file_only_for_its_placeholders_without_network():
    result = run_check("cluster.yaml")
    assert result.returncode == 2 and result.stdout == ""
    gpu, cpu = "rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py311-cpu"
    assert result.stderr.splitlines() == [
        "cluster.yaml: provider.security_group.IpPermissions[0].IpRanges[0].CidrIp = "
        "SET-YOUR-IP/32 still holds the placeholder SET-YOUR-IP: set it to your public "
        "address/32 (curl https://checkip.amazonaws.com)",
        f"cluster.yaml: docker.image = {gpu}@sha256:SET-IMAGE-DIGEST still holds the "
        f"placeholder SET-IMAGE-DIGEST: set it to the digest of {gpu} (docker buildx imagetools "
        f"inspect {gpu}: its Digest: line)",
        f"cluster.yaml: docker.worker_image = {cpu}@sha256:SET-IMAGE-DIGEST still holds the "
        f"placeholder SET-IMAGE-DIGEST: set it to the digest of {cpu} (docker buildx "
        f"imagetools inspect {cpu}: its Digest: line)"]


def test_the_check_passes_a_copy_with_the_placeholders_set(filled, tmp_path):
    problems_of(filled, tmp_path)  # written there
    result = run_check(tmp_path / "cluster.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"{tmp_path / 'cluster.yaml'}: ok\n", "")


def drop(config, *keys):
    *path, last = keys
    node = config
    for key in path:
        node = node[key]
    del node[last]


def set_to(value):
    def change(config, *keys):
        *path, last = keys
        node = config
        for key in path:
            node = node[key]
        node[last] = value
    return change


HEAD = ("available_node_types", "head", "node_config")
WORKER = ("available_node_types", "cpu_actor", "node_config")
SSH_CIDR = ("provider", "security_group", "IpPermissions", 0, "IpRanges", 0, "CidrIp")


@pytest.mark.parametrize("change, keys, named", [
    (drop, (*HEAD, "MetadataOptions"),
     "available_node_types.head.node_config.MetadataOptions.HttpTokens is not required"),
    (set_to({"HttpTokens": "optional"}), (*WORKER, "MetadataOptions"),
     "available_node_types.cpu_actor.node_config.MetadataOptions.HttpTokens is not required"),
    (set_to(False), (*HEAD, "BlockDeviceMappings", 0, "Ebs", "Encrypted"),
     "available_node_types.head.node_config.BlockDeviceMappings[0].Ebs.Encrypted is not true"),
    (drop, (*WORKER, "BlockDeviceMappings"),
     "available_node_types.cpu_actor.node_config.BlockDeviceMappings is not set: the root "
     "volume would be the AMI's default, unencrypted"),
    (set_to("rayproject/ray:2.60.0-py311-gpu"), ("docker", "image"),
     "docker.image = rayproject/ray:2.60.0-py311-gpu is not pinned by digest"),
    (drop, (*WORKER, "ImageId"),
     "available_node_types.cpu_actor.node_config.ImageId is not an AMI ID"),
    (set_to("pip install -q -e ~/ray-apex-dqn"), ("setup_commands", 1),
     "setup_commands[1] = `pip install -q -e ~/ray-apex-dqn` installs without the constraints"),
    (set_to('pip install -e "$HOME/ray-apex-dqn[gpu]"'), ("head_setup_commands", 0),
     "head_setup_commands[0] = `pip install -e \"$HOME/ray-apex-dqn[gpu]\"` installs without"),
    (set_to("0.0.0.0/0"), SSH_CIDR,
     "CidrIp = 0.0.0.0/0 opens port 22 (SSH) to the whole internet"),
    (set_to([{"FromPort": 8265, "ToPort": 8265, "IpProtocol": "TCP",
              "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]),
     ("provider", "security_group", "IpPermissions"),
     "IpPermissions[0].Ipv6Ranges[0].CidrIpv6 = ::/0 opens port 8265 (the dashboard) to the "
     "whole internet"),
    (drop, ("provider", "security_group"),
     "provider.security_group.IpPermissions is not set: Ray's default group opens SSH (22) to "
     "0.0.0.0/0"),
    (set_to(["runs/", "**/__pycache__"]), ("rsync_exclude",),
     "rsync_exclude does not keep .git (its git history) out of the mounted ."),
    (set_to([".git"]), ("rsync_exclude",),
     "rsync_exclude does not keep runs (its run folders) out of the mounted ."),
    (set_to({}), ("available_node_types", "head", "node_confg"),
     "Ray refuses it: Additional properties are not allowed ('node_confg' was unexpected)"),
])
def test_the_check_names_each_hardening_a_copy_lacks(filled, tmp_path, change, keys, named):
    change(filled, *keys)
    problems = problems_of(filled, tmp_path)
    assert len(problems) == 1 and named in problems[0], problems


def test_the_check_holds_for_an_on_premise_cluster_too(tmp_path):
    """Ray's `local` provider: its hosts are placeholders until set, and the rules that are not
    AWS's still hold (images, installs); nothing asks it for AWS's keys."""
    config = {"cluster_name": "on-premise", "auth": {"ssh_user": "ubuntu"},
              "provider": {"type": "local", "head_ip": "SET-HEAD-HOST",
                           "worker_ips": ["SET-WORKER-HOST"]},
              "docker": {"image": "rayproject/ray:2.60.0-py311-cpu",
                         "container_name": "ray_container"},
              "setup_commands": ["pip install -e ~/ray-apex-dqn"]}
    assert problems_of(config, tmp_path) == [
        "provider.head_ip = SET-HEAD-HOST still holds the placeholder SET-HEAD-HOST: set it to "
        "the node's address",
        "provider.worker_ips[0] = SET-WORKER-HOST still holds the placeholder SET-WORKER-HOST: "
        "set it to the node's address",
        "docker.image = rayproject/ray:2.60.0-py311-cpu is not pinned by digest (a tag can be "
        "pushed again): append @sha256:<digest> (docker buildx imagetools inspect "
        "rayproject/ray:2.60.0-py311-cpu)",
        "setup_commands[0] = `pip install -e ~/ray-apex-dqn` installs without the constraints: "
        "add -c <the checkout on the node>/constraints.txt, so every node gets the versions the "
        "tests ran"]
    config["provider"].update(head_ip="10.0.0.1", worker_ips=["10.0.0.2"])
    config["docker"]["image"] += DIGEST
    config["setup_commands"] = ["pip install -c ~/ray-apex-dqn/constraints.txt -e ~/ray-apex-dqn"]
    assert problems_of(config, tmp_path) == []


def test_the_check_refuses_the_shipped_on_premise_file_only_for_its_placeholders():
    result = run_check("cluster-local.yaml")
    assert result.returncode == 2 and result.stdout == ""
    host = "still holds the placeholder {0}: set it to the node's address"
    assert result.stderr.splitlines() == [
        "cluster-local.yaml: provider.head_ip = SET-HEAD-HOST " + host.format("SET-HEAD-HOST"),
        "cluster-local.yaml: provider.worker_ips[0] = SET-WORKER-1-HOST "
        + host.format("SET-WORKER-1-HOST"),
        "cluster-local.yaml: provider.worker_ips[1] = SET-WORKER-2-HOST "
        + host.format("SET-WORKER-2-HOST"),
        "cluster-local.yaml: auth.ssh_user = SET-SSH-USER still holds the placeholder "
        "SET-SSH-USER: set it to the user SSH logs in as on every node",
        "cluster-local.yaml: auth.ssh_private_key = SET-SSH-KEY still holds the placeholder "
        "SET-SSH-KEY: set it to the path of the SSH private key every node accepts for that "
        "user"]


@pytest.fixture
def local_filled(local_cluster):
    """cluster-local.yaml with its placeholders set as a user sets them."""
    config = copy.deepcopy(local_cluster)
    config["provider"].update(head_ip="192.0.2.10", worker_ips=["192.0.2.11", "192.0.2.12"])
    config["auth"].update(ssh_user="ubuntu", ssh_private_key="~/.ssh/id_ed25519")
    return config


def test_the_check_passes_an_on_premise_copy_with_the_placeholders_set(local_filled, tmp_path):
    problems_of(local_filled, tmp_path)  # written there
    result = run_check(tmp_path / "cluster.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"{tmp_path / 'cluster.yaml'}: ok\n", "")


@pytest.mark.parametrize("change, keys, named", [
    (set_to(["192.0.2.11", "192.0.2.11"]), ("provider", "worker_ips"),
     "provider.worker_ips[1] = 192.0.2.11 is listed already as provider.worker_ips[0]: each "
     "machine once"),
    (set_to(["192.0.2.11", "192.0.2.10"]), ("provider", "worker_ips"),
     "provider.worker_ips[1] = 192.0.2.10 is listed already as provider.head_ip"),
    (set_to({"head": {"resources": {LEARNER_HOST: 1}, "node_config": {}}}),
     ("available_node_types",),
     "Ray refuses it: The field available_node_types is not supported for on-premise clusters."),
    (drop, ("provider", "worker_ips"),
     "Ray refuses it: Please supply a `head_ip` and list of `worker_ips`."),
    (set_to("pip install -q -e ~/ray-apex-dqn"), ("setup_commands", 1),
     "setup_commands[1] = `pip install -q -e ~/ray-apex-dqn` installs without the constraints"),
    (set_to(["runs/"]), ("rsync_exclude",),
     "rsync_exclude does not keep .git (its git history) out of the mounted ."),
])
def test_the_check_names_what_an_on_premise_copy_gets_wrong(local_filled, tmp_path, change, keys,
                                                            named):
    change(local_filled, *keys)
    problems = problems_of(local_filled, tmp_path)
    assert len(problems) == 1 and named in problems[0], problems


def test_unreadable_or_malformed_files_end_in_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("provider: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n")
    result = run_check(tmp_path / "missing.yaml", tmp_path / "broken.yaml",
                       tmp_path / "list.yaml")
    assert result.returncode == 2 and result.stdout == ""
    missing, broken, listed = result.stderr.splitlines()
    assert missing == f"{tmp_path / 'missing.yaml'}: cannot read it: No such file or directory"
    assert broken.startswith(f"{tmp_path / 'broken.yaml'}: is not YAML: ")
    assert listed == f"{tmp_path / 'list.yaml'}: is not a mapping of Ray's cluster keys"


def test_every_node_installs_the_versions_the_tests_run(cluster):
    """constraints.txt pins each package `pip install -e .` pulls in at the version these tests
    run with, and every install on the nodes takes it from the mounted checkout."""
    def pinned(text: str) -> list[str]:  # (the header names the Python that made them)
        return [line for line in text.splitlines() if not line.startswith("#")]

    shipped = (ROOT / "constraints.txt").read_text()
    assert pinned(shipped) == pinned(constraints_text()), (
        "constraints.txt differs from this environment: install with `pip install -c "
        "constraints.txt -e .[test]`, or regenerate it (python -m common.cluster_check "
        "--freeze > constraints.txt)")
    pins = dict(line.split("==") for line in pinned(shipped))
    assert {"ray", "tensorflow", "keras", "numpy", "gymnasium", "ale-py"} <= set(pins)
    assert pins["ray"] == "2.60.0" and "ray-apex-dqn" not in pins and "pip" not in pins
    installs = [c for key in ("setup_commands", "head_setup_commands") for c in cluster[key]
                if "pip install" in c]
    assert installs and all("ray-apex-dqn/constraints.txt" in c for c in installs)
