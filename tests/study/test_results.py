"""Results people look at: plots, live progress, exports, optuna-dashboard, JSON logs."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
import sqlalchemy as sa
import yaml

from hpo_framework import run_hpo
from hpo_framework.config.schema import load_config
from hpo_framework.operations.coordinator import create_study
from hpo_framework.storage.database import open_storage
from hpo_framework.views.inspection import summarize
from tests import sessions
from tests.conftest import BIN, ROOT, cli_env, make_config, run_cli, start_worker, write_config
from tests.pool_helpers import create, create_sleepy, wait_for_a_trial, wait_until

SPACE = {
    "x": {"type": "float", "low": -5.0, "high": 5.0},
    "y": {"type": "int", "low": 0, "high": 10},
    "kind": {"type": "categorical", "choices": ["a", "b"]},
}


@pytest.fixture
def finished_study(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    path = write_config(
        tmp_path / "c.yaml", make_config(search_space=SPACE, study_={"n_trials": 12})
    )
    run_hpo(sessions.quadratic, path, url)
    return url


def test_plot_writes_png_html_and_an_index(finished_study: str, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    result = run_cli("hpo-inspect", "test-study", "--plot", str(out), url=finished_study)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote 11 files; open {out / 'index.html'}\n"
    # each plot is announced before it is drawn (a large study takes seconds per plot)
    announced = [line for line in result.stderr.splitlines() if line.startswith("plotting ")]
    assert [line.split()[1] for line in announced] == [
        "Optimization", "Parameter", "Parallel", "Slice", "Contour"
    ]  # fmt: skip
    for name in ("history", "importances", "parallel_coordinate", "slice", "contour"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert "plotly" in (out / f"{name}.html").read_text()
    index = (out / "index.html").read_text()
    assert '<img src="history.png"' in index and "Top trials" in index and "test-study" in index


def test_plots_of_a_conditional_space_with_losses_spanning_decades(tmp_path: Path) -> None:
    space = {
        "kind": {"type": "categorical", "choices": ["a", "b"]},
        "a1": {"type": "float", "low": 0.0, "high": 1.0, "when": {"kind": "a"}},
        "a2": {"type": "float", "low": 0.0, "high": 1.0, "when": {"kind": "a"}},
        "b1": {"type": "float", "low": 0.0, "high": 1.0, "when": {"kind": "b"}},
    }
    sampler = {"name": "random", "seed": 3}
    config = make_config(
        search_space=space,
        study_={"n_trials": 24, "sampler": sampler},
        enqueue=[{"kind": "b", "b1": 0.5}],  # b1 is seen first, then a1: never together
    )
    url = f"sqlite:///{tmp_path / 'c.db'}"

    def session(cfg: dict[str, float]) -> float:  # from 0.001 to 10
        return float(10 ** (4 * cfg.get("a1", cfg.get("b1", 0.0)) - 3))

    run_hpo(session, write_config(tmp_path / "c.yaml", config), url)
    out = tmp_path / "p"
    result = run_cli("hpo-inspect", "test-study", "--plot", str(out), url=url)
    assert result.returncode == 0, result.stderr
    index = (out / "index.html").read_text()
    assert "Contour (a1 × a2)" in index  # the pair that occurs together
    # log axes, and log10 of the objective on parallel coordinates (which have no log axis)
    assert "Parallel coordinates (log10 of the objective)" in index
    assert '"type":"log"' in (out / "slice.html").read_text()
    assert '"type":"log"' in (out / "history.html").read_text()


def test_plot_of_a_multi_objective_study_draws_the_pareto_front(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    config = make_config(
        study_={"direction": None, "directions": ["minimize", "minimize"], "n_trials": 8}
    )
    run_hpo(sessions.two_objectives, write_config(tmp_path / "c.yaml", config), url)
    result = run_cli("hpo-inspect", "test-study", "--plot", str(tmp_path / "p"), url=url)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p" / "pareto_front.png").stat().st_size > 10_000


def test_plot_without_the_plotting_extra_names_it(finished_study: str, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['plotly'] = None; "
        "from hpo_framework.cli.commands import inspect_command; inspect_command()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "test-study", "--plot", str(tmp_path / "p")],
        cwd=ROOT, env=cli_env(finished_study), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "Error: plots need matplotlib and plotly (plotly is missing): "
        "pip install 'hpo-framework[plots]'\n"
    )


def test_plotting_libraries_are_not_imported_without_plot() -> None:
    code = (
        "import sys, hpo_framework.cli.commands; "
        "print({'plotly', 'matplotlib'} & set(sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "set()"


def test_output_writes_json_and_csv_files(finished_study: str, tmp_path: Path) -> None:
    for fmt in ("json", "csv"):
        target = tmp_path / f"trials.{fmt}"
        result = run_cli(
            "hpo-inspect", "test-study", "--format", fmt, "-o", str(target), url=finished_study
        )
        assert result.returncode == 0 and result.stdout == ""
        assert result.stderr == f"wrote {target}\n"
    assert len(json.loads((tmp_path / "trials.json").read_text())["trials"]) == 12
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(rows) == 12 and {"x", "y", "kind", "value", "worker", "duration_s"} <= set(rows[0])


def test_watch_follows_a_running_study_until_done(sqlite_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, sqlite_url, static={"sleep_s": 0.2}, study_={"n_trials": 8})
    worker = start_worker("--idle-exit", "2", url=sqlite_url)
    result = run_cli("hpo-inspect", name, "--watch", url=sqlite_url, timeout=120)
    assert worker.wait(timeout=60) == 0
    assert result.returncode == 0
    assert "8/8" in result.stdout and "state done" in result.stdout


def test_watch_of_a_stopped_study_waits_for_its_running_trials(
    sqlite_url: str, tmp_path: Path
) -> None:
    name = create_sleepy(tmp_path, sqlite_url, 3, 20)
    worker = start_worker(url=sqlite_url)
    wait_for_a_trial(tmp_path)
    watching = subprocess.Popen(
        [str(BIN / "hpo-inspect"), name, "--watch", "--top", "3"], cwd=ROOT,
        env=cli_env(sqlite_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert run_cli("hpo-coordinator", "stop", name, url=sqlite_url).returncode == 0
        out, err = watching.communicate(timeout=60)
    finally:
        watching.kill()
    assert watching.returncode == 0, err
    # it ended once the running trial had finished, and shows the best trials, not "top 0"
    assert "state stopped" in out and "RUNNING 0" in out and "COMPLETE 0" not in out
    assert "top 1" in out or "top 2" in out or "top 3" in out
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


def test_create_wait_shows_progress_then_prints_the_name(sqlite_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(study_={"n_trials": 5}))
    worker = start_worker("--idle-exit", "10", url=sqlite_url)
    result = run_cli("hpo-coordinator", "create", str(path), "--wait", url=sqlite_url, timeout=120)
    worker.send_signal(15)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "test-study"
    assert "5/5" in result.stderr and "state done" in result.stderr


def test_worker_json_logs_one_object_per_trial(sqlite_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, sqlite_url, study_={"n_trials": 3})
    log = tmp_path / "w.log"
    worker = start_worker("--idle-exit", "1", "--log-format", "json", url=sqlite_url, log=log)
    assert worker.wait(timeout=60) == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    trials = [e for e in events if "trial" in e]
    assert [e["trial"] for e in trials] == [0, 1, 2]
    assert {e["study"] for e in trials} == {name} and all(e["state"] == "COMPLETE" for e in trials)
    assert all(isinstance(e["values"][0], float) and e["duration_s"] >= 0 for e in trials)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_optuna_dashboard_lists_the_pool_study(pg_url: str, tmp_path: Path) -> None:
    from optuna_dashboard import wsgi

    name = create(tmp_path, pg_url, study_={"n_trials": 4})
    assert start_worker("--idle-exit", "1", url=pg_url).wait(timeout=60) == 0
    server = make_server("127.0.0.1", 0, wsgi(pg_url), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=30))[
            "study_summaries"
        ]
        [study] = [s for s in studies if s["study_name"] == name]
        detail = json.load(
            urllib.request.urlopen(f"{base}/api/studies/{study['study_id']}", timeout=30)
        )
        assert len(detail["trials"]) == 4
        assert all(t["state"] == "Complete" for t in detail["trials"])
    finally:
        server.shutdown()


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_inspect_ranks_in_the_database_as_optuna_does(
    storage_url: str, tmp_path: Path, direction: str
) -> None:
    """The summary's best and top come from SQL (a 5000-trial study is not read whole), in
    Optuna's order: infinities at the ends, ties by trial number; the counts and workers too."""
    path = write_config(
        tmp_path / "c.yaml", make_config(study_={"direction": direction, "n_trials": 10})
    )
    storage = open_storage(storage_url, create_schema=True)
    create_study(storage, load_config(path), check_session=False)
    study = optuna.load_study(study_name="test-study", storage=storage_url)
    dist = optuna.distributions.FloatDistribution(-5.0, 5.0)
    for value in (2.0, float("inf"), -1.0, float("-inf"), 2.0, 0.5):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.0},
                distributions={"x": dist},
                value=value,
                user_attrs={"worker": "w1"},
            )  # fmt: skip
        )
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    summary = summarize(storage, "test-study", top=6, all_trials=False)
    expected = sorted(
        (t for t in study.trials if t.state.name == "COMPLETE"),
        key=lambda t: ((t.value if direction == "minimize" else -t.value), t.number),
    )
    assert [t["number"] for t in summary["top"]] == [t.number for t in expected]
    assert summary["best"][0]["number"] == study.best_trial.number
    assert summary["counts"]["COMPLETE"] == 6 and summary["counts"]["FAIL"] == 1
    assert summary["workers"] == {"w1": 6, "unknown": 1}
    assert "trials" not in summary
    storage.engine.dispose()


