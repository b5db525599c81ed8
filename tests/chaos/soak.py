"""Chaos soak: a pool under kill -9, SIGSTOP past the grace period and short SIGSTOPs at any
point (inside claims too), SIGTERM, PostgreSQL restarts, dropped connections, answers lost
after the server committed, and outages longer than the grace period, all at random moments,
with one worker's clock ten minutes off; then prove nothing was lost.

    python -m tests.chaos.soak [--workers 16] [--trials 300] [--faults 20] [--seed 0]

Runs against a PostgreSQL server of its own (its own data directory and port), so restarting
it touches nothing else; workers reach it through a fault proxy (``tests.fault_proxy``).
Bounded: gives up after --deadline seconds. Exit 0 only if every check
holds; the last line is the one-line summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import BIN, ROOT, cli_env, make_config, write_config
from tests.fault_proxy import FaultProxy
from tests.pool_helpers import trials
from tests.private_postgres import PrivatePostgres

FAULTS = (
    "kill9", "sigstop", "sigterm", "pg_restart", "drop_connections",
    "lost_answers", "outage", "sigstop_short",
)  # fmt: skip
#: Statements whose answers the proxy loses (the server has committed them).
LOSABLE_COMMITS = (
    ("INSERT INTO hpo_tickets",),  # claim
    ("DELETE FROM hpo_tickets",),  # settle
    ("UPDATE hpo_tickets SET worker",),  # take over
    ("INSERT INTO trial_values",),  # a result
    ("UPDATE trials SET state", "WAITING"),  # a pop
    ("INSERT INTO trial_system_attributes", "hpo:ticket"),  # a new trial
    ("INSERT INTO trial_system_attributes", "hpo:requeued_from"),  # a re-queue
)


class Soak:
    def __init__(self, args: argparse.Namespace, server: PrivatePostgres, tmp: Path) -> None:
        self.args = args
        self.server = server
        self.url = server.url
        self.proxy = FaultProxy(server.port)
        self.worker_url = self.proxy.url()
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.workers: list[subprocess.Popen[str]] = []
        self.expected_exit: dict[int, int | None] = {}  # pid -> expected code (None: killed)
        self.faults: collections.Counter[str] = collections.Counter()
        self.log = open(tmp / "workers.log", "w")  # noqa: SIM115 - closed in run()
        self.timers: list[threading.Timer] = []
        self.started_at: dict[int, float] = {}

    def say(self, text: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def start_worker(self, **env: str) -> None:
        proc = subprocess.Popen(
            [str(BIN / "hpo-worker")], cwd=ROOT, env=cli_env(self.worker_url, **env),
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.workers.append(proc)
        self.expected_exit[proc.pid] = 0
        self.started_at[proc.pid] = time.monotonic()

    def busy(self) -> list[subprocess.Popen[str]]:
        """Workers running a trial right now (by the `worker` attribute of RUNNING trials)."""
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                values = conn.execute(sa.text(
                    "select a.value_json from trial_user_attributes a join trials t "
                    "using (trial_id) where t.state = 'RUNNING' and a.key = 'worker'"
                )).scalars().all()  # fmt: skip
        except sa.exc.OperationalError:
            return []
        finally:
            engine.dispose()
        pids = {int(json.loads(v).rsplit(":", 1)[1]) for v in values}
        return [w for w in self.alive() if w.pid in pids]

    def alive(self) -> list[subprocess.Popen[str]]:
        """Workers that are up: started over 3 s ago, so their signal handlers are installed
        (a process still importing dies of SIGTERM like any other; no trial is at stake)."""
        ready = time.monotonic() - 3
        up = [w for w in self.workers if w.poll() is None and self.started_at[w.pid] < ready]
        return [w for w in up if self.expected_exit[w.pid] == 0]

    def finished(self) -> int:
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text(
                    "select count(*) from trials where state in ('COMPLETE', 'PRUNED')"
                )).scalar_one())  # fmt: skip
        except sa.exc.OperationalError:
            return -1  # the server is restarting
        finally:
            engine.dispose()

    def inject(self, fault: str) -> None:
        # Kill, freeze or stop a worker in the middle of a trial: that is what must not lose it.
        victims = self.busy() or self.alive()
        if fault in ("kill9", "sigstop", "sigterm") and not victims:
            return
        self.faults[fault] += 1
        if fault == "kill9":
            victim = self.rng.choice(victims)
            victim.send_signal(signal.SIGKILL)
            self.expected_exit[victim.pid] = None
            self.say(f"kill -9 worker pid {victim.pid}; starting a replacement")
            self.start_worker()
        elif fault == "sigstop":
            victim = self.rng.choice(victims)
            pause = self.args.grace + 2
            self.say(f"SIGSTOP worker pid {victim.pid} for {pause}s (grace {self.args.grace}s)")
            victim.send_signal(signal.SIGSTOP)

            def resume(v: subprocess.Popen[str] = victim) -> None:
                v.send_signal(signal.SIGCONT)
                self.say(f"SIGCONT worker pid {v.pid}")

            timer = threading.Timer(pause, resume)
            timer.start()
            self.timers.append(timer)
        elif fault == "sigterm":
            victim = self.rng.choice(victims)
            self.say(f"SIGTERM worker pid {victim.pid} (must finish its trial and exit 0)")
            victim.send_signal(signal.SIGTERM)
            self.start_worker()
        elif fault == "sigstop_short":
            # A blink at any point (a GC pause, a busy host): inside a claim, a settlement or
            # a transaction as likely as anywhere. Shorter than the grace period.
            for _ in range(5):
                if not self.alive():
                    break
                victim = self.rng.choice(self.alive())
                pause = self.rng.uniform(0.05, 1.5)
                victim.send_signal(signal.SIGSTOP)
                time.sleep(pause)
                victim.send_signal(signal.SIGCONT)
            self.say("5 short SIGSTOPs (0.05-1.5s) of random workers")
        elif fault == "lost_answers":
            for parts in self.rng.sample(LOSABLE_COMMITS, 4):
                self.proxy.lose_commit_after(*parts)
            self.say("armed 4 lost answers (committed by the server, never heard)")
        elif fault == "outage":
            seconds = self.args.grace + 2
            self.say(f"network outage of {seconds}s (longer than the grace period)")
            self.proxy.outage(seconds)
            time.sleep(seconds)
        elif fault == "pg_restart":
            self.say("restarting PostgreSQL")
            self.server.restart()
            self.say("PostgreSQL is back")
        elif fault == "drop_connections":
            engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                n = conn.execute(sa.text(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                    "where application_name like 'hpo-worker:%'"
                )).scalar_one()  # fmt: skip
            engine.dispose()
            self.say(f"terminated {n} worker connections")

    def run(self) -> dict[str, Any]:
        a = self.args
        config = make_config(
            session="tests.sessions:jitter",
            study_={"name": "soak", "n_trials": a.trials, "heartbeat_interval": 1,
                    "grace_period": a.grace, "max_retries": 100, "max_failed_trials": None,
                    "sampler": {"name": "random", "seed": a.seed}},
        )  # fmt: skip
        path = write_config(self.tmp / "soak.yaml", config)
        # One host's clock runs ten minutes fast: only the database's clock may count.
        self.start_worker(PYTHONPATH=str(ROOT / "tests" / "skewed_clock"), HPO_TEST_SKEW_S="600")
        for _ in range(a.workers - 1):
            self.start_worker()
        created = subprocess.run(
            [str(BIN / "hpo-coordinator"), "create", str(path)], cwd=ROOT, env=cli_env(self.url),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if created.returncode != 0:
            raise SystemExit(created.stderr)
        started = time.monotonic()
        while self.finished() < a.trials // 10:  # every worker up and busy before the first fault
            time.sleep(0.2)
        plan = [FAULTS[i % len(FAULTS)] for i in range(a.faults)]
        self.rng.shuffle(plan)
        while self.finished() < a.trials:
            if time.monotonic() - started > a.deadline:
                raise SystemExit(f"soak: deadline of {a.deadline}s passed")
            if plan and self.finished() >= 0:
                time.sleep(self.rng.uniform(0.2, a.fault_every))
                self.inject(plan.pop())
            else:
                time.sleep(0.5)
        wall = time.monotonic() - started
        for timer in self.timers:  # a stopped worker must run again to hear SIGTERM
            timer.join()
        time.sleep(max(0.0, max(self.started_at.values()) + 3 - time.monotonic()))
        for w in self.alive():
            w.send_signal(signal.SIGTERM)
        codes = {w.pid: w.wait(timeout=120) for w in self.workers}
        self.log.close()
        bad_exits = {
            pid: code for pid, code in codes.items() if self.expected_exit[pid] == 0 and code != 0
        }
        return self.check(wall, bad_exits, plan)

    def check(self, wall: float, bad_exits: dict[int, int], unused: list[str]) -> dict[str, Any]:
        result = trials(self.url, "soak")
        states = collections.Counter(t.state.name for t in result)
        done = states["COMPLETE"] + states["PRUNED"]
        by_root: dict[int, list[Any]] = collections.defaultdict(list)
        for t in result:
            by_root[int(t.user_attrs.get("retry_of", t.number))].append(t)
        # A point is lost if no attempt of it completed. A trial lost before it had
        # parameters (its worker died between creating and sampling it) was never a point.
        lost = sum(
            1 for attempts in by_root.values()
            if any(t.params or t.system_attrs.get("fixed_params") for t in attempts)
            and not any(t.state.name in ("COMPLETE", "PRUNED") for t in attempts)
        )  # fmt: skip
        duplicates = sum(
            max(0, sum(t.state.name in ("COMPLETE", "PRUNED") for t in attempts) - 1)
            for attempts in by_root.values()
        ) + max(0, done - self.args.trials)
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            tickets = conn.execute(sa.text("select count(*) from hpo_tickets")).scalar_one()
            claimed = conn.execute(sa.text("select claimed from hpo_studies")).scalar_one()
        engine.dispose()
        text = (self.tmp / "workers.log").read_text()
        if "Traceback" in text:  # show the first one: the log goes with the temporary folder
            start = text.index("Traceback")
            print(text[max(0, start - 1500) : start + 4000], flush=True)
        summary = {
            "faults": dict(self.faults), "complete": done, "lost": lost,
            "duplicates": duplicates, "running": states["RUNNING"], "waiting": states["WAITING"],
            "failed_trials": states["FAIL"], "bad_exits": bad_exits, "wall_s": round(wall, 1),
            "tracebacks": text.count("Traceback"), "unused_faults": unused,
            "dropped_late_results": text.count("result dropped"),
            "tickets_left": tickets, "claimed": claimed,
            "lost_answers": self.proxy.lost_answers,
        }  # fmt: skip
        self.proxy.close()
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chaos soak of the worker pool")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=0.6, help="max s between faults")
    parser.add_argument("--grace", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=900)
    args = parser.parse_args(argv)
    server = PrivatePostgres()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = Soak(args, server, Path(tmp)).run()
    finally:
        server.cleanup()
    ok = (
        not s["unused_faults"]
        and s["complete"] == args.trials and s["lost"] == 0 and s["duplicates"] == 0
        and s["running"] == 0 and s["waiting"] == 0 and not s["bad_exits"]
        and s["tracebacks"] == 0 and s["tickets_left"] == 0 and s["claimed"] == args.trials
    )  # fmt: skip
    faults = " ".join(f"{k}={v}" for k, v in sorted(s["faults"].items()))
    parts = [
        f"chaos soak {'PASSED' if ok else 'FAILED'}: faults {faults}",
        f"{s['complete']}/{args.trials} trials COMPLETE",
        f"lost {s['lost']}, duplicates {s['duplicates']}",
        f"budget claimed {s['claimed']}, tickets left {s['tickets_left']}",
        f"answers lost {s['lost_answers']}",
        f"failed-and-retried {s['failed_trials']}",
        f"late results dropped {s['dropped_late_results']}",
        f"RUNNING {s['running']}, WAITING {s['waiting']}",
        f"bad exits {s['bad_exits'] or 0}, tracebacks {s['tracebacks']}",
        f"wall {s['wall_s']}s",
    ]
    print("; ".join(parts), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
