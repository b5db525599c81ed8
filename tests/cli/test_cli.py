"""The three commands as a user types them: exact output, exit codes, no tracebacks."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import hpo_framework
from hpo_framework.cli.commands import coordinator, inspect_command
from tests.conftest import (
    BIN,
    ROOT,
    cli_env,
    free_port,
    make_config,
    run_cli,
    start_worker,
    write_config,
)
from tests.pool_helpers import counts, create, wait_until


def test_create_prints_the_study_name_last(storage_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(enqueue=[{"x": 1.0}]))
    result = run_cli("hpo-coordinator", "create", str(path), url=storage_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "test-study"
    assert "budget 6, 1 enqueued point(s), session tests.sessions:quadratic" in lines[0]
    assert lines[1] == f"start workers: HPO_STORAGE={storage_url} hpo-worker"  # the next step


def test_create_twice_is_an_error_unless_resume_with_the_same_config(
    sqlite_url: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "c.yaml", make_config())
    assert run_cli("hpo-coordinator", "create", str(path), url=sqlite_url).returncode == 0
    again = run_cli("hpo-coordinator", "create", str(path), url=sqlite_url)
    assert again.returncode == 2
    assert again.stderr == (
        f"Error: study 'test-study' already exists in {sqlite_url}; use --resume to continue it "
        "with the same config, or --name to create another\n"
    )
    resumed = run_cli("hpo-coordinator", "create", str(path), "--resume", url=sqlite_url)
    assert resumed.returncode == 0 and resumed.stdout.splitlines()[-1] == "test-study"
    write_config(path, make_config(study_={"n_trials": 9}))  # a limit: changed, and resumed
    raised = run_cli("hpo-coordinator", "create", str(path), "--resume", url=sqlite_url)
    assert raised.returncode == 0, raised.stderr
    assert "budget 9" in raised.stdout
    write_config(path, make_config(static={"epochs": 3}))  # what the study is: refused
    changed = run_cli("hpo-coordinator", "create", str(path), "--resume", url=sqlite_url)
    assert changed.returncode == 2
    assert "was created from a different config (static.epochs differ)" in changed.stderr
    other = run_cli("hpo-coordinator", "create", str(path), "--name", "second", url=sqlite_url)
    assert other.returncode == 0 and other.stdout.splitlines()[-1] == "second"


def test_create_refuses_a_session_outside_the_allowed_modules(
    sqlite_url: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(session="os.path:join"))
    result = run_cli("hpo-coordinator", "create", str(path), url=sqlite_url)
    assert result.returncode == 2
    assert result.stderr == (
        f"Error: {path}: session: session 'os.path:join': module 'os.path' is outside the allowed "
        "prefixes (experiments, tests.sessions, tests.broken_session); "
        "set HPO_SESSION_MODULES to allow it\n"
    )


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("tests.sessions:nope", "module 'tests.sessions' has no 'nope'"),
        (
            "tests.sessions:NOT_CALLABLE",
            "session 'tests.sessions:NOT_CALLABLE': 'NOT_CALLABLE' is not a public function",
        ),
        ("tests.sessions:_misbehave_if_negative", "names a private function"),
        ("tests.sessions:__class__", "names a private function"),
        (
            "tests.sessions:report",  # imported there, defined in hpo_framework
            "'report' is defined in 'hpo_framework.session.reporting', "
            "outside the allowed prefixes",
        ),
        (
            "tests.broken_session:f",
            "cannot import 'tests.broken_session': RuntimeError: this module is broken on purpose",
        ),
        (
            "tests.sessions.missing:f",
            "cannot import 'tests.sessions.missing': ModuleNotFoundError",
        ),
    ],
)
def test_create_refuses_a_session_that_cannot_be_imported(
    sqlite_url: str, tmp_path: Path, ref: str, reason: str
) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(session=ref))
    result = run_cli("hpo-coordinator", "create", str(path), url=sqlite_url)
    assert result.returncode == 2 and reason in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "hpo.db").exists()  # refused before the storage: no tables made


def test_check_checks_as_create_does_and_writes_nothing(sqlite_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config())
    result = run_cli("hpo-coordinator", "check", str(path), "--set", "study.n_trials=9")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{path}: ok: study 'test-study', budget 9, 1 searched parameter(s), sampler tpe, "
        "session tests.sessions:quadratic\n"
    )
    bad = write_config(tmp_path / "bad.yaml", make_config(session="tests.sessions:missing"))
    refused = run_cli("hpo-coordinator", "check", str(bad), url=sqlite_url)
    assert refused.returncode == 2 and "has no 'missing'" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert not (tmp_path / "hpo.db").exists()


def test_inspect_json_has_the_documented_keys(pg_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, pg_url, study_={"n_trials": 4})
    assert start_worker("--idle-exit", "1", url=pg_url).wait(timeout=60) == 0
    result = run_cli("hpo-inspect", name, "--format", "json", url=pg_url)
    data = json.loads(result.stdout)
    assert {
        "study",
        "directions",
        "state",
        "budget",
        "counts",
        "best",
        "trials",
        "workers",
    } <= set(data)
    assert data["state"] == "done" and data["budget"] == 4 and data["directions"] == ["minimize"]
    assert data["counts"] == {"COMPLETE": 4, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    assert set(data["best"][0]) == {"number", "values", "params", "params_nested"}
    trial = data["trials"][0]
    assert {"number", "state", "values", "params", "worker", "duration_s", "error"} <= set(trial)
    assert sum(data["workers"].values()) == 4


def test_inspect_table_csv_and_study_list(sqlite_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, sqlite_url, study_={"n_trials": 3})
    assert start_worker("--idle-exit", "1", url=sqlite_url).wait(timeout=60) == 0
    table = run_cli("hpo-inspect", name, url=sqlite_url).stdout
    assert "state done" in table and "COMPLETE 3" in table and "best trial" in table
    rows = list(
        csv.DictReader(
            io.StringIO(run_cli("hpo-inspect", name, "--format", "csv", url=sqlite_url).stdout)
        )
    )
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    assert all(-5.0 <= float(r["x"]) <= 5.0 for r in rows)
    listing = run_cli("hpo-inspect", url=sqlite_url).stdout
    assert name in listing and "3/3" in listing and "done" in listing
    assert run_cli("hpo-coordinator", "list", url=sqlite_url).stdout == listing


def test_best_parameters_are_shown_nested_as_cfg_has_them(sqlite_url: str, tmp_path: Path) -> None:
    space = {"x": {"type": "float", "low": -5.0, "high": 5.0},
             "model": {"hidden": {"type": "int", "low": 1, "high": 4}}}  # fmt: skip
    name = create(tmp_path, sqlite_url, search_space=space, study_={"n_trials": 3})
    assert start_worker("--idle-exit", "1", url=sqlite_url).wait(timeout=60) == 0
    best = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=sqlite_url).stdout)[
        "best"
    ][0]
    hidden = best["params"]["model.hidden"]  # Optuna's flat name, as Optuna's tools show it
    assert best["params_nested"] == {"x": best["params"]["x"], "model": {"hidden": hidden}}
    assert hpo_framework.unflatten(best["params"]) == best["params_nested"]
    table = run_cli("hpo-inspect", name, url=sqlite_url).stdout
    assert f'"model": {{"hidden": {hidden}}}' in table


def test_no_command_prints_a_password(pg_url: str, tmp_path: Path) -> None:
    url = (
        sa.engine.make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    )
    path = write_config(tmp_path / "c.yaml", make_config())
    outputs = [
        run_cli("hpo-coordinator", "create", str(path), url=url),
        run_cli("hpo-coordinator", "create", str(path), url=url),
        run_cli("hpo-inspect", "missing", url=url),
        run_cli("hpo-worker", "--idle-exit", "1", url=url),
        run_cli("hpo-inspect", url="postgresql+psycopg2://u:s3cret-pw@127.0.0.1:1/x"),
    ]
    for result in outputs:
        assert "s3cret-pw" not in result.stdout + result.stderr
    assert "***" in outputs[1].stderr  # the "already exists" error names the redacted URL


def test_inspect_unknown_study_is_a_one_line_error(sqlite_url: str, tmp_path: Path) -> None:
    create(tmp_path, sqlite_url, name="linear-regression")
    create(tmp_path, sqlite_url, name="other")
    result = run_cli("hpo-inspect", "nope", url=sqlite_url)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: no study named 'nope' in this storage; studies here: linear-regression, other\n"
    )
    result = run_cli("hpo-inspect", "linear-regresion", url=sqlite_url)
    assert result.stderr == (
        "Error: no study named 'linear-regresion' in this storage; "
        "did you mean 'linear-regression'?\n"
    )


def test_bad_storage_url_is_a_one_line_error(tmp_path: Path) -> None:
    for command in (["hpo-inspect"], ["hpo-worker"], ["hpo-coordinator", "list"]):
        result = run_cli(*command, url="not a url")
        assert result.returncode == 1, command
        assert result.stderr == "Error: storage URL 'not a url' is not a database URL\n"


def test_delete_removes_the_study(sqlite_url: str, tmp_path: Path) -> None:
    create(tmp_path, sqlite_url, name="doomed")
    result = run_cli("hpo-coordinator", "delete", "doomed", "--yes", url=sqlite_url)
    assert result.stdout == "study 'doomed' deleted\n"
    assert "doomed" not in run_cli("hpo-inspect", url=sqlite_url).stdout


@pytest.mark.parametrize("command", [coordinator, inspect_command])
def test_every_command_has_help(command) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    commands = [[]] + [[name] for name in getattr(command, "commands", {})]
    for args in commands:
        result = runner.invoke(command, [*args, "--help"], catch_exceptions=False)
        assert result.exit_code == 0 and "Usage:" in result.output
        assert len(result.output.splitlines()) > 3


def test_worker_help_documents_signals() -> None:
    from workers.cli import main

    result = CliRunner().invoke(main, ["--help"], catch_exceptions=False)
    assert "first SIGTERM/SIGINT finishes the running trial" in " ".join(result.output.split())


def test_create_set_overrides_config_values(sqlite_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(static={"epochs": 20}))
    result = run_cli(
        "hpo-coordinator", "create", str(path), "--set", "study.n_trials=3",
        "--set", "static.epochs=2", "--set", "static.data.seed=7", url=sqlite_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "budget 3," in result.stdout
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        stored = json.loads(conn.execute(sa.text("select config_json from hpo_studies")).scalar())
    engine.dispose()
    assert stored["study"]["n_trials"] == 3
    assert stored["static"] == {"epochs": 2, "data": {"seed": 7}}
    assert path.read_text() == write_config(tmp_path / "same.yaml", make_config(
        static={"epochs": 20})).read_text()  # fmt: skip


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("study.n_trials=ten", "Error: {path} (with --set): study.n_trials: must be an integer "
         ">= 1 or null, got 'ten'"),
        ("static", "Error: --set: expected KEY.PATH=VALUE, got 'static'"),
        ("study.name.x=1", "Error: --set: study.name.x: study.name is 'test-study', "
         "not a mapping"),
        ("static.a=[1", "Error: --set static.a: line 1: YAML syntax error: "),
    ],
)  # fmt: skip
def test_create_set_errors_are_one_line_and_write_nothing(
    assignment: str, message: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "c.yaml", make_config())
    db = tmp_path / "hpo.db"
    result = run_cli(
        "hpo-coordinator", "create", str(path), "--set", assignment, url=f"sqlite:///{db}"
    )
    assert result.returncode == 2
    assert result.stderr.startswith(message.format(path=path)), result.stderr
    assert len(result.stderr.splitlines()) == 1 and not db.exists()


@pytest.mark.parametrize("command", ["hpo-coordinator", "hpo-inspect", "hpo-worker"])
def test_every_command_has_version(command: str) -> None:
    result = run_cli(command, "--version")
    assert result.returncode == 0
    assert result.stdout == f"{command} (hpo) {hpo_framework.__version__}\n"


def test_dashboard_serves_an_empty_database_and_stops_on_sigterm(tmp_path: Path) -> None:
    """optuna-dashboard over a database no study was created in yet (it crashed there)."""
    port = free_port()
    db = tmp_path / "empty.db"
    db.touch()  # an empty database (a missing file is refused: see the test below)
    proc = subprocess.Popen(
        [str(BIN / "hpo-coordinator"), "dashboard", "--port", str(port)],
        env=cli_env(f"sqlite:///{db}"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/api/studies"

        def serving() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return json.loads(response.read())["study_summaries"] == []
            except OSError:
                return False

        wait_until("the dashboard", serving, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_names_and_errors_that_look_like_markup_are_printed_as_written(
    sqlite_url: str, tmp_path: Path
) -> None:
    name = "exp[/v2] {x}"
    create(
        tmp_path, sqlite_url, name=name, session="tests.sessions:raises_markup",
        study_={"n_trials": 2, "max_failed_trials": 2, "max_retries": 0},
    )  # fmt: skip
    assert start_worker("--idle-exit", "1", url=sqlite_url).wait(timeout=60) == 0
    for args in ([name], [name, "--watch"], ["--format", "table"]):
        result = run_cli("hpo-inspect", *args, url=sqlite_url)
        assert result.returncode == 0, result.stderr
        assert name in result.stdout
    detail = run_cli("hpo-inspect", name, url=sqlite_url).stdout
    assert "FileNotFoundError: no such file [/data/train] [bold]" in detail
    listed = run_cli("hpo-coordinator", "list", url=sqlite_url)
    assert listed.returncode == 0 and name in listed.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["hpo-inspect"],
        ["hpo-inspect", "s"],
        ["hpo-coordinator", "list"],
        ["hpo-coordinator", "stop", "s"],
    ],
)
def test_reading_a_database_without_hpo_studies_is_one_line_and_creates_nothing(
    args: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.db"
    result = run_cli(*args, url=f"sqlite:///{missing}")
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: no database at sqlite:///{missing}: create one with "
        "`hpo-coordinator create config.yaml`, or pass --storage\n"
    )
    assert not missing.exists()
    plain = tmp_path / "plain.db"  # a database of plain Optuna, no hpo tables
    optuna.create_study(study_name="p", storage=f"sqlite:///{plain}")
    result = run_cli(*args, url=f"sqlite:///{plain}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: no hpo studies in sqlite:///{plain} (no hpo tables)")


def test_dashboard_on_a_missing_sqlite_file_is_one_line_and_creates_nothing(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [str(BIN / "hpo-coordinator"), "dashboard", "--port", str(free_port())],
        cwd=tmp_path, env={k: v for k, v in cli_env().items() if k != "HPO_STORAGE"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "Error: no database at sqlite:///hpo.db: create one with "
        "`hpo-coordinator create config.yaml`, or pass --storage\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_postgres_scheme_gets_a_hint(tmp_path: Path) -> None:
    result = run_cli("hpo-inspect", url="postgres://me@db-host/hpo")
    assert result.returncode == 1
    assert result.stderr == (
        "Error: storage URL 'postgres://me@db-host/hpo': SQLAlchemy does not know "
        "'postgres://'; write postgresql+psycopg2://...\n"
    )


def test_inspect_writes_the_table_to_output_too(sqlite_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, sqlite_url, study_={"n_trials": 2})
    assert start_worker("--idle-exit", "1", url=sqlite_url).wait(timeout=60) == 0
    out = tmp_path / "summary.txt"
    result = run_cli("hpo-inspect", name, "-o", str(out), url=sqlite_url)
    assert result.returncode == 0 and result.stdout == ""
    assert out.read_text().startswith(f"{name}  state done")


def test_storage_help_mentions_the_config_only_where_it_is_read() -> None:
    def help_text(*args: str) -> str:
        return " ".join(run_cli(*args, "--help").stdout.split())

    assert "default: the config's storage:" in help_text("hpo-coordinator", "create")
    for args in (["hpo-inspect"], ["hpo-coordinator", "list"], ["hpo-worker"]):
        assert "config's" not in help_text(*args)


def test_idle_exit_does_not_count_the_wait_for_the_coordinator(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The `make demo` shape with a coordinator slower than --idle-exit: the study is served."""
    worker = start_worker("--idle-exit", "1", url=sqlite_url, log=tmp_path / "w.log")
    try:
        wait_until(
            "the worker waiting",
            lambda: "no study created yet" in (tmp_path / "w.log").read_text(),
            timeout=60,
        )
        time.sleep(1.5)  # longer than --idle-exit, on purpose: this wait must not count
        assert worker.poll() is None
        name = create(tmp_path, sqlite_url, study_={"n_trials": 3})
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert counts(sqlite_url, name)["COMPLETE"] == 3


