"""A live twin on a broker: telemetry messages in, assimilated estimates and alarms out, the
twin's state persisted in the twin store and the aligned telemetry archived (torch-free).

    live = LiveTwin(store, card, onnx, contract, "tanks-1", create={"noise": {"h2": 0.02}})
    result = asyncio.run(consume(broker_url, "plant.tanks.telemetry", live, name="tanks-1",
                                 estimates="plant.tanks.estimates"))

Per batch of deliveries (up to `batch`, gathered as they arrive), in this order:
1. decode: a message that breaks the format is refused (counted, logged, acked: a poison
   message must not block the stream);
2. skip what the twin has already assimilated: a JetStream stream sequence at or below the
   store's `last_seq` (a redelivery after a crash), or a sample time at or before the twin's
   (a publisher's repeat; on MQTT, which has no sequence, the only test);
3. map through the data contract (`messages.to_samples`: names, units, ranges, clock offsets)
   and align onto the model's grid: a time within `snap` x dt of a grid point t0 + k dt is that
   point; others are refused; an input not valid in a sample holds its last value;
4. assimilate each sample (`Twin.assimilate`); a gap longer than the model's longest rollout
   starts the twin again from its creation settings at that sample (reported as a reset); a
   batch whose forecast diverges (`analysis.Diverged`: non-finite members) is assimilated again
   from the saved twin sample by sample, a sample whose step diverges refused with a `diverged`
   alarm (stopping instead would block the stream: the batch would come again);
5. archive the batch's aligned samples (a Parquet part per batch, named by its first and last
   stream sequence, written to a temporary file and renamed: a redelivered batch rewrites the
   same part);
6. publish one estimate per sample (and the alarms raised) to the estimates subject;
7. save the twin with the batch's last stream sequence, in one transaction (`TwinStore.save`);
8. ack the batch's deliveries.

Delivery (JetStream): a message is acked only after step 7, so a consumer killed anywhere
loses nothing (unacked messages come again) and assimilates nothing twice (what step 7 saved is
skipped by its sequence). A consumer that starts while its durable consumer holds deliveries
a dead one left unacked waits for those to come again (JetStream redelivers them after
`ack_wait`, and hands out newer messages before that) and handles them first: handled after
newer ones, they would lie below the store's `last_seq` and be skipped. Estimates are
published before the save: a consumer killed between 6 and 7 handles the batch again and
publishes its estimates again (at least once, the same values: the same state and random
stream; each carries its stream sequence to tell); one killed after 7 had published them.
MQTT: see `twin_ml.stream.brokers` (QoS 1 is acked on receipt by the client library, so a consumer
killed mid-batch loses that batch's messages).

The twin is created on the first message when the store has none under its id: `create` is a
`Twin` create request (noise, filter, estimate, ...) whose `inputs` and `t0` come from that
message; time counts in seconds from its timestamp (`epoch`, kept with the twin's state).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml.assimilate.analysis import Diverged
from twin_ml.assimilate.twin import Observation, Twin
from twin_ml.contract import ModelCard
from twin_ml.stream.store import TwinNotFound, TwinStore

log = logging.getLogger(__name__)


def model_contract(card: ModelCard):
    """A data contract in the model's own names and units (publishers that speak them)."""
    from twin_ml.data.telemetry import Contract

    system = card.system
    signals = [
        {"name": v.name, "role": "input", "unit": v.unit, "interpolation": v.interpolation}
        for v in system.inputs
    ] + [{"name": v.name, "role": "output", "unit": v.unit} for v in system.outputs]
    return Contract.parse(
        {"system": system.name, "period_s": card.time.dt, "signals": signals}, "contract"
    )


@dataclass
class Outcome:
    """What one batch did: estimates to publish (one per assimilated sample), alarms raised,
    and the counts."""

    estimates: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    assimilated: int = 0
    duplicates: int = 0
    refused: int = 0
    resets: int = 0
    reasons: list[str] = field(default_factory=list)
    unsaved: tuple | None = field(default=None, repr=False)  # for `LiveTwin.save`


