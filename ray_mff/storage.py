"""The one filesystem resolver: a uri (local path, ``file://``, ``s3://``, any fsspec URL) -> (fs, path).

Every module that touches bytes on disk or in an object store goes through here, so endpoint
and credential handling live in one place.

S3 endpoint, in order of precedence (the first set wins):

1. the explicit ``s3_endpoint`` argument,
2. the process-wide default from :func:`set_s3_endpoint` (the CLI's ``--s3-endpoint``),
3. ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL`` (the variables the AWS CLI and SDKs honour),
4. AWS's default endpoint.

Credentials are never passed or logged here: s3fs/botocore find them in the usual AWS
environment variables, ``~/.aws`` config/credentials files, or the instance role.

Filesystem instances are cached by fsspec itself (one instance per protocol + options, per
process; fsspec drops the cache in a forked child), so calling :func:`resolve` per file is cheap.

Example::

    >>> fs, path = resolve("/tmp/x.png")
    >>> fs.protocol[0], path
    ('file', '/tmp/x.png')
"""
from __future__ import annotations

import os
import posixpath
import secrets
from typing import Iterable, Iterator, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

_LOCAL_PROTOCOLS = frozenset({"file", "local"})

# botocore client settings for every S3 filesystem: a refused or silent endpoint fails in seconds
# (connect), a slow GET of a large plane still completes (read), two attempts per request.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}
S3FS_RETRIES = 2
# The start-of-run check: one attempt, short timeouts, so a wrong endpoint is a setup error in
# about a second instead of a traceback after 20 s of retries.
MIN_FREE_BYTES = 64 * 1024  # a local OUTPUT with less free space than this counts as full
S3_LIST_PAGE = 1000  # keys per ListObjectsV2 request (S3's own maximum) when listing folder by folder
PROBE_CONFIG = {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}
_S3_PROTOCOLS = frozenset({"s3", "s3a"})


class FileEntry(NamedTuple):
    """One file found by :func:`list_files`: its uri (in the root's own spelling), its path
    relative to the root (posix separators), its size in bytes and its *version*: what the
    listing says about the content for free (the ETag on object stores, the modification time
    in nanoseconds on local disks), so a file replaced by one of the same size is still noticed."""

    uri: str
    relpath: str
    size: int | None
    version: str | None = None


def _version(info: dict) -> str | None:
    """ETag (object stores) or mtime (local disks) from an fsspec ``info`` dict; None if neither."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if mtime is None:
        return None
    if isinstance(mtime, (int, float)):
        return str(int(round(float(mtime) * 1e9)))
    return str(mtime)


def s3_endpoint_from_env() -> str | None:
    """The S3 endpoint override the AWS tools honour: ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# Process-wide default set by the CLI's --s3-endpoint (and by each Ray fusion actor from the
# driver's value), so code that only passes uris (io.read_image, manifest parts) reaches the same store.
_s3_endpoint_default: str | None = None


def set_s3_endpoint(url: str | None) -> None:
    """Make ``url`` this process's S3 endpoint: it ranks below an explicit ``s3_endpoint``
    argument and above the environment variables. ``None`` clears it."""
    global _s3_endpoint_default
    _s3_endpoint_default = url or None


def effective_s3_endpoint(s3_endpoint: str | None = None) -> str | None:
    """The endpoint :func:`resolve` uses for ``s3://`` uris: explicit > :func:`set_s3_endpoint` > env."""
    return s3_endpoint or _s3_endpoint_default or s3_endpoint_from_env()


def protocol(uri: str) -> str:
    """``"file"`` for local paths and ``file://`` uris, else the URL scheme (``"s3"``, ``"gcs"``, ...)."""
    return get_protocol(str(uri))


def is_remote(uri: str) -> bool:
    """True when ``uri`` names an object store or other non-local filesystem."""
    return protocol(uri) not in _LOCAL_PROTOCOLS


