"""Run checkpoints: numbered folders under one root, each complete before it counts.

    ROOT/ckpt-00000012/   learner/           the learner's TensorFlow checkpoint
                          replay-shard-<i>.msgpack   each replay shard's snapshot
                          progress.json      the launcher's counters
                          manifest.json      every part's size; written last
    ROOT/latest.json      the name of the newest complete checkpoint

ROOT is a local path, or an `s3://` or `gs://` URI (or `file:///path`) that pyarrow opens, so
a checkpoint can outlive the node that wrote it. Each part is written by the role that owns
it, on its own node, into `ckpt-N.tmp/`; then the launcher writes the manifest, renames the
folder into place, points `latest` at it (write-then-rename as well) and removes all but the
newest `keep`. A crash at any moment leaves `latest` naming a complete checkpoint;
a failure (a full disk) leaves the previous one the latest and nothing of the new one behind.
Nothing here unpickles: manifests and pointers are JSON, parts have formats of their own.
`write_atomically` is the one way the project writes a whole file (here and in a run folder).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

FORMAT = "dqn-run-checkpoint"
VERSION = 1
LATEST = "latest.json"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LEARNER = "learner"
NAME = re.compile(r"ckpt-(\d{8})")
MAX_JSON_BYTES = 64 << 20  # progress and manifests are small; anything larger is not ours
# A root that starts like a URI must be one of these: anything else pyarrow may take for a
# local path (`s3:/bucket`), accept without storing anywhere durable, or load a JVM for.
URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
STORE_URI = re.compile(r"(s3|gs)://[^/]+(/.*)?|file:///.*", re.DOTALL)
ROOT_FORMS = "a local path, file:///path, s3://bucket/path or gs://bucket/path"
# The variables pyarrow's object stores read their endpoint and credentials from.
STORE_VARIABLES = {"s3": ("AWS_",), "gs": ("GOOGLE_", "STORAGE_EMULATOR_HOST")}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, altered or not one of this project's."""


def shard_part(shard: int) -> str:
    return f"replay-shard-{shard}.msgpack"


def checkpoint_name(number: int) -> str:
    return f"ckpt-{number:08d}"


def is_local_root(root: str) -> bool:
    """Whether checkpoint root `root` is a local path (else a URI); CheckpointError for
    anything that is neither (a relative name with a colon in it reads `./name:x`)."""
    if not URI_SCHEME.match(root):
        return True
    if STORE_URI.fullmatch(root):
        return False
    raise CheckpointError(f"checkpoint directory {root!r}: give {ROOT_FORMS}")


def store_environment(root: str | None, environ: dict[str, str]) -> dict[str, str]:
    """The variables of `environ` that the object store of checkpoint root `root` reads (none
    for a local root): what the roles on other nodes need to reach the same bucket."""
    prefixes = STORE_VARIABLES.get((root or "").split("://", 1)[0], ()) if root else ()
    return {name: value for name, value in environ.items() if name.startswith(prefixes)}


def write_atomically(path: str | os.PathLike, data: bytes, filesystem: Any = None) -> None:
    """`data` at `path` whole or not at all: written to `path.tmp`, then renamed over it.
    On any failure (a full disk fails the write, the flush or the close) the temporary file
    is removed and `path` is as it was. `filesystem`: a pyarrow one (an object store);
    None: the local disk, synced before the rename so a crash cannot leave a torn file."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        if filesystem is None:
            with open(tmp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        else:
            with filesystem.open_output_stream(tmp) as stream:
                stream.write(data)
            filesystem.move(tmp, os.fspath(path))
    except BaseException:  # a signal too: the temporary file is never left behind
        with contextlib.suppress(OSError):
            if filesystem is None:
                os.unlink(tmp)
            else:
                filesystem.delete_file(tmp)
        raise
    if filesystem is None:
        _sync_folder(os.path.dirname(os.path.abspath(path)))


def _sync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable; the file is in place whether or not this works."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def is_inside(relpath: str) -> bool:
    """Whether manifest part name `relpath` names a file inside its checkpoint: what
    `commit` writes (`learner/state.index`), never `..`, an absolute or empty name."""
    return ("\\" not in relpath and "\0" not in relpath
            and all(part not in ("", ".", "..") for part in relpath.split("/")))


class StoredPart(NamedTuple):
    """A role's part of a checkpoint, at a local path while the `latest_part` block lasts."""
    name: str  # the checkpoint's
    path: str
    passed_over: str | None  # why newer checkpoints' copies were not taken; None: none were