class WrongModel(ValueError):
    """The store holds the twin id on another model."""


@dataclass
class _Batch:
    """One twin's part of a batch, ready to assimilate: the twin (made or restored), its store
    record and stream state (None: new), the mapped samples, their stream sequences, and the
    (t, u, y, row) to assimilate in order."""

    twin: Twin
    rec: Any
    stream: dict[str, Any] | None
    samples: Any
    sequences: list[int]
    pending: list[tuple[float, np.ndarray, np.ndarray, int]]

    def observation(self) -> Observation | None:
        if not self.pending:
            return None
        times, us, ys, _ = (np.asarray(v) for v in zip(*self.pending))
        return Observation(times, us, ys)


class LiveTwin:
    """One twin in the store, fed batches of (message, stream sequence) by `handle`."""

    def __init__(
        self,
        store: TwinStore,
        card: ModelCard,
        forecast,
        contract,
        twin_id: str,
        *,
        create: dict[str, Any] | None = None,
        snap: float = 0.25,
        archive: str | Path | None = None,
    ):
        if not 0 < snap <= 0.5:
            raise ValueError(f"snap must be in (0, 0.5] (a fraction of dt), got {snap}")
        self.store, self.card, self.forecast = store, card, forecast
        self.contract, self.twin_id = contract, twin_id
        self.create = dict(create or {})
        for key in ("inputs", "t0"):
            if key in self.create:
                raise ValueError(f"create.{key}: set from the first message; leave it out")
        self.snap = snap
        # (twin, its record, stream) as this consumer last saved them: the next batch goes on
        # from memory; a save that finds another writer's version drops it (read again)
        self._kept: tuple | None = None
        self.archive = Path(archive) / twin_id if archive else None
        self.inputs = card.system.input_names
        self.outputs = card.system.output_names
        self.model = card.ref

    # ---- the twin in the store ---------------------------------------------------------------
    def _load(self):
        if self._kept is not None:  # this consumer saved it last: the store's row is this
            kept, self._kept = self._kept, None  # handed to one batch; its save puts it back
            return kept
        # read from the store (a start, or a batch that was not saved): drop archive parts of
        # batches it never saved first
        try:
            rec = self.store.get(self.twin_id)
        except TwinNotFound:
            self._prune(None)
            return None, None, None
        if rec.model != self.model:
            raise WrongModel(
                f"twin {self.twin_id!r} was created on model {rec.model}; this stream runs "
                f"{self.model}: use another twin id, or the twin's model"
            )
        self._prune(rec.last_seq)
        return Twin.restore(self.card, self.forecast, rec.state), rec, rec.state["stream"]

    def _new(self, u0: np.ndarray, t0: float) -> Twin:
        body = {**self.create, "t0": t0, "inputs": dict(zip(self.inputs, u0.tolist()))}
        return Twin.create(self.card, self.forecast, body)

    # ---- one batch ---------------------------------------------------------------------------
    def handle(self, items: list[tuple], *, save: bool = True) -> Outcome:
        """Assimilate a batch of (TelemetryMessage, stream sequence or None[, subject]), persist
        it (`save` False: later, by `save(outcome)`, once its estimates are out)."""
        try:
            out = Outcome()
            batch = self._prepare(items, out)
            if batch is not None:
                self._assimilate(batch, out)
                self._finish(batch, out, save)
            return self._named(out)
        except Diverged:  # not a stuck stream (the batch would come again): sample by sample
            self._kept = None
            try:
                return self._named(self._one_by_one(items, save))
            except BaseException:
                self._kept = None
                raise

    def _named(self, out: Outcome) -> Outcome:
        """Each alarm names its twin (a fleet publishes several twins' alarms on one subject);
        copies: the twin's own list of alarms raised holds the same dicts."""
        out.alarms = [a if "twin" in a else {**a, "twin": self.twin_id} for a in out.alarms]
        return out

    def _one_by_one(self, items: list[tuple], save: bool) -> Outcome:
        """A batch whose forecast diverged, again from the twin as saved, one sample at a time:
        a sample whose step diverges (`Diverged`) is refused with a `diverged` alarm and the
        twin goes on from before it (its next step spans the gap); the others are assimilated
        as usual. Should the batch's preparation itself diverge (a reset's last samples), the
        whole batch is refused and the twin stays as saved."""
        from twin_ml.stream.messages import iso

        out = Outcome()
        try:
            batch = self._prepare(items, out)
        except Diverged as e:
            self._kept = None
            why = f"twin {self.twin_id}: a batch of {len(items)} messages refused: {e}"
            log.warning(why)
            alarm = {"t": None, "kind": "diverged", "output": None, "message": why}
            return Outcome(alarms=[alarm], refused=len(items), reasons=[why])
        if batch is None:
            return out
        twin, kept, answer = batch.twin, [], {"samples": [], "alarms": []}
        for row in batch.pending:
            before = json.loads(json.dumps(twin.state()))  # as the store keeps it: a copy
            t, u, y, i = row
            try:
                one = twin.assimilate(Observation(np.array([t]), u[None], y[None]))
            except Diverged as e:
                twin = Twin.restore(self.card, self.forecast, before)
                why = (
                    f"twin {self.twin_id}, {iso(batch.samples.timestamps[i])}: the forecast to "
                    f"this sample diverged ({e}): refused, the twin goes on from before it "
                    "(inputs far outside what the model was trained on?)"
                )
                log.warning(why)
                out.refused += 1
                out.reasons.append(why)
                out.alarms.append({"t": t, "kind": "diverged", "output": None, "message": why})
                continue
            kept.append(row)
            answer = {**one, "samples": answer["samples"] + one["samples"],
                      "alarms": answer["alarms"] + one["alarms"]}  # fmt: skip
        batch.twin, batch.pending = twin, kept
        self._collect(batch, answer if kept else None, out)
        self._finish(batch, out, save)
        return out

    def _prepare(self, items: list[tuple], out: Outcome) -> _Batch | None:
        """Steps 1-3 of the module doc for this twin's items (and the assimilation of samples
        before a reset, which needs the old twin): the samples to assimilate, or None when
        nothing is new."""
        from twin_ml.stream.messages import iso, to_samples

        twin, rec, stream = self._load()
        last_seq = rec.last_seq if rec is not None else None
        fresh = [(m, s) for m, s, *_ in items if s is None or last_seq is None or s > last_seq]
        out.duplicates += len(items) - len(fresh)
        if not fresh:
            if twin is not None:
                self._kept = (twin, rec, stream)  # nothing changed: still the store's
            return None
        sequences = [s for _, s in fresh if s is not None]
        if stream is None:  # a new twin: its clock starts at the first message
            stream = {"epoch": iso(min(m.timestamp for m, _ in fresh))}
        samples = to_samples([m for m, _ in fresh], self.contract, start=stream["epoch"])
        dt = self.card.time.dt
        k = np.round(samples.t / dt)  # rows -> grid points; the last row wins a point
        off = np.abs(samples.t - k * dt) > self.snap * dt
        for i in np.flatnonzero(off):
            out.reasons.append(
                f"{iso(samples.timestamps[i])}: {samples.t[i]:.6g} s after the epoch is not "
                f"within {self.snap:g} dt of the model's grid (dt = {dt:g} s)"
            )
        out.refused += int(off.sum())
        rows = {int(k[i]): i for i in np.flatnonzero(~off)}
        u_all = np.stack([samples.values[n] for n in self.inputs], axis=1)
        y_all = np.stack([samples.values[n] for n in self.outputs], axis=1)
        pending: list[tuple[float, np.ndarray, np.ndarray, int]] = []
        u_last = None if twin is None else np.asarray(twin.filter.u)
        start = None  # the time of a twin made in this batch: its first sample is assimilated
        for kk in sorted(rows):
            i, t = rows[kk], kk * dt
            u = u_all[i] if u_last is None else np.where(np.isfinite(u_all[i]), u_all[i], u_last)
            if twin is None or round((t - (pending[-1][0] if pending else twin.t)) / dt) > (
                self.card.time.max_steps
            ):
                if not np.isfinite(u).all():
                    out.refused += 1
                    out.reasons.append(
                        f"{iso(samples.timestamps[i])}: a twin starts from a sample whose "
                        "inputs are all valid"
                    )
                    continue
                if twin is not None:  # a gap past the longest rollout: start again here
                    self._assimilate(_Batch(twin, None, None, samples, [], pending), out)
                    pending = []
                    out.resets += 1
                    out.alarms.append(
                        {
                            "t": t,
                            "kind": "reset",
                            "output": None,
                            "message": "a gap longer than the model's longest rollout: the "
                            "twin starts again from its creation settings",
                        }
                    )
                twin, start = self._new(u, t), t
            elif t <= (pending[-1][0] if pending else twin.t) and t != start:
                out.duplicates += 1  # a time the twin has passed: a publisher's repeat
                continue
            u_last = u
            pending.append((t, u, y_all[i], i))
            start = None if t != start else start
        if twin is None:
            return None
        return _Batch(twin, rec, stream, samples, sequences, pending)

    def _collect(self, batch: _Batch, answer: dict[str, Any] | None, out: Outcome) -> None:
        """Step 4's answer (None: nothing was pending) into `out`: one estimate per sample, the
        last with the states and parameters; the alarms."""
        if answer is None:
            return
        from twin_ml.stream.messages import iso

        samples = batch.samples
        for s, (_, _, _, i) in zip(answer["samples"], batch.pending):
            s["twin"] = self.twin_id
            s["timestamp"] = iso(samples.timestamps[i])
            s["seq"] = int(samples.seq[i]) if samples.seq[i] >= 0 else None
            out.estimates.append(s)
        out.estimates[-1].update({k: answer[k] for k in ("states", "parameters", "alarm")})
        out.alarms += answer["alarms"]
        out.assimilated += len(batch.pending)

    def _finish(self, batch: _Batch, out: Outcome, save: bool) -> None:
        """Step 5, and the state step 7 saves (now with `save`, else by `save(out)`)."""
        self._archive(batch.samples, batch.sequences)
        state = {**batch.twin.state(), "stream": batch.stream}
        seq = max(batch.sequences) if batch.sequences else None
        out.unsaved = (batch.rec, state, seq, batch.twin, batch.stream)
        if save:
            self.save(out)

    def save(self, out: Outcome) -> None:
        """Persist the twin as a batch's `handle(..., save=False)` left it (nothing to do when
        the batch assimilated nothing)."""
        if out.unsaved is None:
            return
        rec, state, batch_seq, twin, stream = out.unsaved
        self._kept = None
        if rec is None:
            rec = self.store.create(self.twin_id, self.model, state, last_seq=batch_seq)
        else:
            rec = self.store.save(self.twin_id, state, rec.version, last_seq=batch_seq)
        self._kept = (twin, rec, stream)
        out.unsaved = None

    def _assimilate(self, batch: _Batch, out: Outcome) -> None:
        """Step 4 for one twin alone (a fleet assimilates its twins' batches together)."""
        obs = batch.observation()
        self._collect(batch, None if obs is None else batch.twin.assimilate(obs), out)

    def _prune(self, last_seq: int | None) -> None:
        """Remove archive parts of batches the twin never saved (a consumer killed between
        archiving and saving): their messages come again, in batches of other bounds."""
        if self.archive is None or not self.archive.is_dir():
            return
        for part in self.archive.glob("part-*-*.parquet"):
            first = part.name.split("-")[1]
            if first.isdigit() and (last_seq is None or int(first) > last_seq):
                part.unlink(missing_ok=True)

    def _archive(self, samples, sequences: list[int]) -> None:
        if self.archive is None or not len(samples):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        from twin_ml._io import atomic_write_bytes

        table = pa.table(
            {
                "timestamp": pa.array(samples.timestamps.asi8, pa.timestamp("ns", tz="UTC")),
                "t": samples.t,
                "seq": samples.seq,
                **{name: samples.values[name] for name in samples.values},
            }
        )
        if sequences:  # a redelivered batch rewrites its part
            name = f"part-{min(sequences):012d}-{max(sequences):012d}.parquet"
        else:
            name = f"part-t{samples.t[0]:.9g}.parquet"
        self.archive.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(self.archive / name, buf.getvalue())