def resolve(uri: str, *, s3_endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """uri -> (fsspec filesystem, path within it).

    ``s3://`` uris get an ``s3fs.S3FileSystem`` pointed at :func:`effective_s3_endpoint`
    (see module docstring); all other uris go through ``fsspec.url_to_fs``.
    Local paths come back absolute.
    """
    uri = os.fspath(uri)
    proto = protocol(uri)
    options: dict = {}
    if proto in _S3_PROTOCOLS:
        endpoint = effective_s3_endpoint(s3_endpoint)
        if endpoint:
            options["endpoint_url"] = endpoint
        options["config_kwargs"] = S3_CONFIG
    # fsspec caches the instance for equal (protocol, options): no cache of our own needed.
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if proto in _S3_PROTOCOLS:
        # s3fs retries each call 5 times on top of botocore's own attempts: 5-11 s per stack once
        # the store is gone. The runner retries whole reads/writes with backoff and then asks
        # :func:`probe` whether the store is still there, so one layer of short retries is enough.
        fs.retries = S3FS_RETRIES
    return fs, path


def join_uri(root: str, *parts: str) -> str:
    """Join path parts onto a root, keeping the root's spelling (local path or URL).

    >>> join_uri("s3://bucket/in/", "a", "b.png")
    's3://bucket/in/a/b.png'
    """
    root = os.fspath(root)
    parts = tuple(str(p).strip("/") for p in parts if str(p).strip("/"))
    if "://" in root:
        head = root.rstrip("/")
        if head.endswith(":/"):  # "s3://" + "bucket" must not lose the second slash
            head += "/"
        return "/".join((head, *parts)) if parts else head
    return os.path.join(root, *parts) if parts else root


def basename(uri: str) -> str:
    """Last path component of a uri or local path (``s3://b/p/`` -> ``p``, ``s3://b`` -> ``b``)."""
    uri = os.fspath(uri)
    if "://" in uri:
        return posixpath.basename(uri.split("://", 1)[1].rstrip("/"))
    return os.path.basename(os.path.abspath(uri))


def exists(uri: str, *, s3_endpoint: str | None = None) -> bool:
    fs, path = resolve(uri, s3_endpoint=s3_endpoint)
    return fs.exists(path)


def list_files(root: str, *, s3_endpoint: str | None = None) -> list[FileEntry]:
    """Every file under a folder or prefix (recursive), sorted by uri, with sizes from the listing.

    Directory placeholders (S3 keys ending in ``/``) are left out. The uris keep the root's
    spelling (``join_uri(root, relative_path)``), so a relative root gives relative paths and an
    ``s3://`` root gives ``s3://`` uris. A missing root lists as empty.
    """
    return walk(root, s3_endpoint=s3_endpoint)[0]


def walk(root: str, *, s3_endpoint: str | None = None) -> tuple[list[FileEntry], list[str]]:
    """One recursive listing -> (files as in :func:`list_files`, sub-folders as sorted relative posix paths).

    On object stores a "folder" is seen when it holds keys or exists as a ``name/`` marker key;
    that is how discovery notices an empty stack folder.
    """
    fs, path = resolve(root, s3_endpoint=s3_endpoint)
    if is_remote(root):
        _forget_listings(fs, path)  # listings are taken once per job: always fresh
    if fs.isfile(path):
        info = fs.info(path)
        return [FileEntry(os.fspath(root), basename(root), info.get("size"), _version(info))], []
    if not fs.isdir(path):
        return [], []
    prefix = path.rstrip("/") + "/"
    files, dirs = [], set()
    for p, info in fs.find(path, withdirs=True, detail=True).items():
        if not p.startswith(prefix):
            continue
        rel = p[len(prefix):]
        if info.get("type") == "directory" or p.endswith("/"):
            if rel.strip("/"):
                dirs.add(rel.strip("/"))
            continue
        files.append(FileEntry(join_uri(root, *rel.split("/")), rel, info.get("size"), _version(info)))
    return sorted(files), sorted(dirs)


def iter_folders(root: str, *, s3_endpoint: str | None = None,
                 top: Iterable[str] | None = None) -> Iterator[tuple[str, list[FileEntry]]]:
    """The listing of :func:`walk`, one folder at a time: ``(folder, its files)`` for every folder
    under ``root`` (posix path relative to the root; ``""`` is the root itself), each folder once,
    after all of its sub-folders, the root last. Empty folders come too (a local directory, an S3
    ``name/`` marker key). Same uris, sizes and versions as :func:`walk`.

    What is held at once is the files of the folders on the path being listed, not the archive's
    listing (fsspec's ``find(detail=True)`` builds a dict of every entry first):

    - local: ``os.scandir`` depth first, one ``lstat`` per file (the size and mtime fsspec's ``info`` gives);
    - S3: one flat ``ListObjectsV2`` page at a time (1000 keys a request, as ``find``): keys come in
      UTF-8 order, so everything under a folder is contiguous and the folder is complete once the
      keys leave its prefix;
    - any other fsspec filesystem: :func:`walk`'s listing, held whole, in the same order.

    ``top`` (local roots only): list only these sub-folders of the root (names, as
    :func:`local_top` gives them), and not the root itself: one share of a parallel discovery.
    """
    fs, path = resolve(root, s3_endpoint=s3_endpoint)
    if is_remote(root):
        _forget_listings(fs, path)  # listings are taken once per job: always fresh
    if isinstance(fs, LocalFileSystem):
        return _local_folders(os.fspath(root), path, None if top is None else list(top))
    if top is not None:
        raise ValueError(f"{root}: listing chosen sub-folders is for local folders only")
    if protocol(root) in _S3_PROTOCOLS and hasattr(fs, "call_s3"):
        items = _s3_entries(root, fs, path)
    else:
        files, dirs = walk(root, s3_endpoint=s3_endpoint)
        items = (item for _, item in sorted([(d + "/", d) for d in dirs] + [(f.relpath, f) for f in files]))
    return _by_folder(items)


def _by_folder(items) -> Iterator[tuple[str, list[FileEntry]]]:
    """Files and folders (a folder as its relative path) where each folder's contents are
    contiguous -> ``(folder, files)`` as each folder is complete (after its sub-folders)."""
    open_: list[tuple[str, list[FileEntry]]] = [("", [])]  # the folders on the current path
    for item in items:
        folder, entry = (item, None) if isinstance(item, str) else (item.relpath.rpartition("/")[0], item)
        while len(open_) > 1 and not (folder == open_[-1][0] or folder.startswith(open_[-1][0] + "/")):
            yield open_.pop()  # left its prefix: complete
        top = open_[-1][0]
        rest = folder[len(top) + 1:] if top else folder
        for part in rest.split("/") if rest else ():
            top = f"{top}/{part}" if top else part
            open_.append((top, []))
        if entry is not None:
            open_[-1][1].append(entry)
    while open_:
        yield open_.pop()


def _local_folders(root: str, path: str, top: list[str] | None = None) -> Iterator[tuple[str, list[FileEntry]]]:
    """Depth first with ``os.scandir``: a folder's ``(relative path, files)`` after its sub-folders'.
    Held: the open folders' files and ``scandir`` iterators, one per level. ``top``: only these
    sub-folders of the root, and not the root."""
    join = _uri_join(root)

    def visit(folder: str, rel: str, uri: str):
        files = []
        try:
            it = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):  # gone since its parent was listed
            it = None
        if it is not None:
            with it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):  # what fsspec calls a directory
                        sub = f"{rel}/{e.name}" if rel else e.name
                        yield from visit(e.path, sub, join(uri, e.name))
                        continue
                    entry = _local_entry(e, rel, uri, join)
                    if entry is not None:
                        files.append(entry)
        yield rel, files

    if top is not None:
        for name in top:
            yield from visit(os.path.join(path, name), name, join(root, name))
    elif os.path.isdir(path):
        yield from visit(path, "", root)
    else:
        yield "", []