def test_one_trial_in_full_and_the_best_config(sqlite_url: str, tmp_path: Path) -> None:
    space = {"x": {"type": "float", "low": 0.5, "high": 5.0},
             "model": {"hidden": {"type": "int", "low": 1, "high": 4}}}  # fmt: skip
    name = create(
        tmp_path, sqlite_url, session="tests.sessions:uses_the_trial_context",
        search_space=space, static={"epochs": 3}, study_={"n_trials": 3},
    )  # fmt: skip
    assert start_worker("--idle-exit", "1", url=sqlite_url).wait(timeout=120) == 0
    out = run_cli("hpo-inspect", name, "--trial", "1", "--format", "json", url=sqlite_url)
    detail = json.loads(out.stdout)
    assert detail["number"] == 1 and detail["state"] == "COMPLETE" and detail["values"] == [1.0]
    assert detail["cfg"] == {"epochs": 3, **detail["params_nested"]}
    assert set(detail["cfg"]["model"]) == {"hidden"} and detail["attempt"] == 0
    # what the session recorded through hpo_framework.trial(), beside the framework's own
    assert detail["attributes"] == {
        "accuracy": 0.75, "seen": {"study": name, "attempt": 0, "worker": detail["worker"]}
    }  # fmt: skip
    text = run_cli("hpo-inspect", name, "--trial", "1", url=sqlite_url).stdout
    assert "trial 1  state COMPLETE  value 1" in text and "accuracy: 0.75" in text
    best = tmp_path / "best.yaml"
    result = run_cli("hpo-inspect", name, "--best-config", str(best), url=sqlite_url)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(best.read_text())
    assert cfg["epochs"] == 3 and set(cfg) == {"epochs", "x", "model"}  # trial 0 scored 0.0
    missing = run_cli("hpo-inspect", name, "--trial", "9", url=sqlite_url)
    assert missing.returncode == 1 and missing.stderr == f"Error: study {name!r} has no trial 9\n"