def fleet_ids(subject: str, twin: str):
    """A fleet's twin ids from its messages' subjects: `subject` a NATS subject with `*`
    tokens (or an MQTT topic with `+` levels), `twin` a template naming each twin by them,
    `{1}` the first wildcard's token, `{2}` the second's... ("plant.*.telemetry" and
    "tanks-{1}": plant.a7.telemetry is twin tanks-a7). -> the function subject -> twin id
    (ValueError naming the subject when it does not fit)."""
    from twin_ml.stream.store import check_id

    mqtt = "/" in subject or subject == "+"
    sep, one, tail = ("/", "+", "#") if mqtt else (".", "*", ">")
    tokens = subject.split(sep)
    wild = [i for i, tok in enumerate(tokens) if tok == one]
    if not wild or tail in tokens:
        raise ValueError(
            f"subject: a fleet's subject names each twin by single-level wildcards (* on NATS, "
            f"+ on MQTT) and no tail wildcard (> or #), got {subject!r}"
        )
    used = {int(n) for n in re.findall(r"\{(\d+)\}", twin)}
    if not used or not used <= set(range(1, len(wild) + 1)):
        raise ValueError(
            f"twin: a fleet's twin id is a template of the subject's wildcards {{1}}..."
            f"{{{len(wild)}}} (e.g. tanks-{{1}}), got {twin!r}"
        )
    check_id(re.sub(r"\{\d+\}", "x", twin), "twin")

    def twin_of(concrete: str) -> str:
        parts = concrete.split(sep)
        if len(parts) != len(tokens):
            raise ValueError(f"subject {concrete!r} does not match {subject!r}")
        values = {str(n + 1): parts[i] for n, i in enumerate(wild)}
        return check_id(re.sub(r"\{(\d+)\}", lambda m: values[m.group(1)], twin), "twin")

    return twin_of


