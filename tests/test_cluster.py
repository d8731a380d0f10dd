"""The on-premise path end to end, as a user takes it from a laptop (tests/cluster_scenario.py):
`ray up cluster-local.yaml` over SSH onto four hosts (tests/hosts.py: a head and three
workers, each a machine of its own on a private bridge), the workers joining with token
authentication and nothing without the token getting in, `ray job submit` through the SSH
tunnel `ray dashboard` makes, checkpoints in an S3 bucket the laptop serves (tests/buckets.py),
the learner and the replay shard on the head and the actors on the workers; then a worker's
cable is pulled (its actor comes back on another worker, and only once when the cable is
back), a worker host crashes, and the head crashes with its disk (`ray up` again, and
`--resume s3://...` carries the run on from the bucket); `ray down`."""
import json

import pytest

from tests.cluster_scenario import cluster_run, laptop_and_hosts, print_diagnostics

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(prerequisites, tmp_path):
    with laptop_and_hosts(tmp_path) as laptop:
        yield laptop


def test_a_run_on_four_hosts_survives_a_lost_worker_and_then_the_lost_head(cluster):
    try:
        print(json.dumps(cluster_run(cluster)))
    except BaseException:
        print_diagnostics(cluster, cluster.hosts)
        raise