def test_plot_draws_the_intermediate_values_a_session_reports(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    config = make_config(search_space=SPACE, study_={"n_trials": 4})
    run_hpo(sessions.reports_steps, write_config(tmp_path / "c.yaml", config), url)
    result = run_cli("hpo-inspect", "test-study", "--plot", str(tmp_path / "p"), url=url)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p" / "intermediate.png").stat().st_size > 10_000
    assert "Intermediate values" in (tmp_path / "p" / "index.html").read_text()


def test_every_logged_value_is_kept_with_its_step_and_read_back_after_the_study(
    storage_url: str, tmp_path: Path
) -> None:
    name = create(
        tmp_path, storage_url, session="tests.sessions:logs_history", study_={"n_trials": 3}
    )
    assert start_worker("--idle-exit", "1", url=storage_url).wait(timeout=120) == 0
    detail = json.loads(
        run_cli("hpo-inspect", name, "--trial", "0", "--format", "json", url=storage_url).stdout
    )
    x = detail["params"]["x"]
    history = detail["metrics"]
    assert [(p["step"], p["value"]) for p in history["epoch"]] == [(e, e) for e in range(4)]
    assert all(type(p["value"]) is int for p in history["epoch"])  # an int stays an int
    assert [p["value"] for p in history["loss"]] == pytest.approx(
        [x**2 / (e + 1) for e in range(4)]
    )
    assert history["note_free"] == [
        {"step": None, "value": 1.5, "at": history["note_free"][0]["at"]}
    ]
    assert detail["attributes"]["loss"] == pytest.approx(
        x**2 / 4
    )  # the last one, for the dashboard
    text = run_cli("hpo-inspect", name, "--trial", "0", url=storage_url).stdout
    assert "  epoch: 0:0 1:1 2:2 3:3" in text
    # the long form: one row per trial, metric and step, as JSON and CSV
    rows = json.loads(
        run_cli("hpo-inspect", name, "--metrics", "--format", "json", url=storage_url).stdout
    )
    assert len(rows) == 3 * 9 and {r["trial"] for r in rows} == {0, 1, 2}
    csv_text = run_cli("hpo-inspect", name, "--metrics", "--format", "csv", url=storage_url).stdout
    assert (
        csv_text.splitlines()[0] == "trial,metric,step,value,at"
        and len(csv_text.splitlines()) == 28
    )
    plotted = run_cli("hpo-inspect", name, "--plot", str(tmp_path / "p"), url=storage_url)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "p" / "metrics.png").stat().st_size > 10_000
    assert "Logged metrics" in (tmp_path / "p" / "index.html").read_text()
    # deleting the study takes its histories with it
    assert run_cli("hpo-coordinator", "delete", name, "--yes", url=storage_url).returncode == 0
    engine = sa.create_engine(storage_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from hpo_metrics")).scalar() == 0
    engine.dispose()


def test_watch_counts_from_the_study_start_and_shows_a_running_trials_last_step(
    tmp_path: Path, sqlite_url: str
) -> None:
    from datetime import datetime, timedelta, timezone

    from hpo_framework.views.watch import timing

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    summary = {"started": now - timedelta(seconds=100), "budget": 10, "finished": 5}
    assert timing(summary) == "elapsed 0:01:40  ETA 0:01:40"  # 5 more at 20 s each
    assert timing({**summary, "started": None}) == "elapsed -:--:--  ETA -:--:--"
    name = create(
        tmp_path, sqlite_url, session="tests.sessions:reports_then_waits",
        static={"dir": str(tmp_path)}, study_={"n_trials": 1},
    )  # fmt: skip
    worker = start_worker("--idle-exit", "1", url=sqlite_url)
    wait_until("a trial that reported", lambda: any(tmp_path.glob("reported-*")))
    shown = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=sqlite_url).stdout)
    (running,) = shown["running"]
    assert running["last_step"] == 2 and running["last_value"] == 8.0
    assert shown["started"] is not None
    (tmp_path / "go").touch()
    assert worker.wait(timeout=60) == 0