class LiveFleet:
    """Several twins of one model on one consumer: a message's twin is named by its subject
    (`fleet_ids`); each twin is a `LiveTwin` (its own store row, stream sequence, archive and
    estimates), and a batch's samples of all of them are assimilated together
    (`assimilate_many`: one forecast call and one vectorized analysis per round of samples),
    which is what makes a fleet cheaper per message than a consumer per twin. A subject that
    names no valid twin is refused like a broken message."""

    def __init__(self, store: TwinStore, card: ModelCard, forecast, contract, subject: str,
                 twin: str, **options: Any):  # fmt: skip
        """`options`: each twin's `LiveTwin` keyword arguments (create, snap, archive)."""
        self.twin_of = fleet_ids(subject, twin)
        self.twin_id = twin  # the template (progress bars, logs)
        self._args, self._options = (store, card, forecast, contract), options
        LiveTwin(*self._args, "settings-check", **options)  # refused now, not later
        self.twins: dict[str, LiveTwin] = {}

    def _live(self, twin_id: str) -> LiveTwin:
        if twin_id not in self.twins:
            self.twins[twin_id] = LiveTwin(*self._args, twin_id, **self._options)
        return self.twins[twin_id]

    def handle(self, items: list[tuple], *, save: bool = True) -> Outcome:
        """`LiveTwin.handle` for items (message, sequence, subject) of any of the fleet's twins:
        one Outcome for the batch (each twin's estimates in its samples' order)."""
        from twin_ml.assimilate.twin import assimilate_many

        out, groups = Outcome(), {}
        for msg, seq, subject in items:
            try:
                twin_id = self.twin_of(subject)
            except ValueError as e:
                out.refused += 1
                out.reasons.append(f"sequence {seq}: {e}")
                continue
            groups.setdefault(twin_id, []).append((msg, seq))
        lives = [self._live(t) for t in groups]
        try:
            parts = [(live, Outcome()) for live in lives]
            todo = zip(parts, groups.values())
            batches = [self._prepare(live, its, o) for (live, o), its in todo]
            ready = [k for k, b in enumerate(batches) if b is not None and b.pending]
            answers = assimilate_many(
                [batches[k].twin for k in ready], [batches[k].observation() for k in ready]
            )
            for k, answer in zip(ready, answers):
                parts[k][0]._collect(batches[k], answer, parts[k][1])
            for (live, o), b in zip(parts, batches):
                if b is not None:
                    live._finish(b, o, save=False)
        except Diverged:  # one twin's forecast: again twin by twin, each from its saved state
            for live in lives:
                live._kept = None
            parts = [(live, self._alone(live, its)) for live, its in zip(lives, groups.values())]
        except BaseException:
            for live in lives:
                live._kept = None
            raise
        for live, o in parts:
            out.estimates += o.estimates
            out.alarms += live._named(o).alarms
            out.reasons += o.reasons
            for key in ("assimilated", "duplicates", "refused", "resets"):
                setattr(out, key, getattr(out, key) + getattr(o, key))
        out.unsaved = tuple((live, o) for live, o in parts if o.unsaved is not None) or None
        if save:
            self.save(out)
        return out

    @staticmethod
    def _alone(live: LiveTwin, items: list[tuple]) -> Outcome:
        try:
            return live.handle(items, save=False)
        except WrongModel as e:
            return Outcome(refused=len(items), reasons=[f"{len(items)} messages refused: {e}"])

    @staticmethod
    def _prepare(live: LiveTwin, items: list[tuple], out: Outcome) -> _Batch | None:
        """`live._prepare`, a twin id the store holds on another model refused with its
        messages (a publisher's subject must not stop the other twins)."""
        try:
            return live._prepare(items, out)
        except WrongModel as e:
            live._kept = None
            out.refused += len(items)
            out.reasons.append(f"{len(items)} messages refused: {e}")
            return None

    def save(self, out: Outcome) -> None:
        """Persist every twin of a batch `handle(..., save=False)` left (one transaction each:
        each twin skips what its own saved sequence covers, so a consumer killed between two
        saves assimilates the unsaved twins' messages again and the saved ones' not)."""
        for live, o in out.unsaved or ():
            live.save(o)
        out.unsaved = None


