"""Stack discovery: a local folder or an s3:// prefix becomes a list of stacks, without reading pixels.

Only names are listed (one recursive listing, sizes from it); no image is opened. The result is
the job's manifest: one :class:`Stack` per fusion job, plus *error rows* (stacks with
``meta["error"]``) for whatever cannot be fused, so nothing in the input disappears silently.
The listing is taken folder by folder (:func:`ray_mff.storage.iter_folders`) and the rules below
apply per folder as it completes (:class:`Discovery`): :func:`discover_stacks` returns a list,
:func:`ray_mff.listing.discover_listing` the same stacks as a compact listing for archives of
millions (what ``ray-mff fuse`` plans from).

Layouts, decided per folder (the root or any sub-folder that holds files):

1. **Pattern layout** — file names carry the stack and the member index. A file's name without
   its extension is matched (full match) against the built-in patterns below, in order; the first
   that matches gives its ``(stack, index)``:

   - ``micromanager``: ``img_channel000_position000_time000000000_z000`` ->
     stack ``img_channel000_position000_time000000000`` (channel + position + time), index ``000``
   - ``z-plane+tags``: ``sample7_z003_c1`` (tags after the z: ``c1``, ``t02``, ``w2``...) ->
     stack ``sample7_c1``, index ``003``; channels stay separate stacks
   - ``z-plane``: ``sample_z012``, ``sample-Z12`` -> stack ``sample``, index ``012``
   - ``letter``: ``lytro_01_A``, ``lytro-01-B`` -> stack ``lytro_01`` / ``lytro-01``, index ``A`` / ``B``
   - ``number``: ``scene_1``, ``scene-10``, Micro-Manager 1.4 ``img_000000000_DAPI_000`` ->
     stack ``scene`` / ``img_000000000_DAPI``, index ``1`` / ``10`` / ``000``

   The separator before the index is ``_`` or ``-``; the stack part is everything before the last one.
   Stack ids are the stack part at the root, ``<folder>__<stack part>`` in a sub-folder.

2. **Folder layout** — a sub-folder holding one stack: the stack id is the folder's relative
   path, the members are its image files. A sub-folder uses this layout unless its names split it
   into two or more stacks by the patterns above (so ``data/lytro/`` is still 20 pairs, while
   ``data/stack_v4/V001.jpg..V065.jpg`` and ``scene1/img_1.png, img_2.png`` are one stack each).
   The root itself uses it only when none of its image names match a pattern (so a root that *is*
   ``stack_v4/`` is one 65-image stack named ``stack_v4``; a root of ``scene_A, scene_B`` is stack
   ``scene``).

A user ``pattern`` (regex) replaces the built-ins. It is full-matched against the file name
without extension, then against the whole name, and must have a named group ``index``. With a
``stack`` group it drives the pattern layout in every folder; without one, every folder is one
stack and the regex only gives the member index.

Member order is natural order of the index (``A < B < C``, ``2 < 10``), then of the name.

Rules for the rest (each becomes an error row naming the file, never a crash):

- Hidden names (leading ``.``: ``.DS_Store``, macOS ``._*``, our own atomic-write temp files) are
  ignored entirely.
- Members are files with an image extension (.png .jpg .jpeg .tif .tiff, any case).
- A non-image file whose name parses to ``(stack, index)`` of a stack in its folder, at an index no
  image file holds, *joins that stack* (``foo_B.txt`` beside ``foo_A.png``): its name claims a focal
  plane, and fusing without it would silently drop one; reading it then fails with
  ``NotAnImageError`` naming it. Any other non-image file (a ``notes.txt`` in a stack folder, a
  ``foo_A.json`` sidecar) becomes its own error row (``layout="file"``); its neighbours still fuse.
- An image whose name matches no pattern (pattern layout) becomes its own error row.
- An empty folder becomes an error row with no uris.
- Two image files claiming the same index of one stack (``foo_A.png``, ``foo_A.jpg``) make that
  stack an error row.
- A one-image stack is kept (passed through unfused) with ``meta["warning"]``.

Stack ids are unique and filesystem-safe (``[\\w.-]``, folder parts joined by ``__``; a clash gets
``-2``, ``-3``...). Stacks come back sorted by id.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .errors import EmptyStackError
from .io import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Stack:
    """N registered images of one scene. ``uris`` are sorted by member index.

    meta carries discovery facts: ``layout`` ("folder", "pattern", or "file" for a stray file),
    ``folder`` (relative folder, "" for the root), ``indices`` (the member labels), ``sizes``
    (bytes, from the listing), ``pattern`` (which pattern named the members), and ``error``
    (a reason string) for a stack that cannot be fused (empty/unmatched/not an image), or
    ``warning`` (e.g. a one-image stack passed through).
    """

    id: str
    uris: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)


# (name, regex full-matched on the file stem). Order matters: the first match wins. A ``tags``
# group (dimension tags after the z index) is appended to the stack part.
BUILTIN_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("micromanager", re.compile(r"(?P<stack>.*channel\d+_position\d+_time\d+)_z(?P<index>\d+)")),
    ("z-plane+tags", re.compile(r"(?P<stack>.+?)[_-][zZ](?P<index>\d+)(?P<tags>(?:[_-][A-Za-z]+\d+)+)")),
    ("z-plane", re.compile(r"(?P<stack>.+)[_-][zZ](?P<index>\d+)")),
    ("letter", re.compile(r"(?P<stack>.+)[_-](?P<index>[A-Za-z])")),
    ("number", re.compile(r"(?P<stack>.+)[_-](?P<index>\d+)")),
)

_DIGITS = re.compile(r"([0-9]+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value and text case-insensitively: ``A<B<C``, ``2<10``.

    >>> sorted(["z10", "z2", "B", "a"], key=natural_key)
    ['a', 'B', 'z2', 'z10']
    """
    key = []
    for part in _DIGITS.split(text):
        if not part:
            continue
        if part[0] in "0123456789":
            key.append((0, int(part), part))
        else:
            key.append((1, part.casefold(), part))
    return tuple(key)


