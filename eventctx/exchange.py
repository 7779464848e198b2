"""Export a session to a file and import it into any store, streamed both ways.

The file is JSON Lines: a header, then one line per event with every stored column (the
payload as base64 of the exact bytes that were hashed, the hashes in hex), so that an import
rebuilds the log byte for byte on either backend and keeps its hashes. A session whose
oldest events retention removed carries its base in the header (format version 2), with the
base's digest, so an import checks it as well as the chain after it. A path ending in
``.gz`` is gzip-compressed. An import verifies the whole chain while it streams and commits
nothing unless it verifies.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Final, NamedTuple, cast
from urllib.parse import quote

import orjson

from eventctx.errors import (
    ChainKeyError,
    ConcurrencyError,
    IntegrityError,
    InvalidInputError,
    SessionExpiredError,
    SessionNotFoundError,
    StorageError,
)
from eventctx.events import GENESIS_HASH, INT_MAX
from eventctx.state import ChainRow
from eventctx.store import EventRow, EventStore
from eventctx.store.bases import Base
from eventctx.store.core import ChainCheck
from eventctx.store.heads import ACTIVE, EXPIRING, SessionHead, check_session_id
from eventctx.store.schema import SCHEMA_VERSION

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Exchanged",
    "archive_session",
    "export_session",
    "import_session",
]

FORMAT: Final = "eventctx-session"
TRIES: Final = 3
"""How often an export to a path starts again when retention moves the base under it."""
FORMAT_VERSION: Final = 2
"""The newest format written: 2 for a session with a retention base, 1 (also read) without."""
_CHAINS: Final = ("sha256", "hmac-sha256")

Target = str | os.PathLike[str] | IO[bytes]
"""A path (gzip when it ends in ``.gz``) or a binary file object."""


class Exchanged(NamedTuple):
    """What an export wrote or an import loaded: the session, its events and chain head."""

    session_id: str
    events: int
    head_hash: bytes


def export_session(
    store: EventStore, session_id: str, out: Target, *, marked: bool = False
) -> Exchanged:
    """Write ``session_id``'s log to ``out`` (a binary file object, or a path: gzip when it
    ends in ``.gz``) as JSON Lines, a chunk of events at a time.

    The events written are those up to the head read first, and their chain is verified on
    the way (IntegrityError otherwise; a path written to is then removed), so a file always
    holds a whole, verified log. Works on a read-only store. ``marked``: also a session that
    compaction has marked for removal (frozen, not yet emptied), which ``archive_session`` does.
    When retention moves the session's base during the export, a path is written again; a file
    object cannot be, and ConcurrencyError says to export again.
    """
    for _ in range(TRIES if isinstance(out, str | os.PathLike) else 1):
        try:
            return _export(store, session_id, out, marked=marked)
        except _BaseMovedError:
            continue
    raise ConcurrencyError(
        f"retention moved the base of session {session_id!r} while it was exported; what was "
        "written is incomplete: export again"
    )


def _export(store: EventStore, session_id: str, out: Target, *, marked: bool) -> Exchanged:
    """One try of ``export_session``; _BaseMovedError when retention took events meanwhile."""
    head = store.session(session_id)
    if head is None:
        raise SessionNotFoundError(f"session {session_id!r} does not exist")
    if head.status == EXPIRING:
        if not marked:
            raise SessionExpiredError(f"session {session_id!r} expired and is being removed")
        head = replace(head, status=ACTIVE)  # frozen by compaction, still whole: export it
    base = store.base(session_id)
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1 if base is None else FORMAT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "session_id": session_id,
        "events": head.version,
        "head_hash": head.head_hash.hex(),
        "chain": store.chain_mode,
        "ttl_ms": head.ttl_ms,
    }
    if base is not None:
        header["created_at_us"] = head.created_at_us
        header["base"] = {
            "version": base.version,
            "fold_version": base.fold_version,
            "head_hash": base.head_hash.hex(),
            "state_b64": base64.b64encode(base.state).decode(),
            "history_b64": base64.b64encode(base.history).decode(),
            "digest": store.bases.digest(base).hex(),
        }
    check = store.chain_check(head, base)
    with _opened(out, "wb") as file:
        file.write(orjson.dumps(header) + b"\n")
        for row in store.chain_rows(session_id, head.version, check.first):
            version, type_, key, phase, execution_id, payload, at, digest, prev = row
            check.feed(*row)
            line = {
                "version": version,
                "type": type_,
                "key": key,
                "phase": phase,
                "execution_id": execution_id,
                "recorded_at_us": at,
                "payload_b64": base64.b64encode(payload).decode(),
                "hash": bytes(digest).hex(),
                "prev_hash": bytes(prev).hex(),
            }
            file.write(orjson.dumps(line) + b"\n")
        try:
            check.finish()
        except IntegrityError:
            if store.base(session_id) != base:
                raise _BaseMovedError from None
            raise
    return Exchanged(session_id, head.version, head.head_hash)


class _BaseMovedError(Exception):
    """Retention moved the session's base (and removed events) while it was exported."""


