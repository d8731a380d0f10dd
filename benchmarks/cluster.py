"""What a cluster's life costs, on four hosts made on this machine (network namespaces with
Debian's sshd; root): the scenario tests/test_cluster.py checks, timed.

    python benchmarks/cluster.py

From the laptop (this machine), `ray up cluster-local.yaml` onto a head and three workers, a
CartPole run with its checkpoints in an S3 bucket (moto's server on the hosts' network), then
a worker's cable pulled past Ray's node timeout and plugged back, a worker host crashed, the
head crashed with its disk and brought back (`ray up`, `--resume s3://...`), `ray down`.
Prints one JSON line, seconds:
- ray_up_and_workers_joined_s: `ray up` until all three workers are in the cluster;
- submit_to_checkpoint_s: `ray job submit` until the run's first checkpoint is in the bucket;
- checkpoint_to_bucket_s_median: the run's checkpoints (learner, shard, progress) written;
- worker_cut_to_both_actors_playing_s: the cable pulled until Ray has declared the node dead,
  restarted its actor elsewhere and both actors report again;
- worker_lost_to_both_actors_playing_s: the same for a crashed host (its connections refused);
- head_lost_to_cluster_up_s: the head crashed until `ray up` again has every live worker in;
- head_lost_to_resumed_run_done_s: until a 20 s resumed sitting has finished;
- workers_stopped_after_down_s: `ray down` until the workers' Ray has ended;
- total_s.
Figures on one machine: every host shares its 2 cores (the timings include TensorFlow's
start in each restarted role), and the network is a bridge, not a data center's.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.cluster_scenario import cluster_run, laptop_and_hosts, print_diagnostics  # noqa: E402
from tests.hosts import HostsUnavailable, missing_prerequisite  # noqa: E402


def main() -> int:
    if len(sys.argv) > 1:
        print("usage: python benchmarks/cluster.py (no options)", file=sys.stderr)
        return 2
    problem = missing_prerequisite()
    if problem:
        print(f"cluster.py: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dqn-cluster-bench-") as folder:
        try:
            with laptop_and_hosts(Path(folder)) as laptop:
                try:
                    timings = cluster_run(laptop)
                except BaseException:
                    print_diagnostics(laptop, laptop.hosts)
                    raise
        except HostsUnavailable as error:
            print(f"cluster.py: {error}", file=sys.stderr)
            return 2
    print(json.dumps(timings), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
