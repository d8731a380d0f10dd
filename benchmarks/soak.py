"""Does a long run hold steady: memory and speed of every role over a 30-minute seed run.

    python benchmarks/soak.py [--seconds 1800] [--replay-capacity 20000] [--window-s 300]
                              [--quick] [--address ADDR]

Runs `launch.py` (seed preset) with a small replay, so it is full within the first minutes,
and samples the resident memory of each role's process (learner, replay shard, each actor,
the evaluator) every few seconds. Ends with one JSON line:
- rss_mb: {role: {"at_full": MB when replay first reported full, "end": MB at the end}};
- rss_growth_pct_after_full: {role: growth from then to the end, %} (target: < 5 for every
  role; an actor's figure is the largest over the actors);
- anon_mb, anon_growth_pct_after_full, shmem_mb: the two parts of that RSS, the process's
  private heap (where a leak shows) and the pages of Ray's shared object store it has mapped
  by reading objects from it (weights, batches: not its own memory);
- agent_steps_per_s_first / _last: the rate over the first `--window-s` from the first
  progress line (start-up excluded) and over the last (target: within 10% of each other),
  and their ratio;
- restarts: role restarts during the run (a restart resets a role's memory: a soak with
  restarts says nothing about growth).
`--quick` (90 s, a tiny replay, 8 envs an actor) checks that the script works; its figures
mean nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ROLE_TITLES = {"learner": "ray::LearnerService", "replay": "ray::ReplayService",
               "actor": "ray::ActorService", "evaluator": "ray::EvaluatorService"}
PROGRESS = re.compile(r"^(\d+):(\d\d):(\d\d) \| steps +([\d,]+) \|.*\| replay +([\d,]+) \|",
                      re.M)
SAMPLE_EVERY_S = 5.0
TARGETS = {"rss_growth_pct_after_full": 5.0, "rate_ratio_within": 0.10}


def role_processes(launcher: psutil.Process, gcs_address: str | None) -> dict[str, list]:
    """Each role's processes: the launcher's local Ray's workers, or (joined) those whose
    raylet names `gcs_address`."""
    if gcs_address is None:
        candidates = launcher.children(recursive=True)
    else:
        raylets = {p.pid for p in psutil.process_iter(["name", "cmdline"])
                   if p.info["name"] == "raylet"
                   and f"--gcs-address={gcs_address} " in " ".join(p.info["cmdline"] or []) + " "}
        candidates = [p for p in psutil.process_iter() if p.ppid() in raylets]
    found: dict[str, list] = {role: [] for role in ROLE_TITLES}
    for process in candidates:
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        for role, prefix in ROLE_TITLES.items():
            if title.startswith(prefix) or title.startswith(f"ray::dqn-{role}"):
                found[role].append(process)
    return found


def resident_mb(pid: int) -> dict[str, float]:
    """A process's resident MB, and its parts: `anon`, its private heap (what a leak grows),
    and `shmem`, the shared memory it has touched (Ray's object store, mapped into every
    worker: each object read maps pages of it, which count in the reader's RSS)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssShmem"):
                fields[name] = int(value.split()[0]) / 1024  # kB
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "shmem": fields["RssShmem"]}


def rss_mb(processes: dict[str, list]) -> dict[str, dict[str, float]]:
    """Resident MB per role, and its parts (an actor's: the largest actor's)."""
    sizes = {}
    for role, group in processes.items():
        values = []
        for process in group:
            try:
                values.append(resident_mb(process.pid))
            except (OSError, KeyError):  # gone, or a zombie
                pass
        if values:
            largest = max(values, key=lambda parts: parts["rss"])
            sizes[role] = {part: round(mb, 1) for part, mb in largest.items()}
    return sizes


def progress_points(text: str) -> list[tuple[int, int, int]]:
    """(seconds, agent steps, replay size) of each progress line."""
    return [(int(h) * 3600 + int(m) * 60 + int(s), int(steps.replace(",", "")),
             int(size.replace(",", "")))
            for h, m, s, steps, size in PROGRESS.findall(text)]


def rate_between(points: list, start_s: float, end_s: float) -> float:
    inside = [p for p in points if start_s <= p[0] <= end_s]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--replay-capacity", type=int, default=20_000)
    parser.add_argument("--window-s", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--address", default=None, help="join this Ray (default: a local one)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.replay_capacity, args.window_s = 90.0, 1_000, 15.0
    logdir = Path(tempfile.mkdtemp(prefix="soak-"))
    out_path = logdir / "launch.out"
    flags = ["--logdir", str(logdir / "run"), "--max-seconds", str(args.seconds),
             "--replay-capacity", str(args.replay_capacity), "--report-every-s", "5",
             "--eval-every-s", "120"]
    if args.address:
        flags += ["--address", args.address, "--num-actors", "2"]
    if args.quick:
        flags += ["--envs-per-actor", "8"]
    with open(out_path, "w") as out:
        launcher = subprocess.Popen([sys.executable, "launch.py", *flags], cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT)
        at_full, last = None, {}
        try:
            while launcher.poll() is None:
                time.sleep(SAMPLE_EVERY_S)
                sizes = rss_mb(role_processes(psutil.Process(launcher.pid), args.address))
                last.update(sizes)  # each role's latest, even once it has begun to exit
                points = progress_points(out_path.read_text())
                if at_full is None and points and points[-1][2] >= args.replay_capacity:
                    at_full = sizes
        except KeyboardInterrupt:
            launcher.send_signal(signal.SIGINT)
            launcher.wait()
            raise
    text = out_path.read_text()
    summary_path = logdir / "run" / "summary.json"
    if launcher.returncode != 0 or not summary_path.exists() or at_full is None:
        print(text[-3000:], file=sys.stderr)
        raise SystemExit("soak.py: the run did not end well, or replay never filled")
    summary = json.loads(summary_path.read_text())
    points = progress_points(text)
    start_s, end_s = points[0][0], points[-1][0]  # from the first progress line: no start-up
    first = rate_between(points, start_s, start_s + args.window_s)
    final = rate_between(points, end_s - args.window_s, end_s)
    def at_full_and_end(part: str) -> dict[str, dict[str, float]]:
        return {role: {"at_full": at_full[role][part], "end": last[role][part]}
                for role in at_full if role in last}

    def growth(part: str) -> dict[str, float]:
        return {role: round(100 * (last[role][part] - at_full[role][part])
                            / at_full[role][part], 2)
                for role in at_full if role in last and at_full[role][part] > 0}
    print(json.dumps({
        "seconds": args.seconds, "replay_capacity": args.replay_capacity,
        "quick": args.quick,
        "rss_mb": at_full_and_end("rss"),
        "rss_growth_pct_after_full": growth("rss"),
        # The parts of each role's RSS: its private heap and the object store pages it maps.
        "anon_mb": at_full_and_end("anon"),
        "anon_growth_pct_after_full": growth("anon"),
        "shmem_mb": at_full_and_end("shmem"),
        "agent_steps_per_s_first": round(first, 1), "agent_steps_per_s_last": round(final, 1),
        "last_to_first": round(final / first, 3) if first else None,
        "restarts": summary["restarts"], "agent_steps": summary["agent_steps"],
        "updates": summary["updates"], "targets": TARGETS}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