def natural_sort_text(text: str) -> str:
    """:func:`natural_key` as one string: sorting by it (code point order, as Python compares str and
    Arrow compares UTF-8) sorts exactly as by ``natural_key``, so an Arrow column of these sorts a
    listing table naturally without a Python tuple per row.

    Each part of the key is self-delimiting: a digit run is ``\\x01``, its value's length (one
    character), its value, then the run itself; a text run is ``\\x02``, its casefold, then itself;
    ``\\x00`` ends each (no name holds it), so a prefix sorts first as in tuple comparison.

    >>> sorted(["z10", "z2", "B", "a"], key=natural_sort_text)
    ['a', 'B', 'z2', 'z10']
    """
    out = []
    for part in _DIGITS.split(text):
        if not part:
            continue
        if part[0] in "0123456789":
            value = str(int(part))
            out.append(f"\x01{chr(0x20 + len(value))}{value}\x00{part}\x00")
        else:
            out.append(f"\x02{part.casefold()}\x00{part}\x00")
    return "".join(out)


def safe_id(text: str) -> str:
    """A filesystem-safe stack id: word characters, ``.`` and ``-`` kept, runs of others -> ``_``."""
    s = re.sub(r"[^\w.-]+", "_", text)
    s = re.sub(r"\.{2,}", ".", s).strip("._-")  # no "..", no hidden or option-like names
    return s[:200] or "stack"


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _Namer:
    """Parses a file name into (stack, index, pattern name) with a user regex or the built-ins."""

    def __init__(self, pattern: str | re.Pattern | None):
        self.user = None
        if pattern is not None:
            self.user = re.compile(pattern) if isinstance(pattern, str) else pattern
            if "index" not in self.user.groupindex:
                raise ValueError(f"stack pattern {self.user.pattern!r} needs a named group 'index'")
        self.user_has_stack = self.user is not None and "stack" in self.user.groupindex

    def parse(self, name: str) -> tuple[str | None, str, str] | None:
        stem = os.path.splitext(name)[0]
        if self.user is not None:
            m = self.user.fullmatch(stem) or self.user.fullmatch(name)
            if m is None or m.group("index") is None:
                return None
            return (m.group("stack") if self.user_has_stack else None), m.group("index"), "user"
        for pname, rx in BUILTIN_PATTERNS:
            m = rx.fullmatch(stem)
            if m:
                stack = m.group("stack") + (m.group("tags") if "tags" in rx.groupindex else "")
                return stack, m.group("index"), pname
        return None


