"""Every Redis key and RQ name the pipeline uses, in one place.

All keys of a pipeline live under its namespace (``<ns>:...``). RQ's own keys
(``rq:queue:<ns>-p<P>``, ``rq:job:<ns>-...``) are named after the namespace too,
so that ``reset`` can find and delete them.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# The RQ function the driver enqueues by dotted path, so that enqueueing never
# imports worker code.
PROCESS_BATCH = "tasks.jobs.process_batch"
# The field of a failed batch job's RQ meta that holds the epoch it found its partition at,
# when that was short of the epoch the batch follows (tasks.errors.OutOfOrder).
PARTITION_FOUND_AT = "partition_found_at"


# The slots of a namespace's keys (Flink's key groups): each key hashes to one slot, once and
# for all, and each partition owns a contiguous range of slots, so that changing the partition
# count moves whole slots (orchestrator/rescale.py). At least settings.MAX_PARTITIONS.
SLOTS = 4096

# The slot count meta records for a namespace made before slots existed: its key's partition
# is crc32 modulo the partition count (a rescale moves it to SLOTS).
LEGACY_SLOTS = 0


def partition_of(key: str, partitions: int, slots: int) -> int:
    """Return the partition of a key: the owner of its slot (of its crc32 without slots)."""
    crc = zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if slots == LEGACY_SLOTS:
        return crc % partitions
    return (crc % slots) * partitions // slots


def partition_table(partitions: int, slots: int) -> tuple[int, list[int]]:
    """``(m, table)`` such that the partition of a key is ``table[crc32 % m]`` (what the driver
    routes by: one modulo and one index per event)."""
    if slots == LEGACY_SLOTS:
        return partitions, list(range(partitions))
    return slots, [s * partitions // slots for s in range(slots)]


@dataclass(frozen=True)
class Layout:
    """How a namespace spreads its keys: ``partitions`` owning ranges of ``slots``."""

    partitions: int
    slots: int  # LEGACY_SLOTS: crc32 modulo partitions, without slots
    tagged: bool = True  # the key names (Keys.tagged)

    def router(self) -> Callable[[bytes], int]:
        """The partition of a key given as its UTF-8 bytes."""
        modulus, table = partition_table(self.partitions, self.slots)
        crc32 = zlib.crc32
        return lambda key: table[crc32(key) % modulus]


def rq_queue_key(name: str) -> str:
    """The Redis list RQ keeps the job ids of queue ``name`` in."""
    return f"rq:queue:{name}"


def rq_job_key(job_id: str) -> str:
    """The Redis hash RQ keeps job ``job_id`` in (its status, data, timestamps)."""
    return f"rq:job:{job_id}"


@dataclass(frozen=True)
class Keys:
    """Key names of one namespace.

    Every key of one partition's commit (its state, undo, progress, lease and probe
    keys, its stored batches, staged successor and notice stream, and its RQ queue)
    has the same hash tag, ``{<ns>-p<P>}`` (the partition's queue name), so that on
    a Redis Cluster each commit stays in one slot. ``tagged=False`` gives the names
    of a namespace made before hash tags (``<ns>:p<P>:state``, one notice stream per
    run, queue ``<ns>-p<P>``): read by ``status`` and ``state``, and moved to the
    tagged names by the namespace's next run (``orchestrator/rescale.py``).
    """

    namespace: str
    tagged: bool = True

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            msg = f"invalid namespace {self.namespace!r}: use 1-64 letters, digits, '-' or '_'"
            raise ValueError(msg)

    @property
    def meta(self) -> str:
        """Hash: partitions, flow, generation, committed epoch and the input offset after it."""
        return f"{self.namespace}:meta"

    @property
    def checkpoints(self) -> str:
        """Sorted set: epoch -> byte offset of that epoch's line, sampled at each global commit."""
        return f"{self.namespace}:checkpoints"

    @property
    def driver_lock(self) -> str:
        """String with a TTL: the token of the driver running on this namespace."""
        return f"{self.namespace}:driver"

    def _partition(self, partition: int) -> str:
        """The start of a partition's key names (with its hash tag)."""
        if self.tagged:
            return f"{self.namespace}:{{{self.namespace}-p{partition}}}"
        return f"{self.namespace}:p{partition}"

    @property
    def _partitions_pattern(self) -> str:
        return f"{self.namespace}:{{{self.namespace}-p*}}"

    def notices(self, generation: int, partition: int) -> str:
        """Stream: a partition's commit notices (with output lines) for one generation's driver."""
        if not self.tagged:
            return f"{self.namespace}:notices:{generation}"
        return f"{self._partition(partition)}:notices:{generation}"

    @property
    def backlog(self) -> str:
        """Hash: partition -> events the running driver has read and the partition not committed."""
        return f"{self.namespace}:backlog"

    @property
    def last_run(self) -> str:
        """String: the last run's outcome (JSON: command, times, exit status, reason, counts)."""
        return f"{self.namespace}:last-run"

    @property
    def dead_letters(self) -> str:
        """Stream: rejected lines and events (epoch, line, raw text, reason) under dead-letter."""
        return f"{self.namespace}:dead-letters"

    def batch(self, generation: int, partition: int, last_epoch: int) -> str:
        """String: a batch's events (JSON), from its dispatch until its commit deletes it."""
        if not self.tagged:
            return f"{self.namespace}:batch:g{generation}-p{partition}-e{last_epoch}"
        return f"{self._partition(partition)}:batch:g{generation}-e{last_epoch}"

    @property
    def batches_pattern(self) -> str:
        """SCAN pattern matching every stored batch of the namespace."""
        if not self.tagged:
            return f"{self.namespace}:batch:*"
        return f"{self._partitions_pattern}:batch:*"

    def lease(self, partition: int) -> str:
        """String with a short TTL: the job id a live worker is running for the partition."""
        return f"{self._partition(partition)}:lease"

    def successor(self, generation: int, partition: int) -> str:
        """List: the job id of the partition's next batch, staged while the one before it runs.

        The commit of the batch before it moves the id into the partition's RQ
        queue (``queue_key``), so the next batch starts without waiting for the driver.
        """
        if not self.tagged:
            return f"{self.namespace}:next:g{generation}-p{partition}"
        return f"{self._partition(partition)}:next:g{generation}"

    @property
    def successors_pattern(self) -> str:
        """SCAN pattern matching the staged successors of every generation."""
        if not self.tagged:
            return f"{self.namespace}:next:*"
        return f"{self._partitions_pattern}:next:*"

    @property
    def notices_pattern(self) -> str:
        """SCAN pattern matching the notice streams of every generation."""
        if not self.tagged:
            return f"{self.namespace}:notices:*"
        return f"{self._partitions_pattern}:notices:*"

    def probe(self, partition: int) -> str:
        """Hash: where a careful re-run of the partition's batch is, and the deaths it saw.

        Written before each event (or range of events) by a batch sent again after
        its worker died (``tasks/careful.py``), so that the next attempt knows which
        event the dead one was running; deleted when that batch commits.
        """
        return f"{self._partition(partition)}:probe"

    def progress(self, partition: int) -> str:
        """Hash: ``applied`` = the partition has applied every event with epoch <= this."""
        return f"{self._partition(partition)}:progress"

    def state(self, partition: int) -> str:
        """Hash: key -> current state (JSON) of every key of the partition."""
        return f"{self._partition(partition)}:state"

    def undo(self, partition: int) -> str:
        """Sorted set: one undo record per committed batch, scored by its last epoch."""
        return f"{self._partition(partition)}:undo"

    def staged_state(self, partition: int, generation: int) -> str:
        """Hash: the states a rescale by run ``generation`` moves to the partition, until its
        last step renames it to ``state`` (``orchestrator/rescale.py``)."""
        return f"{self._partition(partition)}:state:rescale-g{generation}"

    def staged_undo(self, partition: int, generation: int) -> str:
        """Sorted set: the undo records a rescale by run ``generation`` moves to the
        partition, until its last step renames it to ``undo``."""
        return f"{self._partition(partition)}:undo:rescale-g{generation}"

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of the namespace."""
        return f"{self.namespace}:*"

    def queue_name(self, partition: int) -> str:
        """The RQ queue of a partition: ``{<ns>-p<P>}``, the hash tag of its keys."""
        if not self.tagged:
            return f"{self.namespace}-p{partition}"
        return f"{{{self.namespace}-p{partition}}}"

    def queue_key(self, partition: int) -> str:
        """The Redis list of the partition's RQ queue (RQ names it ``rq:queue:<queue name>``)."""
        return rq_queue_key(self.queue_name(partition))

    @property
    def queues_pattern(self) -> str:
        """SCAN/SSCAN pattern of RQ queue keys that may be the namespace's (``owns`` tells)."""
        return rq_queue_key(f"*{self.namespace}-*")

    def queue_names(self, partitions: int) -> list[str]:
        """The RQ queues of all partitions, in partition order."""
        return [self.queue_name(p) for p in range(partitions)]

    def job_id(self, generation: int, partition: int, last_epoch: int) -> str:
        """The RQ job id of a batch; RQ ids allow only ``[A-Za-z0-9_-]``."""
        return f"{self.namespace}-g{generation}-p{partition}-e{last_epoch}"

    @property
    def rq_pattern(self) -> str:
        """SCAN pattern of RQ keys that may belong to the namespace (``owns`` tells which do)."""
        return f"rq:*{self.namespace}-*"

    def owns(self, key: str) -> bool:
        """Whether a Redis key belongs to this namespace: one of its own or RQ's for it.

        By shape, not by prefix: ``orders-prod-p0`` is not a queue of namespace ``orders``.
        """
        if key.startswith(f"{self.namespace}:"):
            return True
        ns = re.escape(self.namespace)
        queue = rf"\{{{ns}-p\d+\}}|{ns}-p\d+"  # (with hash tags, and before them)
        job = rf"{ns}-g\d+-p\d+-e-?\d+(?:-r\d+)?"
        return re.fullmatch(rf"rq:[a-z_-]+:(?:{queue}|{job})(?::.*)?", key) is not None

    def generation_of(self, key: str) -> int | None:
        """The run generation in the name of a notice stream, stored batch or successor list."""
        ns = re.escape(self.namespace)
        tagged = rf"{ns}:\{{{ns}-p\d+\}}:(?:notices:(\d+)|(?:batch|next):g(\d+)(?:-e-?\d+)?)"
        legacy = rf"{ns}:(?:notices:(\d+)|(?:batch|next):g(\d+)-p\d+(?:-e-?\d+)?)"
        found = re.fullmatch(tagged, key) or re.fullmatch(legacy, key)
        if found is None:
            return None
        return int(found.group(1) or found.group(2))

    @property
    def job_id_prefix(self) -> str:
        """The prefix of every RQ job id of the namespace."""
        return f"{self.namespace}-g"
