"""The journal: the controller's only writer to its LMDB store, one transaction per loop pass.

The gateway records what happened during one pass of its loop (tasks accepted, assigned, finished,
engines registered) and calls ``commit`` once at the end; only then does it acknowledge submissions,
forward results and dispatch tasks. So a client never hears of anything the store does not hold.

Results and state changes are committed before new submissions: when the store is full, the
submissions of that pass are refused with ``StoreFull`` while the results already computed still land
(and if even they cannot, they are still delivered, flagged in the log as not stored).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fedpar.control.scheduler import Task
from fedpar.errors import StoreError, StoreFull
from fedpar.store.lmdb_store import LmdbStore
from fedpar.store.records import ASSIGNED, DONE, FAILED, QUEUED, RUNNING, EngineRecord, ResultRecord
from fedpar.store.schema import STREAM_INPUT
from fedpar.wire.protocol import ResultSpec
from fedpar.wire.streams import not_kept

log = logging.getLogger(__name__)


def task_row(task: Task, state: str, completed: float | None = None) -> list[Any]:
    """The stored form of a task: ``TaskRecord.to_row()`` order, built without a record object."""
    return [
        task.task_id, task.client, task.op, task.target, state, task.engine, task.submitted,
        task.assigned, completed, task.attempts, task.retries, task.spec,
    ]


class Journal:
    """Batches store writes for one pass of the gateway loop.

    A task's record is written once per pass, in its latest state (a task accepted and dispatched in
    the same pass is stored as assigned, never first as queued).
    """

    def __init__(self, store: LmdbStore):
        self.store = store
        self._state = store.batch()
        self._results = store.batch()
        self._submits = store.batch()
        self._chunks = store.batch()  # streamed payload chunks: committed first, on their own
        self._submitted: list[Task] = []
        self._new_rows: dict[str, list[Any]] = {}  # rows of tasks submitted this pass
        self._rows: dict[str, list[Any]] = {}  # rows of older tasks that changed this pass
        self.unstored_results = 0  # results delivered although the store refused them
        # Tasks whose streamed arguments are still arriving: they may be dispatched already (the engine gets
        # each chunk as it is stored) but exist in the store only once their arguments are complete.
        self.unrecorded: set[str] = set()

    def task_queued(self, task: Task, *, streamed: bool = False) -> None:
        """A new submission; ``streamed``: its inputs were written chunk by chunk (``stream_chunk``), and it
        may be assigned or running already."""
        state = QUEUED if task.engine is None else RUNNING if task.running else ASSIGNED
        self.unrecorded.discard(task.task_id)
        self._new_rows[task.task_id] = task_row(task, state)
        if streamed:
            self._submits.end_stream(STREAM_INPUT, task.task_id)
        else:
            self._submits.put_inputs(task.task_id, task.frames or (), fresh=True)
        self._submitted.append(task)

    # -- streamed payloads ----------------------------------------------------------------------------
    def stream_begin(self, kind: bytes, task_id: str) -> None:
        self._chunks.begin_stream(kind, task_id)

    def stream_chunk(self, kind: bytes, task_id: str, frame: int, chunk: int, data: Any) -> None:
        self._chunks.put_chunk(kind, task_id, frame, chunk, data)

    def stream_drop(self, kind: bytes, task_id: str) -> None:
        self._state.drop_stream(kind, task_id)

    def commit_chunks(self) -> str:
        """Commit the stream chunks received this pass; returns why the store refused them ("" if stored)."""
        if not self._chunks:
            return ""
        chunks, self._chunks = self._chunks, self.store.batch()
        try:
            self.store.commit(chunks)
        except StoreError as exc:
            log.error("store refused %d stream chunk write(s): %s", len(chunks), exc)
            return f"{type(exc).__name__}: {exc}"
        return ""

    def task_assigned(self, task: Task) -> None:
        if task.task_id in self.unrecorded:
            return
        rows = self._new_rows if task.task_id in self._new_rows else self._rows
        rows[task.task_id] = task_row(task, ASSIGNED)

    def task_running(self, task: Task) -> None:
        if task.task_id in self.unrecorded:
            return
        self._rows[task.task_id] = task_row(task, RUNNING)

    def task_requeued(self, task: Task) -> None:
        if task.task_id in self.unrecorded:
            return
        self._rows[task.task_id] = task_row(task, QUEUED)

    def task_finished(self, task: Task, res: ResultSpec, frames: Sequence[Any],
                      streamed: Sequence[int] | None = None, *, delivered: bool = False) -> None:
        """A task's outcome; ``streamed`` (frame sizes): its payload was written chunk by chunk already;
        ``delivered``: it went straight to its client and is not kept (the record says so to anyone asking).
        Not stored for a task whose arguments never arrived whole (its submission is refused instead)."""
        if task.task_id in self.unrecorded:
            return
        error = (res.error[0], res.error[1], res.error[2]) if res.error is not None else None
        if delivered:
            error = ("fedpar.ResultNotFound", not_kept(res.task_id), "")
        rec = ResultRecord(res.task_id, res.ok and not delivered, res.engine, res.started, res.completed, error)
        # frame_sizes: the store records the sizes of the frames it writes
        self._results.put_result(rec, frames, streamed=streamed)
        # (submitted in this same pass, e.g. aborted at once: the submission's row is the one to update, since
        # the submissions are committed after the state changes)
        rows = self._new_rows if task.task_id in self._new_rows else self._rows
        rows[task.task_id] = task_row(task, DONE if res.ok else FAILED, res.completed)

    def engine(self, rec: EngineRecord) -> None:
        self._state.put_engine(rec)

    def mark(self, sender: str, seq: int) -> None:
        self._state.put_mark(sender, seq)

    def forget_mark(self, sender: str) -> None:
        self._state.delete_mark(sender)

    def delete_results(self, task_ids: Sequence[str]) -> None:
        self._state.delete_results(task_ids)

    @property
    def pending(self) -> bool:
        """True when writes wait for the next commit."""
        return bool(self._state or self._results or self._submits or self._rows or self._new_rows or self._chunks)

    def commit(self) -> tuple[list[Task], str]:
        """Commit the pass. Returns the submissions refused (and why); empty when all landed.

        Normally one transaction holds the pass's results and state changes. If the store refuses it,
        the state changes (task rows, engines, marks, purges) are committed without the result payloads,
        which are delivered unstored: a task is never left looking unfinished after its result went out.
        """
        if not self.pending:
            return [], ""
        state, results, submits, submitted = self._state, self._results, self._submits, self._submitted
        for tid, row in self._rows.items():
            state.put_task_row(tid, row)
        for tid, row in self._new_rows.items():
            submits.put_task_row(tid, row)
        self._state = self.store.batch()
        self._results = self.store.batch()
        self._submits = self.store.batch()
        self._submitted = []
        self._rows = {}
        self._new_rows = {}
        if state or results:
            both = self.store.batch()
            both.extend(results)
            both.extend(state)
            try:
                self.store.commit(both)
            except StoreError as exc:
                self.unstored_results += len(results)
                log.error("store refused this pass's results (%s); delivering them unstored", exc)
                try:
                    self.store.commit(state)
                except StoreError as exc2:
                    log.error("store refused this pass's state changes too: %s", exc2)
        if submits:
            try:
                self.store.commit(submits)
            except StoreFull as exc:
                return submitted, str(exc)
            except StoreError as exc:
                log.error("store refused %d submissions: %s", len(submitted), exc)
                return submitted, str(exc)
        return [], ""