def local_top(root: str) -> tuple[list[str], list[FileEntry]]:
    """A local root's sub-folder names (``scandir`` order) and its own files as :func:`iter_folders`
    lists them, from one ``scandir``: how a parallel discovery shares out the root's sub-folders."""
    path = resolve(root)[1]
    names, files = [], []
    join = _uri_join(os.fspath(root))
    with os.scandir(path) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                names.append(e.name)
            else:
                entry = _local_entry(e, "", os.fspath(root), join)
                if entry is not None:
                    files.append(entry)
    return names, files


def _uri_join(root: str):
    return join_uri if "://" in root else os.path.join  # as join_uri(root, *parts) spells them


def _local_entry(e: os.DirEntry, rel: str, uri: str, join) -> FileEntry | None:
    try:
        size, version = _local_size_version(e)
    except FileNotFoundError:  # gone since the folder was listed
        return None
    return FileEntry(join(uri, e.name), f"{rel}/{e.name}" if rel else e.name, size, version)


def _local_size_version(entry: os.DirEntry) -> tuple[int, str | None]:
    """Size and version of a scandir entry exactly as :func:`walk` gets them through fsspec's
    ``LocalFileSystem.info`` (``lstat``; a symlink's size is its target's, its mtime its own), without
    building fsspec's info dict per file."""
    st = entry.stat(follow_symlinks=False)
    size = st.st_size
    if entry.is_symlink():
        try:
            size = entry.stat(follow_symlinks=True).st_size
        except OSError:
            size = 0
    return size, _version({"mtime": st.st_mtime})


