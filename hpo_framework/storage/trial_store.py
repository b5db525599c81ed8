"""Optuna's storage as a worker uses it: the trials this process runs, served from memory.

Through Optuna's own storage a trial costs about 50 SQL statements, most of them re-reading
the one running trial (six queries each time: when the ``Trial`` is made, twice in ``tell``)
and syncing the study's trial list twice per ``ask``. ``TrialStore`` is Optuna's per-study
trial cache (``_CachedStorage``) with three changes, all for the trials *this process* runs:

* **Own trials from memory.** The worker running a trial is the only one that writes its
  parameters, attributes, reports and result. So ``get_trial`` answers from a copy kept up
  to date by those writes. Another worker can only fail the trial as stale: every write
  here is conditional on the trial still being RUNNING and raises Optuna's
  ``UpdateFinishedTrialError`` when it is not, exactly as Optuna's own writes do.
* **One sync per ask.** While a trial's parameters are sampled (``one_sync``), the study's
  trial list is read from the database once: the sampler's second read in the same ask
  (TPE's constant liar) reuses the first. Every other read syncs, as in Optuna.
* **The sync in one statement** (PostgreSQL, ``trial_sync``). Optuna reads the trial list
  with six statements in one transaction and builds its trials in between; here one query
  returns the trials with their child rows, in autocommit. Besides saving five statements a
  sync, no transaction stays open while a process starved of CPU builds the trials: 128
  workers on two cores used to sit idle in Optuna's transaction past the server's
  ``idle_in_transaction_session_timeout`` and lose their connection mid-sync.
* **Four transactions a trial** (PostgreSQL). Claiming the ticket and creating its trial
  (with its attributes and the ticket's binding) are one transaction; the sync another (in
  autocommit); the parameters and attributes sampled in one ask are written together as
  sampling ends (``one_sync``), each one conditional upsert; and the result spends its
  ticket in the transaction that records it. Optuna's path takes thirteen.

Every read and write here is a :func:`~hpo_framework.storage.database.retried` step: Optuna's
``Trial`` and sampler call it, and an outage is waited out inside, not by the caller. Starting
a trial (``begin``) and recording its result (``tell``) are steps of their own, replayed as
one unit, each idempotent after a lost answer.

Everything else is Optuna's. This leans on Optuna's private ``_CachedStorage`` and its table
models, pinned to the Optuna range in ``pyproject.toml``; ``tests/pool/test_db_cost.py``
counts the statements of a trial and compares what this writes with what Optuna reads back,
so an Optuna upgrade that changes them fails there first.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

import optuna
import sqlalchemy as sa
from optuna import distributions
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import insert as pg_insert

from hpo_framework import defaults
from hpo_framework.storage import metrics, trial_sync
from hpo_framework.storage.database import retried, without_waiting
from hpo_framework.storage.optuna_tables import has_waiting_trials
from hpo_framework.storage.optuna_tables import trial_params as _params
from hpo_framework.storage.optuna_tables import trial_system_attrs as _system_attrs
from hpo_framework.storage.optuna_tables import trial_user_attrs as _user_attrs
from hpo_framework.storage.optuna_tables import trial_values as _values
from hpo_framework.storage.optuna_tables import trials as _trials
from hpo_framework.storage.tickets import Tickets, claim_on, settle_on, trial_of_on
from hpo_framework.storage.trial_attrs import ERROR_ATTR, TICKET_ATTR, TRACEBACK_ATTR, WORKER_ATTR

#: How often a worker looks for a waiting trial that others keep popping first.
_POP_ROUNDS = 5


class Told(NamedTuple):
    """What ``TrialStore.tell`` did: the result kept, and its ticket settled with it."""

    kept: bool
    settled: bool


class TrialStore(_CachedStorage):
    """Optuna's trial cache over one ``RDBStorage``, with this process's trials in memory."""

    patient = True  # a worker's: every step waits out an outage

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(backend)
        self.engine = backend.engine
        self.pg = self.engine.dialect.name == "postgresql"
        self._own: dict[int, FrozenTrial] = {}
        self._reuse_sync = False
        self._synced = False
        self._starting: str | None = None  # the claim whose trial a try began to start
        self._pending: list[sa.Executable] | None = None  # writes held for one transaction
        self._settle_with: tuple[int, str] | None = None  # the ticket the result spends
        self._settled = False

    @retried("loading a study")
    def load_study(
        self, name: str, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner
    ) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self, sampler=sampler, pruner=pruner)

    # --- starting a trial ----------------------------------------------------------------------

    @retried("starting a trial")
    def begin(
        self, study_id: int, key: str, worker: str, grace: float, tickets: Tickets
    ) -> tuple[int | None, int | None]:
        """Claim a ticket and start its trial: ``(ticket, trial id)``; ``(None, None)`` if the
        study has no budget left, ``(ticket, None)`` if the ticket was recovered before its
        trial began. ``key`` makes the claim idempotent: a replay finds its own ticket, and
        the trial an earlier try made for it.

        On PostgreSQL, claiming and creating the trial are one transaction (unless a waiting
        trial is there to pop: then the pop is a second one)."""
        if not self.pg:
            ticket = tickets.claim(study_id, worker, grace, key)
            if ticket is None:
                return None, None
            return ticket, self.start(study_id, ticket, key, worker, tickets)
        try:
            return self._claim_and_create(study_id, key, worker, grace, tickets)
        except sa.exc.IntegrityError:
            # An earlier try of this key was still running at the server when this one
            # started; it has committed by now, so this finds its ticket (and trial).
            return self._claim_and_create(study_id, key, worker, grace, tickets)

    def _claim_and_create(
        self, study_id: int, key: str, worker: str, grace: float, tickets: Tickets
    ) -> tuple[int | None, int | None]:
        start = datetime.now()
        found = None
        with self.engine.begin() as conn:
            claimed = claim_on(conn, study_id, worker, grace, key)
            if claimed is None:
                return None, None
            ticket, replay = claimed
            if replay:  # an earlier try committed; its answer was lost
                found = trial_of_on(conn, ticket)
            row = (
                None
                if found is not None
                else self._create_on(conn, study_id, ticket, worker, start)
            )
        if found is not None:
            self.adopt(study_id, self._backend.get_trial(found))
            return ticket, found
        assert row is not None
        if row.trial_id is not None:
            self._adopt_new(study_id, row, start, ticket, worker)
            return ticket, int(row.trial_id)
        if row.waiting:
            return ticket, self._start(study_id, ticket, worker, tickets)
        return ticket, None

    @retried("starting a trial")
    def start(
        self, study_id: int, ticket: int, key: str, worker: str, tickets: Tickets
    ) -> int | None:
        """Take a waiting trial (an enqueued point or a retry) if any, else create a new one;
        either way bound to ``ticket``, and run by this process from now on. None if the
        ticket is no longer this worker's (recovered while it was frozen). ``key`` is the
        claim's, unique to this start: a replay of it looks for the trial a lost try made."""
        if self._starting == key:  # an earlier try may have committed; its answer was lost
            found = tickets.trial_of(ticket)
            if found is not None:
                self.adopt(study_id, self._backend.get_trial(found))
                return found
        self._starting = key
        return self._start(study_id, ticket, worker, tickets)

    def _start(self, study_id: int, ticket: int, worker: str, tickets: Tickets) -> int | None:
        for _ in range(_POP_ROUNDS):
            if self.pg:  # one transaction: create and bind, unless a trial is waiting
                started = self.start_new(study_id, ticket, worker)
                if started is not True:
                    return started
            elif not has_waiting_trials(self._backend, study_id):
                return self._create_and_bind(study_id, ticket, worker, tickets)
            popped = self._pop_waiting(study_id, ticket, worker, tickets)
            if popped is not None:
                return popped
            # Each waiting trial seen was popped by another worker first: look again.
        return None  # or this ticket was taken over, which makes every pop fail

    def _pop_waiting(
        self, study_id: int, ticket: int, worker: str, tickets: Tickets
    ) -> int | None:
        waiting = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in waiting:
            if tickets.pop_waiting(ticket, worker, trial._trial_id):
                running = copy.deepcopy(trial)
                running.state, running.datetime_start = TrialState.RUNNING, datetime.now()
                running.user_attrs[WORKER_ATTR] = worker
                self.adopt(study_id, running)
                return trial._trial_id
        return None

    def _create_and_bind(
        self, study_id: int, ticket: int, worker: str, tickets: Tickets
    ) -> int | None:
        """SQLite's way to a new trial: Optuna's steps, then the ticket's binding."""
        template = optuna.trial.create_trial(state=TrialState.WAITING)
        template.state = TrialState.RUNNING
        template.datetime_start = datetime.now()
        template.user_attrs = {WORKER_ATTR: worker}
        template.system_attrs = {TICKET_ATTR: ticket}
        trial = create_trial_once(self, study_id, template)
        if not tickets.bind(ticket, worker, trial._trial_id):
            # Recovered while this worker was frozen; the new trial is an orphan the sweep
            # of any worker fails (it has no parameters yet: nothing to re-queue).
            return None
        self.adopt(study_id, trial)
        return int(trial._trial_id)

    def start_new(self, study_id: int, ticket: int, worker: str) -> int | None | bool:
        """Create a RUNNING trial bound to ``ticket`` (PostgreSQL: one transaction).

        Returns the trial id; True if the study has a WAITING trial to pop instead (nothing is
        created); None if the ticket is no longer this worker's (recovered while this worker
        was frozen; nothing is created either).
        """
        start = datetime.now()
        with self.engine.begin() as conn:
            row = self._create_on(conn, study_id, ticket, worker, start)
        if row.trial_id is None:
            return True if row.waiting else None
        self._adopt_new(study_id, row, start, ticket, worker)
        return int(row.trial_id)

    @staticmethod
    def _create_on(
        conn: sa.Connection, study_id: int, ticket: int, worker: str, start: datetime
    ) -> Any:
        # The study's row serializes trial creation, as in Optuna: the number (Optuna's: the
        # count of the study's trials, so one past the highest) is read by the next
        # statement, a fresh snapshot under the lock.
        conn.execute(_LOCK_STUDY, {"s": study_id})
        return conn.execute(
            _CREATE_PG,
            {
                "s": study_id, "start": start, "ticket": ticket, "w": worker,
                "uk": WORKER_ATTR, "uv": json.dumps(worker),
                "yk": TICKET_ATTR, "yv": json.dumps(ticket),
            },
        ).one()  # fmt: skip

    def _adopt_new(
        self, study_id: int, row: Any, start: datetime, ticket: int, worker: str
    ) -> None:
        trial = FrozenTrial(
            number=int(row.number), state=TrialState.RUNNING, value=None,
            datetime_start=start, datetime_complete=None, params={}, distributions={},
            user_attrs={WORKER_ATTR: worker}, system_attrs={TICKET_ATTR: ticket},
            intermediate_values={}, trial_id=int(row.trial_id),
        )  # fmt: skip
        self.adopt(study_id, trial)

    def adopt(self, study_id: int, trial: FrozenTrial) -> None:
        """Run ``trial`` in this process: it is served from memory until the next one starts
        (a process runs one trial of a study at a time; ``tell`` reads it back when done)."""
        self._own = {trial._trial_id: trial}
        remember(self, study_id, trial)

    # --- the result ------------------------------------------------------------------------------

    @retried("saving a result")
    def tell(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        state: TrialState,
        values: list[float] | None,
        error: str | None,
        tb: str | None = None,
        *,
        spends: tuple[int, str] | None = None,
    ) -> Told:
        """Record a trial's result. ``kept`` is False if the trial had been finished by
        someone else (failed as stale while this worker was silent). ``spends`` names the
        ticket and its holder: on PostgreSQL a result with values spends the ticket in the
        same transaction (``settled``); otherwise the caller settles it."""
        self._settled, self._settle_with = False, spends
        try:
            if error is not None:
                self.set_trial_user_attr(
                    trial._trial_id, ERROR_ATTR, error[: defaults.ERROR_TEXT_MAX]
                )
            if tb:
                self.set_trial_user_attr(trial._trial_id, TRACEBACK_ATTR, tb[-8000:])
            try:
                study.tell(trial, values, state=state)
            except RuntimeError as e:
                # GridSampler calls Study.stop() once the grid is covered, which Optuna only
                # allows inside study.optimize; the result is stored before it raises, and the
                # budget (capped at the grid size) already ends the study.
                if "Study.stop" not in str(e):
                    raise
            return Told(True, self._settled)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            # Either our own earlier try committed before the connection dropped, or a live
            # worker failed this trial because our heartbeat stopped (e.g. SIGSTOP).
            stored = self._backend.get_trial(trial._trial_id)
            if stored.state != state:
                return Told(False, False)
            if state == TrialState.FAIL:  # the stale sweep writes its own error
                error_kept = (error or "")[: defaults.ERROR_TEXT_MAX]
                return Told(stored.user_attrs.get(ERROR_ATTR) == error_kept, False)
            return Told(values is None or stored.values == values, False)
        finally:
            self._settle_with = None

    @retried("logging metrics")
    def log_metrics(self, trial_id: int, step: int | None, values: Any) -> None:
        """A session's logged values, into their history (``hpo_metrics``)."""
        metrics.append(self.engine, trial_id, step, values)

    # --- reads ---------------------------------------------------------------------------------

    def get_trial(self, trial_id: int) -> FrozenTrial:
        own = self._own.get(trial_id)
        if own is not None:
            return copy.deepcopy(own)  # from memory: no database step (Optuna asks often)
        return self._read_trial(trial_id)

    @retried("reading a trial")
    def _read_trial(self, trial_id: int) -> FrozenTrial:
        return super().get_trial(trial_id)

    @contextmanager
    def one_sync(self) -> Iterator[None]:
        """Within this block the study's trial list is read from the database once, and (on
        PostgreSQL) the parameters and attributes sampled for this process's trial are
        written together, in one transaction, as the block ends."""
        self._reuse_sync, self._synced = True, False
        self._pending = [] if self.pg else None
        try:
            yield
        except Exception:
            pending, self._pending = self._pending, None
            if pending:  # what was sampled before the error: a retry of the point needs it
                with contextlib.suppress(Exception), without_waiting():
                    self._write_all(pending)
            raise
        else:
            pending, self._pending = self._pending, None
            if pending:
                self._write_all(pending)
        finally:
            self._reuse_sync, self._pending = False, None

    @retried("recording the sampled parameters")
    def _write_all(self, statements: list[sa.Executable]) -> None:
        """Conditional writes of the running trial, in one transaction; each must write a
        row (it is idempotent: an upsert), or the trial was failed meanwhile."""
        with self.engine.begin() as conn:
            for statement in statements:
                if conn.execute(statement).first() is None:
                    conn.rollback()
                    raise UpdateFinishedTrialError("the trial is no longer running")

    @retried("reading the study's trials")
    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        """Optuna's ``_CachedStorage`` sync; on PostgreSQL its read is ``trial_sync``'s."""
        if self._reuse_sync and self._synced and study_id in self._studies:
            return
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            if self.pg:
                trials = trial_sync.read_trials(
                    self.engine, study_id, study.unfinished_trial_ids, study.last_finished_trial_id
                )
            else:
                trials = self._backend._get_trials(
                    study_id,
                    states=None,
                    included_trial_ids=study.unfinished_trial_ids,
                    trial_id_greater_than=study.last_finished_trial_id,
                )
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:
                if not trial.state.is_finished():
                    study.unfinished_trial_ids.add(trial._trial_id)
                    continue
                study.last_finished_trial_id = max(study.last_finished_trial_id, trial._trial_id)
                study.unfinished_trial_ids.discard(trial._trial_id)
        self._synced = True

    # --- writes --------------------------------------------------------------------------------

    @retried("sampling a parameter")
    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: distributions.BaseDistribution,
    ) -> None:
        own = self._own.get(trial_id)
        study_id = self._trial_id_to_study_id_and_number.get(trial_id, (None, 0))[0]
        known = None if study_id is None else self._studies[study_id].param_distribution
        if own is None or not known or param_name not in known:
            # Optuna's path: it checks the distribution against the study's earlier records.
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        else:
            distributions.check_distribution_compatibility(known[param_name], distribution)
            columns = ["trial_id", "param_name", "param_value", "distribution_json"]
            row = sa.select(
                _trials.c.trial_id,
                sa.literal(param_name),
                sa.literal(param_value_internal, sa.Float),
                sa.literal(distributions.distribution_to_json(distribution)),
            ).where(_running(trial_id))
            if self.pg:  # an upsert: a replay after a lost answer writes the same row again
                insert = pg_insert(_params).from_select(columns, row)
                upsert = insert.on_conflict_do_update(
                    index_elements=["trial_id", "param_name"],
                    set_={"param_value": insert.excluded.param_value},
                ).returning(_params.c.param_id)
                if self._pending is not None:  # while sampling: written with the others
                    self._pending.append(upsert)
                elif not self._write(upsert):
                    raise UpdateFinishedTrialError(f"trial {trial_id} is no longer running")
            elif not self._write(
                _params.insert()
                .from_select(columns, row)
                .returning(_params.c.param_id)  # psycopg 3: no rowcount for INSERT ... SELECT
            ):
                raise UpdateFinishedTrialError(f"trial {trial_id} is no longer running")
        if own is not None:
            own.params[param_name] = distribution.to_external_repr(param_value_internal)
            own.distributions[param_name] = distribution

    @retried("saving a result")
    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        own = self._own.get(trial_id)
        if own is None or not state.is_finished():
            return super().set_trial_state_values(trial_id, state=state, values=values)
        now = datetime.now()
        if self.pg and values:
            if not self._end_with_values(trial_id, state, now, values):
                raise UpdateFinishedTrialError(f"trial {trial_id} is no longer running")
            own.state, own.datetime_complete, own.values = state, now, list(values)
            return True
        with self.engine.begin() as conn:
            ended = conn.execute(
                _trials.update()
                .where(_running(trial_id))
                .values(state=state, datetime_complete=now)
                .returning(_trials.c.trial_id)
            ).first()
            if ended is None:
                conn.rollback()
                raise UpdateFinishedTrialError(f"trial {trial_id} is no longer running")
            if values:
                rows = []
                for objective, value in enumerate(values):
                    stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                    rows.append(
                        {
                            "trial_id": trial_id,
                            "objective": objective,
                            "value": stored,
                            "value_type": kind,
                        }  # fmt: skip
                    )
                conn.execute(_values.insert(), rows)
        own.state, own.datetime_complete = state, now
        own.values = None if values is None else list(values)
        return True

    @retried("reporting a step")
    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        own = self._own.get(trial_id)
        if own is not None:
            own.intermediate_values[step] = intermediate_value

    @retried("recording an attribute")
    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._own.get(trial_id)
        if own is None or not self.pg:
            super().set_trial_user_attr(trial_id, key, value)
        else:
            self._set_attr(_user_attrs, trial_id, key, value)
        if own is not None:
            own.user_attrs[key] = value

    @retried("recording an attribute")
    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        own = self._own.get(trial_id)
        if own is None or not self.pg:
            super().set_trial_system_attr(trial_id, key, value)
        else:
            self._set_attr(_system_attrs, trial_id, key, value)
        if own is not None:
            own.system_attrs[key] = value

    def _set_attr(self, table: sa.Table, trial_id: int, key: str, value: Any) -> None:
        """An attribute of this process's running trial, set or replaced in one statement
        (Optuna: the trial's row read, then the attribute's)."""
        insert = pg_insert(table).from_select(
            ["trial_id", "key", "value_json"],
            sa.select(_trials.c.trial_id, sa.literal(key), sa.literal(json.dumps(value))).where(
                _running(trial_id)
            ),
        )
        upsert = insert.on_conflict_do_update(
            index_elements=["trial_id", "key"], set_={"value_json": insert.excluded.value_json}
        ).returning(table.c.trial_id)
        if self._pending is not None:  # while sampling: written with the parameters
            self._pending.append(upsert)
            return
        if not self._write(upsert):
            raise UpdateFinishedTrialError(f"trial {trial_id} is no longer running")

    def _end_with_values(
        self, trial_id: int, state: TrialState, now: datetime, values: Sequence[float]
    ) -> bool:
        """The trial finished and its values written in one statement; False if it was no
        longer running (then nothing is written)."""
        params: dict[str, Any] = {"t": trial_id, "state": state.name, "now": now}
        rows = []
        for i, value in enumerate(values):
            stored, kind = models.TrialValueModel.value_to_stored_repr(value)
            params.update({f"o{i}": i, f"v{i}": stored, f"k{i}": kind.name})
            rows.append(f"(:o{i}, CAST(:v{i} AS double precision), CAST(:k{i} AS trialvaluetype))")
        statement = sa.text(
            "WITH ended AS (UPDATE trials SET state = CAST(:state AS trialstate), "
            "datetime_complete = :now WHERE trial_id = :t AND state = 'RUNNING' "
            "RETURNING trial_id) "
            "INSERT INTO trial_values (trial_id, objective, value, value_type) "
            f"SELECT ended.trial_id, v.o, v.v, v.k FROM ended, (VALUES {', '.join(rows)}) "
            "AS v (o, v, k) RETURNING trial_id"
        )
        with self.engine.begin() as conn:
            if conn.execute(statement, params).first() is None:
                return False
            if self._settle_with is not None and state != TrialState.FAIL:
                ticket, worker = self._settle_with  # the result spends its ticket, atomically
                spent = settle_on(conn, ticket, worker, returned=False, failure=False)
                self._settled = spent is not None
            return True

    def _write(self, statement: sa.Executable) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(statement).first() is not None


