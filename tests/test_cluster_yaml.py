"""cluster.yaml is a config `ray up` accepts (Ray's own validation, offline) and it keeps the
promises the launcher and the README rely on."""
import copy

import pytest
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from launch import LEARNER_HOST
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_cluster_yaml(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


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