# ---- the consumer loop ---------------------------------------------------------------------------
@dataclass
class StreamResult:
    """A consumer run's counts: messages delivered (redeliveries included), assimilated samples,
    duplicates skipped, refused (broken or off the grid), resets, alarms, estimates published,
    batches, and its wall time."""

    delivered: int = 0
    assimilated: int = 0
    duplicates: int = 0
    refused: int = 0
    resets: int = 0
    alarms: int = 0
    published: int = 0
    batches: int = 0
    wall_s: float = 0.0
    reasons: list[str] = field(default_factory=list)


async def consume(
    url: str,
    subject: str,
    live: LiveTwin | LiveFleet,
    *,
    name: str,
    estimates: str | None = None,
    alarms: str | None = None,
    batch: int = 64,
    max_messages: int | None = None,
    idle_s: float | None = None,
    stream: str = "TELEMETRY",
    ack_wait: float = 30.0,
    timeout: float = 5.0,
    linger_s: float = 0.002,
    progress: bool = False,
) -> StreamResult:
    """Subscribe to `subject` on the broker at `url` (durable, under `name`) and feed `live`
    batch by batch (see the module doc) until `max_messages` were delivered or none came for
    `idle_s` seconds (None: run until cancelled). A batch is what arrived within `linger_s` of
    its first message, up to `batch`. Estimates go to `estimates`, alarms to `alarms` (NATS
    subjects or MQTT topics; on NATS the same JetStream stream stores them)."""
    from tqdm import tqdm

    from twin_ml.stream.brokers import ack_all, connect, load_client
    from twin_ml.stream.messages import MessageError

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    result = StreamResult()
    load_client(url)  # start-up: wall_s counts from the connection on
    t0 = time.perf_counter()
    broker = await connect(
        url, name=name, stream=stream, ack_wait=ack_wait, batch=batch, timeout=timeout
    )
    bar = tqdm(total=max_messages, disable=not progress, unit="msg", desc=f"twin {live.twin_id}")
    try:
        sub = await broker.subscribe(subject)
        ahead = await _redelivered_first(broker, sub, ack_wait + timeout)

        async def pull(wait: float | None):
            return ahead.popleft() if ahead else await sub.next(wait)

        loop = asyncio.get_running_loop()

        while max_messages is None or result.delivered < max_messages:
            try:
                first = await pull(idle_s)
            except TimeoutError:
                break
            got = [first]
            want = batch if max_messages is None else min(batch, max_messages - result.delivered)
            until = loop.time() + linger_s  # what arrives meanwhile joins the batch
            while len(got) < want and (ahead or sub.buffered() or loop.time() < until):
                try:  # fetched already (a backlog): it has arrived, whatever the time
                    got.append(await pull(max(until - loop.time(), 1e-4)))
                except TimeoutError:
                    break
            result.delivered += len(got)
            items = []
            for d in got:
                try:
                    items.append((d.message(), d.sequence, d.subject))
                except MessageError as e:
                    result.refused += 1
                    result.reasons.append(f"sequence {d.sequence}: {e}")
                    log.warning("refused a message on %s: %s", d.subject, e)
            out = await asyncio.to_thread(live.handle, items, save=False) if items else Outcome()
            result.batches += 1
            result.assimilated += out.assimilated
            result.duplicates += out.duplicates
            result.refused += out.refused
            result.resets += out.resets
            result.alarms += len(out.alarms)
            result.reasons += out.reasons
            if estimates and out.estimates:  # in the samples' order on the subject
                await broker.publish_all(estimates, [json.dumps(e).encode() for e in out.estimates])
                result.published += len(out.estimates)
            if alarms and out.alarms:
                await broker.publish_all(
                    alarms, [json.dumps({"twin": live.twin_id, **a}).encode() for a in out.alarms]
                )
            if out.unsaved is not None:  # after the estimates: a death before it repeats them
                await asyncio.to_thread(live.save, out)
            await ack_all(got)
            bar.update(len(got))
        await sub.close()
    finally:
        bar.close()
        await broker.close()
        result.wall_s = time.perf_counter() - t0
    return result