# The rest of Optuna's reads a sampler, a pruner or ``Study`` may make, as retried steps too.
for _name in (
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_n_trials", "get_best_trial",
    "get_trial_id_from_study_id_trial_number", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_trial_number_from_id",
):  # fmt: skip
    setattr(TrialStore, _name, retried("reading")(getattr(_CachedStorage, _name)))


def _running(trial_id: int) -> sa.ColumnElement[bool]:
    return sa.and_(_trials.c.trial_id == trial_id, _trials.c.state == TrialState.RUNNING)


def create_trial_once(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    template: FrozenTrial,
    conn: sa.Connection | None = None,
) -> FrozenTrial:
    """Optuna's ``create_new_trial``, tried once (SQLite's path, and re-queued points).

    Optuna's own retries trial creation after any database error, including a COMMIT whose
    answer was lost after the server had committed: the trial then exists twice (a re-queued
    point evaluated twice, a trial left running forever). The callers retry with
    as a retried step and first look for the trial an earlier try made, by a system attribute
    unique to it (pinned by the lost-answer tests of ``tests/faults/test_faults.py``). Through a
    ``_CachedStorage`` the trial is also cached, as Optuna's method does, so that the study's
    sampler may set its parameters.

    Given ``conn``, the trial is made in that connection's transaction (committed with it,
    not cached: the next sync reads it, as it reads other processes' trials)."""
    cached = storage if isinstance(storage, _CachedStorage) else None
    backend = cached._backend if cached is not None else storage
    assert isinstance(backend, optuna.storages.RDBStorage)
    scope = _create_scoped_session(backend.scoped_session) if conn is None else _joined(conn)
    with scope as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        row: Any = backend._get_prepared_new_trial(study_id, template, session)
        frozen = copy.deepcopy(template)
        frozen.number, frozen.datetime_start = row.number, row.datetime_start
        frozen._trial_id = row.trial_id
    if cached is not None and conn is None:
        remember(cached, study_id, frozen)
    return frozen


