"""Does a long run hold steady: memory and speed of every role over a 30-minute seed run.

    python benchmarks/soak.py [--seconds 1800] [--replay-capacity 20000] [--window-s 300]
                              [--quick] [--address ADDR]

Runs `launch.py` (seed preset) with a small replay, so it is full within the first minutes,
and samples the resident memory of each role's process (learner, replay shard, each actor,
the evaluator) every few seconds. Ends with one JSON line:
- rss_mb: {role: {"at_full": MB when replay first reported full, "warm": MB once the role has
  also done its first unit of work (the evaluator: its first evaluation; the others: replay
  full), "end": MB at the end}};
- rss_growth_pct_after_full: {role: growth from "at_full" to the end, %}; an actor's figure is
  the largest over the actors;
- rss_growth_pct_after_warm: the same from "warm" (target: < 5 for every role), and
  rss_growth_pct_second_half: from the middle of the warm span to its end (a leak grows there
  as much as in the first half; warm-up does not);
- anon_mb, anon_growth_pct_after_warm, shmem_mb: the two parts of that RSS, the process's
  private heap (where a leak shows) and the pages of Ray's shared object store it has mapped
  by reading objects from it (weights, batches: not its own memory);
- agent_steps_per_s_first / _last: the rate over the first `--window-s` once the random
  phase is over (start-up excluded, and the random phase, whose steps skip the network) and
  over the last (target: within 10% of each other), and their ratio;
- restarts: role restarts during the run (a restart resets a role's memory: a soak with
  restarts says nothing about growth);
- series: the file holding every sample ({"t": seconds, role: {rss, anon, shmem}, "cpu_s":
  CPU seconds so far of each role, the launcher, Ray's own processes and the machine}).
`--quick` (90 s, a tiny replay, 8 envs an actor, 2,000 random steps, an evaluation every
20 s) checks that the script works; its figures mean nothing.
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

from common.process import cluster_workers

ROOT = Path(__file__).resolve().parents[1]
ROLE_TITLES = {"learner": "ray::LearnerService", "replay": "ray::ReplayService",
               "actor": "ray::ActorService", "evaluator": "ray::EvaluatorService"}
PROGRESS = re.compile(r"^(\d+):(\d\d):(\d\d) \| steps +([\d,]+) \|.*\| (random|eps)[^|]*\| "
                      r"replay +([\d,]+) \|", re.M)
EVALUATED = "| eval "  # in a progress line once the evaluator has played
SAMPLE_EVERY_S = 5.0
TARGETS = {"rss_growth_pct_after_warm": 5.0, "rate_ratio_within": 0.10}


def role_processes(launcher: psutil.Process, gcs_address: str | None) -> dict[str, list]:
    """Each role's processes: the launcher's local Ray's workers, or (joined) those whose
    raylet names `gcs_address`."""
    if gcs_address is None:
        candidates = launcher.children(recursive=True)
    else:
        candidates = cluster_workers(gcs_address)
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


def cpu_seconds(launcher: psutil.Process, processes: dict[str, list],
                local: bool) -> dict[str, float]:
    """CPU seconds used so far by each role's processes (the actors summed), the launcher,
    the rest of its process tree (a local Ray's own: GCS, raylet, dashboard, agents) and the
    whole machine (busy time), so the series says who took the CPU when the rate moves."""
    def used(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone
            return 0.0
        return times.user + times.system

    seconds = {role: round(sum(map(used, group)), 1)
               for role, group in processes.items() if group}
    seconds["launcher"] = round(used(launcher), 1)
    if local:  # a joined cluster's Ray is not the launcher's
        roles = {process.pid for group in processes.values() for process in group}
        try:
            tree = launcher.children(recursive=True)
        except psutil.Error:
            tree = []
        seconds["ray"] = round(sum(used(p) for p in tree if p.pid not in roles), 1)
    machine = psutil.cpu_times()
    seconds["machine"] = round(sum(machine) - machine.idle - machine.iowait, 1)
    return seconds


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


def last_sample(series: list[dict], role: str, since: int = 0) -> dict | None:
    return next((sample for sample in reversed(series[since:]) if role in sample), None)


def growth_pct(before: float, after: float) -> float:
    return round(100 * (after - before) / before, 2) if before > 0 else 0.0


def memory_figures(series: list[dict], full_at: int, warm_at: dict[str, int]) -> dict:
    """The JSON's memory figures from the samples, for every role seen warm."""
    figures: dict[str, dict] = {key: {} for key in (
        "rss_mb", "rss_growth_pct_after_full", "rss_growth_pct_after_warm",
        "rss_growth_pct_second_half", "anon_mb", "anon_growth_pct_after_warm", "shmem_mb")}
    for role, warm in warm_at.items():
        end = last_sample(series, role, warm)
        at_full = next((s for s in series[full_at:] if role in s), None)
        if end is None or at_full is None:
            continue
        middle_t = (series[warm]["t"] + end["t"]) / 2
        middle = next(s for s in series[warm:] if role in s and s["t"] >= middle_t)
        mb = {part: {"at_full": at_full[role][part], "warm": series[warm][role][part],
                     "end": end[role][part]} for part in ("rss", "anon", "shmem")}
        for part in ("rss", "anon", "shmem"):
            figures[f"{part}_mb"][role] = mb[part]
        figures["rss_growth_pct_after_full"][role] = growth_pct(mb["rss"]["at_full"],
                                                                mb["rss"]["end"])
        for part in ("rss", "anon"):
            figures[f"{part}_growth_pct_after_warm"][role] = growth_pct(mb[part]["warm"],
                                                                        mb[part]["end"])
        figures["rss_growth_pct_second_half"][role] = growth_pct(middle[role]["rss"],
                                                                 end[role]["rss"])
    return figures


def progress_points(text: str) -> list[tuple[int, int, int, bool]]:
    """(seconds, agent steps, replay size, still in the random phase) of each progress line."""
    return [(int(h) * 3600 + int(m) * 60 + int(s), int(steps.replace(",", "")),
             int(size.replace(",", "")), phase == "random")
            for h, m, s, steps, phase, size in PROGRESS.findall(text)]


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
    eval_every_s = 120
    if args.quick:
        args.seconds, args.replay_capacity, args.window_s = 90.0, 1_000, 15.0
        eval_every_s = 20
    logdir = Path(tempfile.mkdtemp(prefix="soak-"))
    out_path = logdir / "launch.out"
    flags = ["--logdir", str(logdir / "run"), "--max-seconds", str(args.seconds),
             "--replay-capacity", str(args.replay_capacity), "--report-every-s", "5",
             "--eval-every-s", str(eval_every_s)]
    if args.address:
        flags += ["--address", args.address, "--num-actors", "2"]
    if args.quick:
        flags += ["--envs-per-actor", "8", "--random-agent-steps", "2000"]
    with open(out_path, "w") as out:
        launcher = subprocess.Popen([sys.executable, "launch.py", *flags], cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT)
        series: list[dict] = []  # every sample: {"t": s, role: parts, "cpu_s": {...}}
        full_at, warm_at = None, {}  # sample indices: replay full; each role warm
        started = time.monotonic()
        try:
            while launcher.poll() is None:
                time.sleep(SAMPLE_EVERY_S)
                tree = psutil.Process(launcher.pid)
                processes = role_processes(tree, args.address)
                sizes = rss_mb(processes)
                series.append({"t": round(time.monotonic() - started, 1), **sizes,
                               "cpu_s": cpu_seconds(tree, processes, args.address is None)})
                text = out_path.read_text()
                points = progress_points(text)
                if full_at is None and points and points[-1][2] >= args.replay_capacity:
                    full_at = len(series) - 1
                if full_at is not None:
                    for role in sizes:
                        if role not in warm_at and (role != "evaluator" or EVALUATED in text):
                            warm_at[role] = len(series) - 1
        except KeyboardInterrupt:
            launcher.send_signal(signal.SIGINT)
            launcher.wait()
            raise
    text = out_path.read_text()
    summary_path = logdir / "run" / "summary.json"
    if launcher.returncode != 0 or not summary_path.exists() or full_at is None:
        print(text[-3000:], file=sys.stderr)
        raise SystemExit("soak.py: the run did not end well, or replay never filled")
    summary = json.loads(summary_path.read_text())
    points = progress_points(text)
    # From the first progress line past the random phase: start-up excluded, and the random
    # phase's steps, which skip the network, are cheaper than the rest of the run's.
    start_s = next((p[0] for p in points if not p[3]), points[-1][0])
    end_s = points[-1][0]
    first = rate_between(points, start_s, start_s + args.window_s)
    final = rate_between(points, end_s - args.window_s, end_s)
    series_path = logdir / "rss_series.json"
    series_path.write_text(json.dumps(series))
    memory = memory_figures(series, full_at, warm_at)
    print(json.dumps({
        "seconds": args.seconds, "replay_capacity": args.replay_capacity,
        "quick": args.quick, **memory,
        "agent_steps_per_s_first": round(first, 1), "agent_steps_per_s_last": round(final, 1),
        "last_to_first": round(final / first, 3) if first else None,
        "restarts": summary["restarts"], "agent_steps": summary["agent_steps"],
        "updates": summary["updates"], "targets": TARGETS,
        "targets_met": {
            "rss_growth_pct_after_warm": all(
                pct < TARGETS["rss_growth_pct_after_warm"]
                for pct in memory["rss_growth_pct_after_warm"].values()),
            "rate": bool(first) and abs(final / first - 1) <= TARGETS["rate_ratio_within"]},
        "series": str(series_path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