class CheckpointStore:
    """The checkpoints under one root. Cheap to make: roles build their own from the root."""

    def __init__(self, root: str):
        from pyarrow import fs
        if not root:
            raise CheckpointError("the checkpoint directory is empty")
        self.root = root
        # A URI goes through pyarrow's copies even where it names a local disk (file://), so
        # that path is the one tested; a plain path is read and written in place.
        self.local = is_local_root(root)
        if self.local:
            self.fs, self.base = fs.LocalFileSystem(), os.path.abspath(root)
        else:
            try:
                self.fs, self.base = fs.FileSystem.from_uri(root)
            except Exception as error:  # pyarrow raises several kinds for a bad URI
                raise CheckpointError(f"checkpoint directory {root}: {error}") from None
        self.base = self.base.rstrip("/")

    def path(self, relpath: str) -> str:
        return f"{self.base}/{relpath}" if relpath else self.base

    def describe(self, relpath: str) -> str:
        """Where `relpath` is, as a user would name it."""
        return self.path(relpath) if self.local else f"{self.root.rstrip('/')}/{relpath}"

    # Parts: each role writes and reads its own through a local path.
    @contextlib.contextmanager
    def writing(self, relpath: str) -> Iterator[str]:
        """A local path to write `relpath` at (a file, or a folder the caller fills); on a
        remote store it is uploaded when the block ends."""
        if self.local:
            target = self.path(relpath)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            yield target
            return
        from pyarrow import fs
        with tempfile.TemporaryDirectory(prefix="dqn-ckpt-") as tmp:
            local = os.path.join(tmp, os.path.basename(relpath))
            yield local
            folder = relpath if os.path.isdir(local) else os.path.dirname(relpath)
            self.fs.create_dir(self.path(folder), recursive=True)
            fs.copy_files(local, self.path(relpath), destination_filesystem=self.fs)

    @contextlib.contextmanager
    def reading(self, relpath: str) -> Iterator[str]:
        """A local path holding `relpath` (downloaded first from a remote store)."""
        from pyarrow import fs
        kind = self.fs.get_file_info(self.path(relpath)).type
        if kind == fs.FileType.NotFound:
            raise CheckpointError(f"{self.describe(relpath)} does not exist")
        if self.local:
            yield self.path(relpath)
            return
        with tempfile.TemporaryDirectory(prefix="dqn-ckpt-") as tmp:
            local = os.path.join(tmp, os.path.basename(relpath))
            if kind == fs.FileType.Directory:
                os.mkdir(local)
            fs.copy_files(self.path(relpath), local, source_filesystem=self.fs)
            yield local

    @contextlib.contextmanager
    def latest_part(self, part: str) -> Iterator[StoredPart | None]:
        """`part` (a file or folder) of the newest checkpoint whose copy matches its manifest:
        a damaged part of the latest one falls back to the one before, and so on (a role
        restarting mid-run loses minutes, not the run). None when there is no checkpoint
        yet; CheckpointError, the latest one's reason, when no copy is intact."""
        latest = self.latest()
        if latest is None:
            yield None
            return
        passed_over: list[str] = []
        older = [name for name in self._complete() if name < latest]
        for name in [latest, *reversed(older)]:
            try:
                self.verify(name, under=part)
            except CheckpointError as error:
                passed_over.append(str(error))
                continue
            with self.reading(f"{name}/{part}") as path:
                yield StoredPart(name, path, "; ".join(passed_over) or None)
            return
        raise CheckpointError(passed_over[0])

    def read_json(self, relpath: str) -> dict:
        try:
            with self.fs.open_input_stream(self.path(relpath)) as stream:
                data = stream.read(MAX_JSON_BYTES + 1)
        except (OSError, FileNotFoundError) as error:
            raise CheckpointError(f"{self.describe(relpath)}: cannot be read: {error}") from None
        if len(data) > MAX_JSON_BYTES:
            raise CheckpointError(f"{self.describe(relpath)}: larger than any file of ours")
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{self.describe(relpath)}: not JSON ({error})") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.describe(relpath)}: not a JSON object")
        return value

    def write_json(self, relpath: str, value: dict) -> None:
        """Written whole or not at all (`write_atomically`)."""
        self.fs.create_dir(os.path.dirname(self.path(relpath)), recursive=True)
        write_atomically(self.path(relpath), (json.dumps(value, indent=2) + "\n").encode(),
                         None if self.local else self.fs)

    # Whole checkpoints: the launcher's side.
    def next_number(self) -> int:
        numbers = [int(m.group(1)) for m in map(NAME.fullmatch, self._names()) if m]
        return max(numbers, default=0) + 1

    def staging(self, number: int) -> str:
        """The folder the parts of checkpoint `number` are written into."""
        name = checkpoint_name(number) + ".tmp"
        self.fs.delete_dir_contents(self.path(name), missing_dir_ok=True)
        self.fs.create_dir(self.path(name), recursive=True)
        return name

    def discard(self, number: int) -> None:
        """Remove what a checkpoint that will not be committed had staged."""
        with contextlib.suppress(OSError, FileNotFoundError):
            self.fs.delete_dir(self.path(checkpoint_name(number) + ".tmp"))

    def commit(self, number: int, keep: int) -> str:
        """Make staged checkpoint `number` the latest: manifest, rename, pointer, pruning.
        When it fails (OSError) before the pointer names it, the renamed folder is removed
        again and the previous checkpoint stays the latest; `discard` removes the staging."""
        from pyarrow import fs
        staged, name = checkpoint_name(number) + ".tmp", checkpoint_name(number)
        selector = fs.FileSelector(self.path(staged), recursive=True)
        parts = {info.path[len(self.path(staged)) + 1:]: {"bytes": info.size,
                                                          "sha256": self._sha256(info.path)}
                 for info in self.fs.get_file_info(selector) if info.type == fs.FileType.File}
        self.write_json(f"{staged}/{MANIFEST}", {
            "format": FORMAT, "version": VERSION, "number": number, "time": time.time(),
            "parts": parts})
        try:
            self._move_dir(staged, name)
            self.write_json(LATEST, {"format": FORMAT, "latest": name})
        except BaseException:
            self._undo_move(name)
            raise
        self._prune(name, keep)
        return name

    def _undo_move(self, name: str) -> None:
        """Removes checkpoint `name` (fully or partly moved into place) unless the pointer
        already names it: a checkpoint no pointer names must not count as the newest."""
        with contextlib.suppress(OSError, CheckpointError):
            if self.latest() != name:
                self.fs.delete_dir(self.path(name))

    def _move_dir(self, source: str, destination: str) -> None:
        from pyarrow import fs
        try:
            self.fs.move(self.path(source), self.path(destination))
        except (OSError, NotImplementedError):  # object stores move files, not folders
            fs.copy_files(self.path(source), self.path(destination),
                          source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(self.path(source))

    def _names(self) -> list[str]:
        from pyarrow import fs
        selector = fs.FileSelector(self.base, allow_not_found=True)
        return sorted(os.path.basename(info.path) for info in self.fs.get_file_info(selector))

    def _complete(self) -> list[str]:
        """The complete checkpoints' names, oldest first."""
        return [name for name in self._names() if NAME.fullmatch(name)]

    def _prune(self, latest: str, keep: int) -> None:
        """Best effort, as `latest` already counts: what is not removed now is next time."""
        with contextlib.suppress(OSError):
            stale = [name for name in self._complete()[:-keep] if name != latest]
            # Staging folders of checkpoints that never finished.
            stale += [name for name in self._names()
                      if name.endswith(".tmp") and NAME.match(name) and name[:-4] < latest]
            for name in stale:
                with contextlib.suppress(OSError):
                    self.fs.delete_dir(self.path(name))

    # Reading: the restoring roles' and the launcher's side.
    def latest(self) -> str | None:
        """The newest complete checkpoint's name, or None when there is none yet."""
        from pyarrow import fs
        if self.fs.get_file_info(self.path(LATEST)).type == fs.FileType.NotFound:
            return None
        pointer = self.read_json(LATEST)
        name = pointer.get("latest")
        if pointer.get("format") != FORMAT or not isinstance(name, str) \
                or not NAME.fullmatch(name):
            raise CheckpointError(f"{self.describe(LATEST)}: not a checkpoint pointer "
                                  f"of this project")
        return name

    def verify(self, name: str, under: str = "") -> dict:
        """The manifest of checkpoint `name`, once every part it lists (or those under
        `under`) is there with its size and its sha256: what a damaged file would otherwise
        do to a reader (TensorFlow's can crash the process) never happens."""
        where = self.describe(f"{name}/{MANIFEST}")
        manifest = self.read_json(f"{name}/{MANIFEST}")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CheckpointError(f"{where}: not a version {VERSION} checkpoint of this project")
        parts = manifest.get("parts")
        if not isinstance(parts, dict) or not all(
                isinstance(part, dict) and type(part.get("bytes")) is int
                and isinstance(part.get("sha256"), str) for part in parts.values()):
            raise CheckpointError(f"{where}: lists no parts")
        for relpath in parts:  # before any is read: a forged name must not make us read it
            if not is_inside(relpath):
                raise CheckpointError(f"{where}: part {relpath!r} is not a path inside the "
                                      f"checkpoint")
        for relpath, part in parts.items():
            if not relpath.startswith(under):
                continue
            path = self.path(f"{name}/{relpath}")
            if self._links_out(name, path):
                raise CheckpointError(f"{where}: part {relpath!r} is not a path inside the "
                                      f"checkpoint")
            size = self.fs.get_file_info(path).size
            if size != part["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise CheckpointError(f"{self.describe(f'{name}/{relpath}')}: {found}, the "
                                      f"manifest says {part['bytes']} bytes")
            if self._sha256(path) != part["sha256"]:
                raise CheckpointError(f"{self.describe(f'{name}/{relpath}')}: its contents "
                                      f"differ from what was written (sha256)")
        return manifest

    def _links_out(self, name: str, path: str) -> bool:
        """Whether local file `path` of checkpoint `name` resolves (through a link) outside
        it; object stores have no links."""
        from pyarrow import fs
        if not isinstance(self.fs, fs.LocalFileSystem):
            return False
        folder = os.path.realpath(self.path(name))
        return not os.path.realpath(path).startswith(folder + os.sep)

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