@dataclass
class _File:
    uri: str
    name: str
    size: int | None
    version: str | None = None  # ETag or mtime from the listing (storage.FileEntry.version)


def _folder_id(folder: str, root: str) -> str:
    return safe_id(folder.replace("/", "__")) if folder else safe_id(storage.basename(root))


def _prefixed(folder: str, key: str) -> str:
    return safe_id(folder.replace("/", "__") + "__" + key) if folder else safe_id(key)


def _stray(folder: str, f: _File, reason: str) -> Stack:
    rel = f"{folder}/{f.name}" if folder else f.name
    meta = {"layout": "file", "folder": folder, "indices": (), "sizes": (f.size,), "versions": (f.version,),
            "error": reason}
    return Stack(safe_id(rel.replace("/", "__")), (f.uri,), meta)


def _make_stack(sid: str, folder: str, layout: str, pattern: str | None, members: list[tuple[str, _File]]) -> Stack:
    """members: (index label, file). Sorted naturally; duplicates and one-image stacks flagged."""
    members = sorted(members, key=lambda m: (natural_key(m[0]), natural_key(m[1].name)))
    meta = {
        "layout": layout,
        "folder": folder,
        "indices": tuple(i for i, _ in members),
        "sizes": tuple(f.size for _, f in members),
        "versions": tuple(f.version for _, f in members),
    }
    if pattern:
        meta["pattern"] = pattern
    seen: dict[str, str] = {}
    dups = []
    for idx, f in members:
        k = idx.casefold()
        if k in seen:
            dups.append(f"{seen[k]}, {f.name} both claim index {idx!r}")
        else:
            seen[k] = f.name
    if dups:
        meta["error"] = "ambiguous members: " + "; ".join(dups)
    elif len(members) == 1:
        meta["warning"] = "only one image: passed through unfused"
    return Stack(sid, tuple(f.uri for _, f in members), meta)


def _folder_stacks(folder: str, files: list[_File], root: str, namer: _Namer) -> list[Stack]:
    images, others = [], []
    for f in files:
        (images if is_image_name(f.name) else others).append(f)
    parsed = {f.name: namer.parse(f.name) for f in images}
    keys = {p[0] for p in parsed.values() if p is not None}
    unmatched = [f for f in images if parsed[f.name] is None]

    if namer.user is not None:
        folder_layout = not namer.user_has_stack
    else:
        # Sub-folders are one stack unless names split them into several; the root only when no name parses.
        folder_layout = len(keys) <= 1 if folder else not keys

    out: list[Stack] = []
    if folder_layout:
        if namer.user is not None:  # user regex without a stack group: it must give every index
            out += [_stray(folder, f, "file name does not match the stack pattern") for f in unmatched]
            members = [(parsed[f.name][1], f) for f in images if parsed[f.name] is not None]
            pattern = "user"
        elif images and not unmatched:
            members = [(parsed[f.name][1], f) for f in images]
            pattern = parsed[images[0].name][2]
        else:  # names do not all parse: order by name
            members = [(os.path.splitext(f.name)[0], f) for f in images]
            pattern = None
        taken = {i.casefold() for i, _ in members}
        for f in others:
            p = namer.parse(f.name) if pattern else None
            if p is not None and (namer.user is not None or p[0] in keys) and p[1].casefold() not in taken:
                members.append((p[1], f))  # its name claims a missing focal plane: the reader will reject it
                taken.add(p[1].casefold())
            else:
                ext = os.path.splitext(f.name)[1] or "no extension"
                out.append(_stray(folder, f, f"not an image file ({ext}) and not a member of any stack"))
        if members:
            out.append(_make_stack(_folder_id(folder, root), folder, "folder", pattern, members))
        elif not others and not unmatched:
            out.append(Stack(_folder_id(folder, root), (), {"layout": "folder", "folder": folder, "indices": (),
                                                            "sizes": (), "error": "empty folder: no image files",
                                                            "folder_uri": storage.join_uri(root, folder) if folder else root}))
        return out

    groups: dict[str, list[tuple[str, _File]]] = {}
    pattern_of: dict[str, str] = {}
    for f in images:
        p = parsed[f.name]
        if p is None:
            what = "does not match the stack pattern" if namer.user is not None else "matches no built-in stack pattern"
            out.append(_stray(folder, f, f"file name {what}: cannot tell its stack"))
            continue
        groups.setdefault(p[0], []).append((p[1], f))
        pattern_of.setdefault(p[0], p[2])
    for f in others:
        p = namer.parse(f.name)
        taken = {i.casefold() for i, _ in groups.get(p[0], ())} if p is not None else set()
        if p is not None and p[0] in groups and p[1].casefold() not in taken:
            groups[p[0]].append((p[1], f))  # as above: a claimed, missing focal plane
        else:
            ext = os.path.splitext(f.name)[1] or "no extension"
            out.append(_stray(folder, f, f"not an image file ({ext}) and not a member of any stack"))
    for key, members in groups.items():
        out.append(_make_stack(_prefixed(folder, key), folder, "pattern", pattern_of[key], members))
    return out