def _s3_entries(root: str, fs, path: str):
    """Keys under the prefix, one ListObjectsV2 page at a time, in key order; ``name/`` markers as folders."""
    bucket, _, key = path.partition("/")
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_LIST_PAGE, **getattr(fs, "req_kw", {})}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", ()):
            rel = obj["Key"][len(prefix):]
            if rel.endswith("/"):
                if rel.strip("/"):
                    yield rel.strip("/")
                continue
            yield FileEntry(join_uri(root, *rel.split("/")), rel, obj.get("Size"), _version(obj))
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _forget_listings(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop cached listings of ``path``, its parents and everything under it.

    ``invalidate_cache(path)`` alone keeps the sub-folders' listings, and s3fs answers
    ``info``/``size`` (which ``cat_file`` calls) from them: in a long-lived process a file
    uploaded into an already-listed folder would be found by the new listing yet read as missing.
    """
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    if cache:
        below = path.rstrip("/") + "/"
        for key in [k for k in list(cache) if k.startswith(below)]:
            cache.pop(key, None)


def read_bytes(uri: str, *, s3_endpoint: str | None = None, fs: fsspec.AbstractFileSystem | None = None) -> bytes:
    """The whole content of a file. Raises FileNotFoundError / PermissionError / OSError as the fs does."""
    if fs is None:
        fs, path = resolve(uri, s3_endpoint=s3_endpoint)
    else:
        path = uri
    return fs.cat_file(path)


def write_bytes_atomic(
    uri: str, data: bytes, *, s3_endpoint: str | None = None, fs: fsspec.AbstractFileSystem | None = None
) -> None:
    """Write ``data`` so that readers see either no file or the whole file, never a partial one.

    Local: write a hidden temp file in the destination folder (same filesystem, so the rename
    is atomic), fsync it, then ``os.replace`` it onto the name; the temp file is removed on any
    error. Remote: one put (``pipe_file``); S3 makes an object visible only when the PUT or
    multipart upload completes. Parent folders are created as needed.
    """
    if fs is None:
        fs, path = resolve(uri, s3_endpoint=s3_endpoint)
    else:
        path = uri
    data = bytes(data)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    path = LocalFileSystem._strip_protocol(path)
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    # Leading dot: discovery ignores hidden names, so a crashed writer's leftover is never a stack member.
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 respects the umask (mkstemp would leave the final file 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove(uri: str, *, missing_ok: bool = True, s3_endpoint: str | None = None) -> None:
    """Delete one file; a missing file is fine unless ``missing_ok=False``."""
    fs, path = resolve(uri, s3_endpoint=s3_endpoint)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


# ------------------------------------------------------------------------------ failures and probes


class StorageUnavailable(OSError):
    """A folder or bucket cannot be reached or written: the endpoint is down or wrong, the bucket is
    missing, credentials are refused, the disk is full or read-only. ``str()`` is one line that
    names the uri and the reason."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = str(uri), reason
        super().__init__(f"{self.uri}: {reason}")

    def __reduce__(self):
        return (self.__class__, (self.uri, self.reason))


# errno values that mean "the storage, not the file": full, over quota, read-only, I/O error, gone.
_STORAGE_ERRNOS = {28, 122, 30, 5, 107, 110, 111, 112, 113, 104, 103}  # ENOSPC EDQUOT EROFS EIO ...
_STORAGE_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                  "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError",
                  "TimeoutError", "HTTPClientError", "NoCredentialsError", "IncompleteRead",
                  "ProxyConnectionError", "SSLError", "ResponseStreamingError", "ServiceUnavailable",
                  "SlowDown", "InternalError", "RequestTimeout")