def archive_session(store: EventStore, session_id: str, directory: str | os.PathLike[str]) -> Path:
    """Export a session compaction has marked for removal into ``directory`` durably (written
    to a temporary file, fsynced, renamed, the directory fsynced) before it is removed, and
    return the file: ``SESSION.HEAD.jsonl.gz``, the session id percent-encoded (hashed when
    long) and the first 16 hex digits of its head hash. A file that exists already (written by
    a compactor that died before removing the session) is kept as it is."""
    head = store.session(session_id)
    if head is None:
        raise SessionNotFoundError(f"session {session_id!r} does not exist")
    name = quote(session_id, safe="")
    if len(name) > 150:
        name = "sha256-" + hashlib.sha256(session_id.encode()).hexdigest()
    folder = Path(directory)
    path = folder / f"{name}.{head.head_hash.hex()[:16]}.jsonl.gz"
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb") as zipped:
                export_session(store, session_id, cast(IO[bytes], zipped), marked=True)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, path)
        directory_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except BaseException as exc:
        with suppress(OSError):  # nothing half-written stays behind
            partial.unlink()
        if isinstance(exc, OSError):
            raise StorageError(f"cannot archive session {session_id!r} in {folder}: {exc}") from exc
        raise
    return path


def import_session(store: EventStore, source: Target, as_session: str | None = None) -> Exchanged:
    """Load a file written by :func:`export_session` into ``store`` as a new session, in one
    transaction, a batch of events at a time.

    The chain is verified while it streams (gaps, ``prev_hash`` links, every hash recomputed
    with ``store``'s hasher, then the header's count and head hash, which catch a truncated
    file), and nothing is committed unless all of it holds. Kept as it is, the log keeps its
    hashes; ``as_session`` loads it under another id, re-chained as a fork is (after its own
    chain verified). A file that is cut short, edited, not JSON or of an unknown format
    raises IntegrityError or InvalidInputError, one of another chain mode ChainKeyError, and a
    session that exists SessionExistsError; each leaves ``store`` unchanged.
    """
    with _opened(source, "rb") as file:
        name = _name(source)
        lines = _lines(file, name)
        head, chain, base = _header(next(lines, None), name, store)
        target = head.session_id if as_session is None else as_session
        check_session_id(target)
        check = store.chain_check(head, base)
        rows = _rows(lines, head, check, store, target, name, keyed=chain != "sha256")
        count = store.load(target, rows, base, head.created_at_us)
    last = store.session(target)
    return Exchanged(target, count, GENESIS_HASH if last is None else last.head_hash)


def _rows(
    lines: Iterator[tuple[int, bytes]],
    head: SessionHead,
    check: ChainCheck,
    store: EventStore,
    target: str,
    name: str,
    *,
    keyed: bool,
) -> Iterator[EventRow]:
    """The event rows of the file's lines, each checked against the chain as it passes (the
    first failure raises at once); re-chained under ``target`` when it is another id."""
    prev = check.prev
    count = 0
    for number, line in lines:
        version, kind, key, phase, run_id, payload, at, digest, link = _event(line, number, name)
        check.feed(version, kind, key, phase, run_id, payload, at, digest, link)
        if check.error is not None:
            raise _refused(check.error, name, keyed=keyed)
        if target != head.session_id:
            link = prev
            digest = prev = store.hash_event(
                prev, target, version, kind, key, phase, run_id, at, payload
            )
        count += 1
        yield (target, version, kind, key, phase, run_id, payload, at, digest, link)
    expected = head.version - check.first + 1
    if count != expected:
        raise IntegrityError(
            f"{name}: holds {count} events but its header says {expected}: "
            + ("it is truncated" if count < expected else "it was edited")
            + "; nothing was imported",
            session_id=head.session_id,
        )
    try:
        check.finish()
    except IntegrityError as exc:
        raise _refused(exc, name, keyed=keyed) from None


def _refused(error: IntegrityError, name: str, *, keyed: bool) -> IntegrityError:
    """The chain check's failure as an import's refusal, naming the file."""
    why = f"{name}: {error}; nothing was imported"
    if keyed:
        why += " (the file comes from a keyed chain: it verifies only with the same key)"
    return IntegrityError(why, session_id=error.session_id, version=error.version)