def unique_ids(stacks: list[Stack], taken: set[str] | None = None) -> list[Stack]:
    """Stacks sorted by id, a clashing id renamed ``-2``, ``-3``... (never to an id in ``taken``:
    the ids of stacks not passed, when only the clashing ones are)."""
    stacks = sorted(stacks, key=lambda s: (natural_key(s.id), s.uris))
    taken = {s.id for s in stacks} | (taken or set())
    out, used = [], set()
    for s in stacks:
        if s.id in used:
            n = 2
            while f"{s.id}-{n}" in taken:
                n += 1
            new = f"{s.id}-{n}"
            taken.add(new)
            s = Stack(new, s.uris, {**s.meta, "id_note": f"renamed from {s.id!r}: id already taken"})
        used.add(s.id)
        out.append(s)
    return sorted(out, key=lambda s: (natural_key(s.id), s.id))


def _single_file_stacks(entries, stack_per_file: bool) -> tuple[list[Stack], set[str]]:
    """Stacks that are one file or one zarr image each, and the relpaths they claim (names only).

    - an OME-Zarr image is a group whose level-0 array is ``0`` (``<img>/0/.zarray`` or
      ``<img>/0/zarr.json``) inside a ``*.zarr`` folder, ``labels`` excepted: a single image, each
      image of a plate (``plate.zarr/A/1/0``) or of a folder of images;
    - ``.ome.tif(f)`` and vendor files (``.czi``, ``.nd2``, ``.lif``), unless the name says it is one
      plane (``x_z003.ome.tif``: a z-plane pattern), and with ``stack_per_file`` every image file:
      a single-file z-stack (:mod:`ray_mff.zstack`).
    """
    from ray_mff.zstack import VENDOR_EXTENSIONS, is_single_file_stack_name

    if not stack_per_file and not any(".zarr" in low or low.endswith((".ome.tif", ".ome.tiff", *VENDOR_EXTENSIONS))
                                      for low in (e.relpath.lower() for e in entries)):
        return [], set()  # the common folder of plain images: nothing below can apply (discovery's hot path)
    images: dict[str, str] = {}
    claimed: set[str] = set()
    plane_namer = _Namer(None)
    out: list[Stack] = []
    for entry in entries:
        parts = entry.relpath.split("/")
        z = next((i for i, p in enumerate(parts) if p.lower().endswith(".zarr")), None)
        if z is not None:
            claimed.add(entry.relpath)
            if len(parts) >= z + 3 and parts[-1] in (".zarray", "zarr.json") and parts[-2] == "0" \
                    and "labels" not in parts[z + 1:]:
                prefix = "/".join(parts[:-2])
                images[prefix] = entry.uri[: len(entry.uri) - len("/".join(parts[-2:])) - 1]
            continue
        name = parts[-1]
        parsed = plane_namer.parse(re.sub(r"\.ome(?=\.tiff?$)", "", name, flags=re.I)) \
            if name.lower().endswith((".ome.tif", ".ome.tiff")) else None
        if parsed is not None and parsed[2] in ("micromanager", "z-plane+tags", "z-plane") and not stack_per_file:
            continue  # one plane per file (x_z003.ome.tif): the pattern layout groups them
        if is_single_file_stack_name(name) or (stack_per_file and is_image_name(name)):
            claimed.add(entry.relpath)
            stem = re.sub(r"(\.ome)?\.[^.]+$", "", entry.relpath, flags=re.I)
            out.append(Stack(safe_id(stem.replace("/", "__")), (entry.uri,),
                             {"layout": "file", "folder": "/".join(parts[:-1]), "indices": ("0",),
                              "sizes": (entry.size,), "versions": (entry.version,)}))
    zarr_files = sorted((e.relpath, e.size or 0, e.version) for e in entries
                        if ".zarr/" in e.relpath.lower() or e.relpath.lower().endswith(".zarr"))
    for prefix, uri in images.items():
        # an image's identity for reruns: every file of its store (metadata and chunks), as listed
        lo = bisect.bisect_left(zarr_files, (prefix + "/",))
        hi = bisect.bisect_left(zarr_files, (prefix + "0",))  # "0" sorts right after "/"
        files = zarr_files[lo:hi]
        version = hashlib.sha1(repr(files).encode()).hexdigest()[:16]
        sid = safe_id(re.sub(r"(\.ome)?\.zarr(?=/|$)", "", prefix, flags=re.I).replace("/", "__"))
        out.append(Stack(sid, (uri,), {"layout": "ome-zarr", "folder": prefix, "indices": ("0",),
                                       "sizes": (sum(f[1] for f in files),), "versions": (version,)}))
    return out, claimed