async def _redelivered_first(broker, sub, wait_s: float) -> deque:
    """JetStream: the deliveries a consumer of this name left unacked when it died, to be
    handled before anything newer. The server redelivers them only once ack_wait has passed
    and meanwhile hands newer messages to a fetch; handled first, those would move the store's
    last_seq past the older ones, which would then be skipped as assimilated (lost). So when the
    durable consumer holds unacked deliveries at the start, wait (at most `wait_s`) until they
    came again, keep the newer messages that came meanwhile aside, and give both back in that
    order (the redeliveries in stream order)."""
    pending = getattr(broker, "pending", None)  # JetStream only; MQTT has no redelivery
    if pending is None:
        return deque()
    _, left = await pending()
    if not left:
        return deque()
    log.info("waiting for %d deliveries a previous consumer left unacked", left)
    again, newer = [], []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while len(again) < left and deadline > loop.time():
        try:
            d = await sub.next(deadline - loop.time())
        except TimeoutError:
            break
        (again if d.delivered > 1 else newer).append(d)
    if len(again) < left:
        log.warning(
            "%d of %d unacked deliveries did not come again within %.3g s; going on",
            left - len(again), left, wait_s,
        )  # fmt: skip
    return deque(sorted(again, key=lambda d: d.sequence) + newer)