def test_idle_exit_on_an_unreachable_database_fails_in_one_line(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://u@127.0.0.1:{free_port()}/x"
    result = run_cli("hpo-worker", "--idle-exit", "1", url=url, timeout=120)
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert "database unreachable" in error and "(for over --idle-exit 1.0s)" in error


def test_secrets_in_urls_are_never_printed_nor_stored(pg_url: str, tmp_path: Path) -> None:
    secret_url = f"{pg_url}?password=s3cret-q"
    config = make_config(storage="postgresql+psycopg2://u:s3cret-c@db-host/x")
    path = write_config(tmp_path / "c.yaml", config)
    first = run_cli("hpo-coordinator", "create", str(path), url=secret_url)
    again = run_cli("hpo-coordinator", "create", str(path), url=secret_url)
    assert first.returncode == 0 and again.returncode == 2
    for result in (first, again):
        assert "s3cret" not in result.stdout + result.stderr
    assert "password=***" in first.stdout
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("select config_json from hpo_studies")).scalar_one()
        attrs = conn.execute(sa.text("select key from study_user_attributes")).scalars().all()
    engine.dispose()
    assert "s3cret" not in stored and "u:***@db-host" in stored
    assert set(attrs) == {"hpo_session", "hpo_config_hash", "hpo_version"}