def test_parallel_coordinates_and_slices_read_as_a_person_reads_them() -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection, PathCollection
    from matplotlib.ticker import MaxNLocator

    from hpo_framework.views.plots import _readable_parallel, _readable_slice

    def objective(trial: optuna.Trial) -> float:
        opt = trial.suggest_categorical("opt", ["sgd", "adam"])
        decay = trial.suggest_float("weight_decay", 0.0, 0.01, step=0.001)
        m = trial.suggest_float("momentum", 0.0, 0.9) if opt == "sgd" else 0.0
        return decay + m

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=12)
    vis = optuna.visualization.matplotlib
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel = vis.plot_parallel_coordinate(study).get_figure()
        slices = vis.plot_slice(study)[0].get_figure()
    _readable_parallel(parallel, plt)
    labels = [t.get_text() for ax in parallel.axes for t in ax.get_yticklabels()]
    assert "(not used)" in labels and "None" not in labels  # momentum under adam
    lines = [c for ax in parallel.axes for c in ax.collections if isinstance(c, LineCollection)]
    assert lines and all(c.get_cmap().name.startswith("viridis") for c in lines)
    _readable_slice(slices, plt)
    decay = next(ax for ax in slices.axes if ax.get_xlabel() == "weight_decay")
    assert isinstance(decay.xaxis.get_major_locator(), MaxNLocator)  # 4 ticks, not 8 run together
    points = [c for ax in slices.axes for c in ax.collections if isinstance(c, PathCollection)]
    assert points and all(c.get_cmap().name == "viridis" for c in points)
    plt.close("all")