def source_fingerprint(stack: Stack, keys: tuple[str, ...] = ("sizes", "versions", "mtimes")) -> str:
    """Identity of a stack's inputs: uris plus what the listing gave for free per file: size and
    version (the ETag on object stores, the mtime in ns on local disks). A plane replaced by other
    pixels of the same size still changes it.

    A stack whose latest row failed on its input is retried only when this changes (the user fixed
    a file), so reruns neither repeat known failures nor add duplicate rows for them.
    """
    parts = []
    for i, uri in enumerate(stack.uris):
        parts.append(uri)
        for key in keys:
            values = stack.meta.get(key)
            if values is not None and i < len(values):
                parts.append(f"|{values[i]}")
        parts.append("\n")
    return hashlib.sha1("".join(parts).encode()).hexdigest()[:16]


def legacy_fingerprint(stack: Stack) -> str:
    """The fingerprint rows written before versions and recipes were recorded carry (names and
    sizes): such rows still count as done after an upgrade instead of re-fusing the archive."""
    return source_fingerprint(stack, ("sizes", "mtimes"))


def discover_stacks(root: str, pattern: str | re.Pattern | None = None, *, s3_endpoint: str | None = None,
                    stack_per_file: bool = False) -> list[Stack]:
    """List the stacks under a local folder or ``s3://`` prefix (names only, no pixel reads).

    Args:
        root: local path, ``file://`` or any fsspec uri (``s3://bucket/prefix``).
        pattern: optional regex with named groups ``index`` and (optionally) ``stack``,
            replacing the built-in patterns (see module docstring).
        stack_per_file: every image file is a stack of its own (single-file z-stacks); OME-Zarr
            images, ``.ome.tif`` and vendor files always are (:func:`_single_file_stacks`).
        s3_endpoint: S3 endpoint override (else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).

    Returns:
        Stacks sorted (naturally) by id, error rows included (``meta["error"]``). For an archive of
        millions of stacks, :func:`ray_mff.listing.discover_listing` gives the same as a compact
        listing without keeping a Python object per stack.

    Raises:
        EmptyStackError: a local root that does not exist, or a root that is a file.

    Example::

        >>> [s.id for s in discover_stacks("../shared/data/lytro")][:2]    # doctest: +SKIP
        ['lytro_01', 'lytro_02']
    """
    found = Discovery(root, pattern, s3_endpoint=s3_endpoint, stack_per_file=stack_per_file)
    stacks = list(found)  # the whole walk first: only then are the earlier outputs under the root known
    return unique_ids([s for s in stacks if not found.in_output(s)] or [found.empty_root()])