def is_storage_failure(err: BaseException | None) -> bool:
    """True when ``err`` (or an exception it wraps) says the *storage* failed rather than the file:
    connection refused/reset/timed out, 5xx and throttling, no space left, read-only filesystem,
    I/O error. Such failures are transient: the stack is retried, now and on the next run.
    A missing file, a permission refused on one file or undecodable bytes are not."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, StorageUnavailable):
            return True
        if isinstance(err, OSError) and getattr(err, "errno", None) in _STORAGE_ERRNOS:
            return True
        names = {t.__name__ for t in type(err).__mro__}
        if names & set(_STORAGE_NAMES):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def probe(uri: str, *, write: bool = False, s3_endpoint: str | None = None, timeout: float = 2.0) -> None:
    """Check quickly that ``uri`` (a folder or prefix) can be reached, and written when ``write``.

    Object stores are asked once with short timeouts (:data:`PROBE_CONFIG`) through a fresh client,
    so a wrong endpoint, a missing bucket or refused credentials fail in seconds. Writing is checked
    by creating and deleting a hidden probe file (a read-only folder, a full disk, a bucket the
    credentials may not write). Raises :class:`StorageUnavailable` with a one-line reason.
    """
    uri = os.fspath(uri)
    proto = protocol(uri)
    try:
        if proto in _S3_PROTOCOLS:
            import s3fs

            options = {"skip_instance_cache": True, "config_kwargs": {**PROBE_CONFIG, "connect_timeout": timeout}}
            endpoint = effective_s3_endpoint(s3_endpoint)
            if endpoint:
                options["endpoint_url"] = endpoint
            fs = s3fs.S3FileSystem(**options)
            fs.retries = 1
            path = fs._strip_protocol(uri).rstrip("/")
            bucket = path.split("/", 1)[0]
            # one LIST of at most one key: reachable, bucket exists, credentials accepted
            fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        else:
            fs, path = resolve(uri, s3_endpoint=s3_endpoint)
            if not write and not fs.exists(path):
                raise StorageUnavailable(uri, "no such folder")
        if write and proto not in _S3_PROTOCOLS and os.path.isdir(path):
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free < MIN_FREE_BYTES:  # a probe byte may still fit where no image does
                raise StorageUnavailable(uri, f"no space left on device ({free // 1024} KiB free)")
        if write:
            name = f".ray-mff-probe-{secrets.token_hex(4)}"
            target = join_uri(path, name) if proto in _S3_PROTOCOLS else os.path.join(path, name)
            if proto in _S3_PROTOCOLS:
                fs.pipe_file(target, b"probe")
            else:
                write_bytes_atomic(target, b"probe", fs=fs)
            fs.rm_file(target)
    except StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - every failure here is one line for the user
        raise StorageUnavailable(uri, _one_line(err, write)) from None


def _one_line(err: BaseException, write: bool) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    name = type(err).__name__
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{'not writable' if write else 'not readable'}: permission denied"
    if isinstance(err, FileNotFoundError) or "NoSuchBucket" in text:
        return "no such bucket or folder"
    if isinstance(err, OSError) and err.errno == 28:
        return "no space left on device"
    if isinstance(err, OSError) and err.errno == 30:
        return "read-only file system"
    if "Could not connect" in text or "Connect" in name or "Timeout" in name:
        return f"cannot reach the storage endpoint ({text or name})"
    return f"{name}: {text}" if text else name