def _header(
    first: tuple[int, bytes] | None, name: str, store: EventStore
) -> tuple[SessionHead, str, Base | None]:
    """The session the header describes, how its chain was hashed, and its base (checked
    against its digest)."""
    not_export = InvalidInputError(f"{name} is not an eventctx session export")
    if first is None:
        raise InvalidInputError(f"{name} is empty: it is not an eventctx session export")
    try:
        header = orjson.loads(first[1])
    except orjson.JSONDecodeError:
        raise not_export from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise not_export
    if header.get("format_version") not in (1, FORMAT_VERSION):
        raise InvalidInputError(
            f"{name} is of format_version {header.get('format_version')!r}; this eventctx "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        session_id, events = header["session_id"], header["events"]
        head_hash, chain = bytes.fromhex(header["head_hash"]), header["chain"]
        if not isinstance(session_id, str) or type(events) is not int or chain not in _CHAINS:
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(f"{name}: its header is incomplete or malformed") from None
    check_session_id(session_id)
    base = _base(header, session_id, name)
    if chain != store.chain_mode:
        raise ChainKeyError(
            f"{name} was exported from a keyed chain ({chain}): it verifies only with the "
            "same key; open the target with it (chain_key= or EVENTCTX_CHAIN_KEY)"
            if chain == "hmac-sha256"
            else f"{name} was exported from an unkeyed chain, but the target's chains are "
            "keyed: import it into a database without a chain key"
        )
    if base is not None and bytes.fromhex(header["base"]["digest"]) != store.bases.digest(base):
        raise IntegrityError(
            f"{name}: its retention base is not what was exported (its digest does not match)"
            + ("; it verifies only with the same key" if chain != "sha256" else "")
            + "; nothing was imported",
            session_id=session_id,
        )
    created_at = header.get("created_at_us") if base is not None else 0
    if type(created_at) is not int or not 0 <= created_at <= INT_MAX:
        raise InvalidInputError(f"{name}: its header's created_at_us is missing or out of range")
    if base is not None and header["format_version"] < FORMAT_VERSION:
        raise InvalidInputError(f"{name}: a base in a format_version 1 file; it was edited")
    return SessionHead(session_id, events, head_hash, created_at, 0, None, ACTIVE), chain, base


def _base(header: dict[str, Any], session_id: str, name: str) -> Base | None:
    """The retention base in a header (format version 2), or None."""
    raw = header.get("base")
    if raw is None:
        return None
    try:
        base = Base(
            session_id,
            raw["version"],
            raw["fold_version"],
            bytes.fromhex(raw["head_hash"]),
            base64.b64decode(raw["state_b64"], validate=True),
            base64.b64decode(raw["history_b64"], validate=True),
        )
        bytes.fromhex(raw["digest"])
        if type(base.version) is not int or type(base.fold_version) is not int:
            raise TypeError
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise InvalidInputError(f"{name}: its base is incomplete or malformed") from None
    return base


def _event(line: bytes, number: int, name: str) -> ChainRow:
    """An event from one line of the file: its chained columns (``ChainRow``)."""
    try:
        item = orjson.loads(line)
        row: ChainRow = (
            item["version"],
            item["type"],
            item["key"],
            item["phase"],
            item["execution_id"],
            base64.b64decode(item["payload_b64"], validate=True),
            item["recorded_at_us"],
            bytes.fromhex(item["hash"]),
            bytes.fromhex(item["prev_hash"]),
        )
    except orjson.JSONDecodeError:
        raise IntegrityError(
            f"{name}: line {number} is not JSON: the file is truncated or was edited; "
            "nothing was imported"
        ) from None
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise IntegrityError(
            f"{name}: line {number} is not an event line; nothing was imported"
        ) from None
    if type(row[0]) is not int or type(row[6]) is not int:  # the version, the time
        raise IntegrityError(f"{name}: line {number} has a malformed event; nothing was imported")
    return row


def _lines(file: IO[bytes], name: str) -> Iterator[tuple[int, bytes]]:
    """The file's lines with their numbers; a damaged gzip stream is a truncated file."""
    try:
        yield from enumerate(file, start=1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IntegrityError(
            f"{name}: the compressed stream is damaged or cut short ({exc}); nothing was imported"
        ) from None


def _name(target: Target) -> str:
    if isinstance(target, str | os.PathLike):
        return os.fspath(target)
    return str(getattr(target, "name", "the file"))


@contextmanager
def _opened(target: Target, mode: str) -> Iterator[IO[bytes]]:
    """``target`` as a binary file: opened (gzip for ``.gz``) and closed when it is a path;
    a path written to is removed again when the block fails."""
    if not isinstance(target, str | os.PathLike):
        yield target
        return
    path = Path(target)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        file = cast(IO[bytes], opener(path, mode))
    except OSError as exc:
        verb = "write" if "w" in mode else "read"
        raise InvalidInputError(f"cannot {verb} {path}: {exc.strerror}") from None
    try:
        with file:
            yield file
    except BaseException:
        if "w" in mode:
            path.unlink(missing_ok=True)
        raise