@pytest.mark.parametrize(
    ("password", "says"),
    [
        ("Secr3t@pa:ss/w0rd", "is not a database URL"),  # a parser splits it into a bad port
        (
            "Secr3t@pass/w0rd",
            "cannot open storage postgresql+psycopg2://postgres:***@127.0.0.1:1/",
        ),
    ],
)
def test_a_password_with_unencoded_at_colon_or_slash_is_hidden_whole(
    password: str, says: str
) -> None:
    url = f"postgresql+psycopg2://postgres:{password}@127.0.0.1:1/postgres"
    result = run_cli("hpo-inspect", url=url, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert says in line and "postgres:***@127.0.0.1:1/postgres" in line
    for piece in ("Secr3t", "pa:ss", "w0rd"):
        assert piece not in line
    assert "percent-encode them in the URL, @ as %40" in line


def test_run_and_create_wait_exit_3_when_the_study_ends_failed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    failing = make_config(
        session="tests.sessions:raises", study_={"n_trials": 4, "max_failed_trials": 2}
    )
    ran = run_cli(
        "hpo-coordinator", "run", str(write_config(tmp_path / "f.yaml", failing)), url=url
    )
    assert ran.returncode == 3, ran.stderr
    assert ran.stderr.strip().splitlines()[-1] == (
        "Error: study 'test-study' failed: max_failed_trials reached"
    )
    fine = make_config(study_={"name": "fine", "n_trials": 2})
    ok = run_cli("hpo-coordinator", "run", str(write_config(tmp_path / "ok.yaml", fine)), url=url)
    assert ok.returncode == 0, ok.stderr
    waited = make_config(
        session="tests.sessions:raises",
        study_={"name": "waited", "n_trials": 4, "max_failed_trials": 1},
    )
    worker = start_worker("--idle-exit", "3", url=url)
    created = run_cli(
        "hpo-coordinator", "create", str(write_config(tmp_path / "w.yaml", waited)), "--wait",
        url=url,
    )  # fmt: skip
    assert created.returncode == 3 and created.stdout.splitlines()[-1] == "waited"
    assert "Error: study 'waited' failed: max_failed_trials reached" in created.stderr
    assert worker.wait(timeout=60) == 0


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run a command with a pseudo-terminal as its stdout and stderr; what it wrote there."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        args, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env={**env, "COLUMNS": "120", "TERM": "xterm"},
    )  # fmt: skip
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other side closed: the command ended
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.kill()
        proc.wait()
    return out.decode(errors="replace")


def test_run_shows_a_progress_bar_on_a_terminal_and_plain_lines_elsewhere(
    tmp_path: Path,
) -> None:
    config = make_config(study_={"n_trials": 3})
    path = str(write_config(tmp_path / "c.yaml", config))
    env = cli_env(f"sqlite:///{tmp_path / 'tty.db'}")
    shown = _on_a_terminal([str(BIN / "hpo-coordinator"), "run", path], env)
    assert "3/3" in shown and "best " in shown and "ETA" in shown, shown[-2000:]
    plain = run_cli("hpo-coordinator", "run", path, url=f"sqlite:///{tmp_path / 'pipe.db'}")
    assert plain.returncode == 0 and "ETA" not in plain.stderr
    assert plain.stderr.count("state=COMPLETE") == 3  # one line per trial, as before