@contextmanager
def _joined(conn: sa.Connection) -> Iterator[orm.Session]:
    """An ORM session inside ``conn``'s transaction, which it neither commits nor ends."""
    session = orm.Session(bind=conn)
    try:
        yield session
        session.flush()
    finally:
        session.close()


def remember(storage: optuna.storages.BaseStorage, study_id: int, trial: FrozenTrial) -> None:
    """Put a trial this process made, or found made by a lost try of its own, in Optuna's
    per-study cache (what ``_CachedStorage.create_new_trial`` does)."""
    if not isinstance(storage, _CachedStorage):
        return
    with storage._lock:
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, [trial])


_LOCK_STUDY = sa.text("SELECT study_id FROM studies WHERE study_id = :s FOR UPDATE")

# A new trial with its two attributes, bound to its ticket, unless a waiting trial is there
# to pop first or the ticket is no longer this worker's.
_CREATE_PG = sa.text(
    """
    WITH waiting AS (
        SELECT 1 FROM trials WHERE study_id = :s AND state = 'WAITING' LIMIT 1
    ),
    t AS (
        INSERT INTO trials (number, study_id, state, datetime_start)
        SELECT (SELECT coalesce(max(number), -1) + 1 FROM trials WHERE study_id = :s),
               :s, 'RUNNING', :start
        WHERE NOT EXISTS (SELECT 1 FROM waiting)
          AND EXISTS (SELECT 1 FROM hpo_tickets WHERE ticket_id = :ticket AND worker = :w)
        RETURNING trial_id, number
    ),
    u AS (
        INSERT INTO trial_user_attributes (trial_id, key, value_json)
        SELECT trial_id, :uk, :uv FROM t
    ),
    y AS (
        INSERT INTO trial_system_attributes (trial_id, key, value_json)
        SELECT trial_id, :yk, :yv FROM t
    ),
    b AS (
        UPDATE hpo_tickets SET trial_id = t.trial_id FROM t
        WHERE hpo_tickets.ticket_id = :ticket AND hpo_tickets.worker = :w
    )
    SELECT (SELECT trial_id FROM t) AS trial_id, (SELECT number FROM t) AS number,
           EXISTS (SELECT 1 FROM waiting) AS waiting
    """
)
