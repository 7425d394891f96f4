"""One writer per OUTPUT: a lease that a run takes before it plans and holds until it ends.

Two runs fusing into one OUTPUT would both fuse everything and write every row twice. The lease
makes the second one wait (``--wait``) or stop with exit code 3 and a message naming the holder.

- **Local folders**: ``OUTPUT/.ray-mff.lock``, opened and locked with ``fcntl.flock`` (exclusive,
  non-blocking). The kernel drops the lock when the process dies, however it dies (``kill -9``
  included), so a killed run never blocks the next one. The file's content (run id, host, pid) is
  only for the message. Not for NFS folders whose server does not support ``flock``.
- **Object stores**: ``OUTPUT/.ray-mff.lease``, created with a conditional put (``If-None-Match:
  *``; AWS S3 and moto honour it: the second creator gets ``412 Precondition Failed``). The JSON
  body carries an expiry; the holder rewrites it every ``ttl / 3`` seconds (heartbeat) and deletes
  it at the end. A killed run stops renewing, so its lease lapses after ``ttl`` and the next run
  replaces it. Replacing a lapsed lease (delete, then create-only) is best effort: two runs that
  find the same lapsed lease at the same instant both delete it, but only one create succeeds.
  A store that ignores ``If-None-Match`` gives a weaker, last-writer-wins check (documented in
  ``docs/reliability.md``).

Workers (Ray fusion actors) call :func:`still_held` before they write an output: a driver that
died leaves actors that may finish the stack in hand, and once a newer run holds the lease they
write nothing.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from ray_mff import storage

log = logging.getLogger("ray_mff")

LOCK_NAME = ".ray-mff.lock"
LEASE_NAME = ".ray-mff.lease"
DEFAULT_TTL = 30.0  # heartbeat every 10 s; a killed run blocks the next one for at most this long


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease; ``str()`` names it."""


def lease_uri(output_root: str) -> str:
    return storage.join_uri(output_root, LEASE_NAME if storage.is_remote(output_root) else LOCK_NAME)


@dataclass
class Lease:
    """A held lease: release it (or use ``with``) when the run ends."""

    output_root: str
    token: str
    ttl: float = DEFAULT_TTL
    uri: str = ""
    _fd: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    lost: bool = False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:  # unlink while locked, then closing the descriptor drops the flock
            try:
                os.unlink(storage.resolve(self.uri)[1])
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        elif self.uri and not self.lost:
            try:
                if _read(self.uri).get("token") == self.token:
                    storage.remove(self.uri)
            except Exception as err:  # noqa: BLE001 - it lapses by itself after ttl
                log.warning("lease: could not remove %s (%s); it lapses in %.0f s", self.uri, err, self.ttl)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if _read(self.uri).get("token") != self.token:
                    self.lost = True
                    log.error("lease: %s was taken over by another run; this run stops", self.uri)
                    return
                storage.write_bytes_atomic(self.uri, _body(self.token, self.ttl))
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; ttl covers two misses
                log.warning("lease: heartbeat failed (%s)", err)


def _body(token: str, ttl: float) -> bytes:
    return json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                       "expires": time.time() + ttl, "ttl": ttl}).encode()


def _read(uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(uri) or b"{}")
    except FileNotFoundError:
        return {}
    except ValueError:
        return {"token": "?", "expires": 0}


def _describe(info: dict) -> str:
    who = f"run {info.get('token', '?')} (host {info.get('host', '?')}, pid {info.get('pid', '?')})"
    if "expires" in info:
        who += f", lease expires in {max(0.0, info['expires'] - time.time()):.0f} s unless renewed"
    return who


def acquire(output_root: str, token: str, *, wait: bool = False, ttl: float = DEFAULT_TTL,
            poll: float = 2.0, timeout: float | None = None) -> Lease:
    """Take the lease on ``output_root`` for run ``token``; raise :class:`LeaseHeld` if another run
    has it (unless ``wait``: then poll until it is free, or ``timeout`` seconds pass)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return _try_acquire(output_root, token, ttl)
        except LeaseHeld:
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise
            time.sleep(poll)


def _try_acquire(output_root: str, token: str, ttl: float) -> Lease:
    uri = lease_uri(output_root)
    if not storage.is_remote(output_root):
        import fcntl

        fs, path = storage.resolve(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    info = {}
                os.close(fd)
                raise LeaseHeld(f"{output_root}: another ray-mff run is writing here: {_describe(info)}") from None
            # The holder unlinks the file when it releases: a lock on an unlinked file is no lock.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        body = json.loads(_body(token, ttl))
        body.pop("expires")  # a flock lasts as long as the process: no expiry
        os.pwrite(fd, json.dumps(body).encode(), 0)
        return Lease(output_root, token, ttl, uri, _fd=fd)

    fs, path = storage.resolve(uri)
    for _ in range(2):
        try:
            fs.pipe_file(path, _body(token, ttl), mode="create")
            break
        except (FileExistsError, OSError) as err:
            if not _precondition_failed(err):
                raise
            info = _read(uri)
            if info.get("expires", 0) > time.time():
                raise LeaseHeld(f"{output_root}: another ray-mff run is writing here: {_describe(info)}") from None
            log.warning("lease: %s lapsed (%s); taking it over", uri, _describe(info))
            storage.remove(uri)
    else:
        raise LeaseHeld(f"{output_root}: another run took the lapsed lease first")
    lease = Lease(output_root, token, ttl, uri)
    lease._thread = threading.Thread(target=lease._heartbeat, name="ray-mff-lease", daemon=True)
    lease._thread.start()
    return lease


def _precondition_failed(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return isinstance(err, FileExistsError) or "PreconditionFailed" in text or "412" in text


def still_held(uri: str | None, token: str | None) -> bool:
    """True when the lease at ``uri`` still names run ``token`` (or no lease is used)."""
    if not uri or not token:
        return True
    try:
        return _read(uri).get("token") == token
    except Exception:  # noqa: BLE001 - cannot tell: do not block the write on a flaky read
        return True