class Discovery:
    """Discovery's stacks folder by folder, as the listing streams in (a folder comes after its
    sub-folders: :func:`ray_mff.storage.iter_folders`), before ids are made unique (:func:`unique_ids`).

    Iterating yields every stack the rules below make. A sub-folder holding a ray-mff manifest is an
    earlier run's OUTPUT (``outputs``: ``"<folder>/"``), not stacks to fuse; a folder learns that only
    once its sub-folders are listed, so stacks under it are yielded too and the caller drops them
    (:meth:`in_output`) after the walk. When nothing is left the root is one empty folder
    (:meth:`empty_root`): an error row, not a crash.
    """

    def __init__(self, root: str, pattern, *, s3_endpoint: str | None, stack_per_file: bool,
                 folders: Iterable[tuple[str, list]] | None = None):
        """``folders``: the ``(folder, files)`` listing to apply the rules to, when not all of
        :func:`ray_mff.storage.iter_folders` (a share of it: :func:`ray_mff.listing.discover_listing`)."""
        self.root = os.fspath(root)
        self.folders = folders
        self.namer = _Namer(pattern)
        self.s3_endpoint, self.stack_per_file = s3_endpoint, stack_per_file
        fs, path = storage.resolve(self.root, s3_endpoint=s3_endpoint)
        if not storage.is_remote(self.root) and not fs.exists(path):
            raise EmptyStackError(self.root, "no such folder")
        if fs.isfile(path):
            raise EmptyStackError(self.root, "is a file; discovery needs a folder or prefix")
        self.outputs: set[str] = set()

    def in_output(self, stack: Stack) -> bool:
        folder = stack.meta.get("folder", "") + "/"
        return any(folder.startswith(o) for o in self.outputs)

    def empty_root(self) -> Stack:
        (stack,) = _folder_stacks("", [], self.root, self.namer)
        return stack

    def _note_output(self, folder: str) -> None:
        parts = folder.split("/")
        if "manifest.parquet" in parts[1:]:  # a file under <folder>/manifest.parquet/
            self.outputs.add("/".join(parts[:parts.index("manifest.parquet", 1)]) + "/")

    def _under_output(self, relpath: str) -> bool:
        return any(relpath.startswith(o) for o in self.outputs)

    def __iter__(self) -> Iterator[Stack]:
        root, namer = self.root, self.namer
        folders = self.folders if self.folders is not None else storage.iter_folders(root, s3_endpoint=self.s3_endpoint)
        if root.lower().rstrip("/").endswith(".zarr"):  # the root is itself an OME-Zarr image or plate
            entries = []
            for folder, files in folders:
                if files:
                    self._note_output(folder)
                entries += files
            base = storage.basename(root)
            entries = [storage.FileEntry(e.uri, f"{base}/{e.relpath}", e.size, e.version) for e in entries
                       if not self._under_output(e.relpath)]
            yield from _single_file_stacks(entries, self.stack_per_file)[0]  # every file is the store's
            return
        has_child: set[str] = set()  # folders with a sub-folder that counts (so: not an empty leaf)
        zarr: dict[str, list] = {}  # files of the *.zarr folders being listed
        for folder, files in folders:
            parts = folder.split("/") if folder else []
            if files:
                self._note_output(folder)
            z = next((i for i, p in enumerate(parts) if p.lower().endswith(".zarr")), None)
            if z is not None:  # inside a zarr store (hidden names included): its images once it is complete
                store = "/".join(parts[:z + 1])
                zarr.setdefault(store, []).extend(files)
                if z == len(parts) - 1:
                    entries = [e for e in zarr.pop(store) if not self._under_output(e.relpath)]
                    yield from _single_file_stacks(entries, self.stack_per_file)[0]
                    has_child.add(store.rpartition("/")[0])  # its folder holds a stack: not an empty one
                continue
            if any(p.startswith(".") for p in parts):
                continue  # hidden folders are ignored
            visible = [e for e in files if not e.relpath.rpartition("/")[2].startswith(".")]
            single, claimed = _single_file_stacks(visible, self.stack_per_file)
            yield from single
            rest = sorted((_File(e.uri, e.relpath.rpartition("/")[2], e.size, e.version) for e in visible
                           if e.relpath not in claimed), key=lambda f: natural_key(f.name))
            if rest:
                yield from _folder_stacks(folder, rest, root, namer)
            elif folder and folder not in has_child and not single:  # a leaf folder with no stack at all
                yield from _folder_stacks(folder, [], root, namer)
            if folder:
                has_child.discard(folder)
                if folder + "/" not in self.outputs:
                    has_child.add(folder.rpartition("/")[0])
