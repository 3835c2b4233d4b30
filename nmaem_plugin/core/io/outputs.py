"""The output policy of every ``nmaem`` command, written once (torch-free).

Every command writes its files through :func:`command_outputs`::

    with command_outputs(out_dir, "export", products=names, inputs=[latent, ...],
                         force=args.force) as out:
        write_model(out.path("pc1_01.pdb"), ...)      # a file of this output
        ...                                           # the folder is ours only here

An **output** is a folder (``kind="folder"``: every file inside is named by nmaem) or a file
the user named (``kind="file"``, e.g. ``-o latent.npz``; more files may be written beside
it, named by nmaem). Its rules:

1. **Never onto an input.** An output path is compared with each input after resolving
   links (``os.path.realpath``) and by ``os.path.samefile`` (hard links). No ``--force``
   overrides this.
2. **A manifest of what we wrote.** ``FOLDER/.nmaem-<key>.json`` (``key``: the command
   for a folder, the file's name for a file) lists every file the output holds, with its
   size. It is written atomically: first when the command starts (``complete: false``),
   again when a file is added, last when the command succeeds (``complete: true``).
3. **We write only files we own.** A file in the way of one of ours (it exists and the
   manifest does not list it) is refused in one line, with or without ``--force``; the
   exception is the file the user named with ``-o FILE --force``.
4. **An earlier output is replaced only with --force**, and ``--force`` removes exactly the
   files its manifest lists (unchanged in size since) and nothing else: a smaller result
   does not leave the larger one's extra files beside it.
5. **All or nothing.** The command's output is a transaction: the earlier files are moved
   aside (``.nmaem-old.<name>``) and removed only when the command succeeds. On any
   failure in the process (an error, a full disk, SIGTERM, Ctrl-C) the files this run wrote
   are removed and the earlier ones put back. After a SIGKILL or a power loss the manifest
   says ``complete: false``: the next command into that output rolls it back the same way
   first (with a message), then runs as if the interrupted run had never started.
6. **One writer.** The output is locked while the command runs (``.nmaem-<key>.lock``,
   ``base.lock.FileLock``): a second command into the same output is refused in one line
   naming the first; a lock left by a dead process is replaced.

An output folder must not be a file and an output file must not be a folder; the folder
that holds an output file must exist; a folder that cannot be written is refused when the
lock is taken, before any work. Every refusal is a one-line
:class:`~nmaem_plugin.core.base.errors.NmaemError` naming the path (``nmaem: error: <path>:
<problem>``, exit status 2). The training run folder has its own rule
(:func:`check_run_dir`, ``runfolder.run_lock``): a new run goes into a new or empty
folder; an interrupted one is continued with ``--resume``.

Size: one concept, the output policy: the checks, the manifest and the transaction refer to
each other's rules, and this docstring is the policy's statement (about 45 lines).
"""
import json
import os
import sys
import time
from typing import (Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence,
                    Union)

from ..base.atomic import atomic_open, clean_orphans
from ..base.errors import fail, os_error
from ..base.lock import HOST, FileLock

__all__ = ["command_outputs", "CommandOutputs", "check_outputs", "same_path",
           "check_output_file", "check_run_dir", "run_files", "read_manifest",
           "manifest_path", "FORCE_HINT", "OVERWRITE_HINT", "MANIFEST_FORMAT"]

FORCE_HINT = "choose another output or pass --force"
OVERWRITE_HINT = "choose another -o or pass --force (or its alias --overwrite)"
MANIFEST_FORMAT = 1
_BACKUP = ".nmaem-old."

PathLike = Union[str, "os.PathLike[str]"]


def run_files(run_dir: Optional[PathLike]) -> List[str]:
    """The files at the top of a training run folder (inputs of infer, export, evaluate,
    report: an output must not replace them)."""
    if run_dir is None or not os.path.isdir(os.fspath(run_dir)):
        return []
    run_dir = os.fspath(run_dir)
    return [os.path.join(run_dir, f) for f in sorted(os.listdir(run_dir))
            if os.path.isfile(os.path.join(run_dir, f))]


def same_path(a: PathLike, b: PathLike) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (links resolved)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inputs(inputs):
    return [os.fspath(p) for p in (inputs or ()) if p is not None]


def _refuse_inputs(path, inputs, what="output"):
    for inp in _inputs(inputs):
        if same_path(path, inp):
            fail(path, "the %s would replace the input %s; choose another output"
                 % (what, inp))


def check_output_file(path: Optional[PathLike],
                      inputs: Optional[Iterable[Optional[PathLike]]] = (),
                      force: bool = False, what: str = "output",
                      hint: str = FORCE_HINT) -> Optional[str]:
    """Refuse (NmaemError) to write the file ``path``: onto one of ``inputs``, onto a
    folder, into a missing folder, or onto an existing file without ``force``. A check
    before any work; the writing itself goes through :func:`command_outputs`, which makes
    the same checks. Returns ``path``."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isdir(path):
        fail(path, "is a folder; the %s is a file" % what)
    _refuse_inputs(path, inputs, what)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(path, "the output folder does not exist" if not os.path.exists(folder)
             else "the output folder %s is a file" % folder)
    if os.path.lexists(path) and not force:
        fail(path, "already exists; " + hint)
    return path


def check_run_dir(path: PathLike, is_run: bool, ignore: Collection[str] = (".lock",)) -> str:
    """A new training run goes into a new folder or an empty one: refuse (NmaemError) a
    file, and a folder that holds other files and is not a run (``is_run``: whether it holds
    one; the caller then answers ``--resume``). Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(path, "is a file; the training run is a folder")
    if os.path.isdir(path) and not is_run:
        others = sorted(f for f in os.listdir(path) if f not in ignore)
        if others:
            fail(path, "holds other files (%s%s) and is not a training run; choose a new or "
                       "empty folder" % (", ".join(others[:3]),
                                         ", ..." if len(others) > 3 else ""))
    return path


# ============================================================================ manifest

def manifest_path(folder: PathLike, key: str) -> str:
    """``FOLDER/.nmaem-<key>.json``: the manifest of the output ``key`` in ``folder``."""
    return os.path.join(os.fspath(folder), ".nmaem-%s.json" % key)


def read_manifest(path: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest at ``path`` (a dict), None when there is none; a one-line NmaemError
    when it is not one."""
    path = os.fspath(path)
    try:
        with open(path) as fh:
            m = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        fail(path, "unreadable output manifest (%s); remove it together with the files of "
                   "that output" % exc)
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        fail(path, "not an nmaem output manifest (no file list)")
    return m


def _backup(name):
    head, tail = os.path.split(name)
    return os.path.join(head, _BACKUP + tail)


def _clean_name(name):
    name = os.path.normpath(str(name)).replace(os.sep, "/")
    if os.path.isabs(name) or name == "." or name.startswith("../") or name == "..":
        raise ValueError("an output name is relative to its folder (got %r)" % name)
    return name


class CommandOutputs:
    """The outputs of one command into one folder or file: see the module docstring.
    Made by :func:`command_outputs`; used as a context manager."""

    def __init__(self, target: PathLike, command: str, kind: str = "folder",
                 products: Sequence[str] = (), inputs: Iterable[Optional[PathLike]] = (),
                 force: bool = False, hint: str = FORCE_HINT,
                 log: Optional[Callable[[str], object]] = None) -> None:
        if kind not in ("folder", "file"):
            raise ValueError("kind is folder or file (got %r)" % kind)
        self.target = os.fspath(target)
        self.command, self.kind, self.force, self.hint = command, kind, bool(force), hint
        self.inputs = _inputs(inputs)
        self.log = log or (lambda m: sys.stderr.write(m + "\n"))
        if kind == "file":
            self.folder = os.path.dirname(os.path.abspath(self.target))
            self.main: Optional[str] = os.path.basename(self.target)
            self.key = self.main
        else:
            self.folder = os.path.abspath(self.target)
            self.main = None
            self.key = command
        self.products = [_clean_name(p) for p in products]
        if self.main is not None and self.main not in self.products:
            self.products.insert(0, self.main)
        self.manifest = manifest_path(self.folder, self.key)
        self.lock = FileLock(os.path.join(self.folder, ".nmaem-%s.lock" % self.key),
                             self.target, "nmaem %s" % command, log=self.log)
        self.files: List[str] = []        # registered by this run, in order
        self.dirs: List[str] = []         # subfolders this run created
        self.replaced: List[str] = []     # the earlier files, moved aside
        self.previous: Optional[Dict[str, Any]] = None
        self.created_folder = False
        self.began = False                # this run's manifest is written
        self.open = False

    # ------------------------------------------------------------------ the public part
    def path(self, name: Optional[str] = None) -> str:
        """The path of the file ``name`` of this output (relative to its folder; for a file
        output, no name: the file itself). The file becomes ours: listed in the manifest
        before it is written; one in the way (not ours) is refused."""
        if not self.open:
            raise RuntimeError("CommandOutputs.path outside its with block")
        if name is None:
            if self.main is None:
                raise ValueError("a folder output needs a file name")
            name = self.main
        name = _clean_name(name)
        if name not in self.files:
            self.claim([name])
        return os.path.join(self.folder, name)

    def claim(self, names: Iterable[str]) -> List[str]:
        """Make the files ``names`` ours at once (refused, before any of them is listed,
        when one is in the way); returns their paths. Use it once the names are known and
        before long work."""
        names = [n for n in (_clean_name(n) for n in names) if n not in self.files]
        for n in names:
            self._check_free(n)
        for n in names:
            self._make_parent(n)
        self.files.extend(names)
        if names:
            self._write_manifest(complete=False)
        return [os.path.join(self.folder, n) for n in names]

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> "CommandOutputs":
        self._check_target()
        if self.kind == "folder" and not os.path.isdir(self.folder):
            try:
                os.makedirs(self.folder)
            except OSError as exc:
                raise os_error(exc, self.folder, "cannot create the output folder") from None
            self.created_folder = True
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_folder_if_new()
            raise
        try:
            clean_orphans(self.folder, log=self.log)
            self._recover()
            self._begin()
        except BaseException:
            self._abort()
            raise
        self.open = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.open = False
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                self._abort()
                raise
            self.lock.release()
        else:
            self._abort()
        return False

    # ------------------------------------------------------------------ internals
    def _full(self, name):
        return os.path.join(self.folder, name)

    def _check_target(self):
        t = self.target
        if self.kind == "file":
            check_output_file(t, self.inputs, force=True)
        else:
            if os.path.exists(t) and not os.path.isdir(t):
                fail(t, "is a file; the output is a folder")
            for inp in self.inputs:
                if os.path.isdir(t) and same_path(t, inp):
                    fail(t, "the output folder is the input %s; choose another output" % inp)
        for p in self.products:
            _refuse_inputs(self._full(p), self.inputs)

    def _abort(self):
        """Undo this run: its files removed, the earlier ones and their manifest put back,
        the lock released (and a folder it created removed when empty)."""
        try:
            if self.began:
                self._rollback(dict(files={n: None for n in self.files}, dirs=self.dirs,
                                    replaced=self.replaced))
                if self.previous is not None:
                    self._write(self.previous)
                else:
                    _unlink(self.manifest)
        finally:
            self.lock.release()
            self._remove_folder_if_new()

    def _write(self, m):
        try:
            with atomic_open(self.manifest, "w") as fh:
                json.dump(m, fh, indent=1, sort_keys=True)
                fh.write("\n")
        except OSError as exc:
            raise os_error(exc, self.manifest) from None

    def _write_manifest(self, complete, sizes=None, discard=()):
        from nmaem_plugin import __version__
        m = dict(format=MANIFEST_FORMAT, command=self.command, kind=self.kind,
                 nmaem=__version__, complete=bool(complete), host=HOST, pid=os.getpid(),
                 time=time.strftime("%Y-%m-%dT%H:%M:%S"), dirs=list(self.dirs),
                 files=sizes if sizes is not None else {n: None for n in self.files})
        if complete:
            m["discard"] = list(discard)
        else:
            m["replaced"] = list(self.replaced)
            m["previous"] = self.previous
        self._write(m)

    def _recover(self):
        """Roll back an output left incomplete by a killed run (its lock is gone), and
        remove the earlier files a finished run had still to discard."""
        m = read_manifest(self.manifest)
        if m is None:
            return
        if m.get("complete"):
            for b in m.get("discard") or ():
                _unlink(self._full(b))
            return
        removed, restored = self._rollback(m)
        prev = m.get("previous")
        if isinstance(prev, dict) and isinstance(prev.get("files"), dict):
            self._write(prev)
        else:
            _unlink(self.manifest)
        self.log("nmaem: %s: rolled back an interrupted nmaem %s (process %s): removed %d "
                 "file(s) it had begun, put back %d earlier one(s)"
                 % (self.target, m.get("command", "?"), m.get("pid", "?"), removed, restored))

    def _rollback(self, m):
        """Remove the files of the (failed) run ``m``, put back what it moved aside and
        remove the subfolders it created when empty; (removed, restored)."""
        removed = restored = 0
        replaced = [str(n) for n in m.get("replaced") or ()]
        for n in m.get("files") or {}:
            if n in replaced and not os.path.lexists(self._full(_backup(n))):
                continue           # never moved aside: it is still the earlier file
            if _unlink(self._full(n)):
                removed += 1
        for n in replaced:
            b = self._full(_backup(n))
            if os.path.lexists(b):
                try:
                    os.replace(b, self._full(n))
                    restored += 1
                except OSError:
                    pass
        for d in sorted(m.get("dirs") or (), key=len, reverse=True):
            try:
                os.rmdir(self._full(d))
            except OSError:
                pass
        return removed, restored

    def _refuse(self, prev):
        """The refusals against the earlier output ``prev`` (its manifest, or None)."""
        ours = dict(prev["files"]) if prev else {}
        main_exists = self.main is not None and os.path.lexists(self._full(self.main))
        if not self.force:
            if main_exists:
                fail(self.target, "already exists; " + self.hint)
            if ours:
                fail(self.target, "already holds the output of an earlier nmaem %s (%s); %s"
                     % (prev.get("command", self.command), _some(sorted(ours)), self.hint))
        for n in self.products:
            self._check_free(n, ours)
        changed = [n for n, size in sorted(ours.items()) if os.path.isfile(self._full(n))
                   and size is not None and os.path.getsize(self._full(n)) != size]
        if changed:
            fail(self._full(changed[0]), "was written by an earlier nmaem %s but has changed "
                 "since (its size differs from %s); move it away or choose another output"
                 % (prev.get("command", self.command), os.path.basename(self.manifest)))
        return ours, main_exists

    def _begin(self):
        """The refusals, then the new manifest, then the earlier output moved aside."""
        prev = read_manifest(self.manifest)
        if prev is not None and not prev.get("complete"):     # cannot happen after _recover
            fail(self.manifest, "an unfinished output")
        ours, main_exists = self._refuse(prev)
        replace = [n for n in sorted(ours) if os.path.lexists(self._full(n))]
        if main_exists and self.main not in ours:
            replace.append(self.main)          # -o FILE --force: the user named it
        self.previous = prev
        self.replaced = replace
        self.dirs = []
        self._write_manifest(complete=False)
        self.began = True
        for n in replace:
            try:
                os.replace(self._full(n), self._full(_backup(n)))
            except OSError as exc:
                raise os_error(exc, self._full(n), "cannot move the earlier output aside") \
                    from None
        for n in self.products:
            self._make_parent(n)
        self.files = list(self.products)
        if self.files or self.dirs:
            self._write_manifest(complete=False)

    def _check_free(self, name, ours=None):
        full = self._full(name)
        if ours is None:                          # during the run: nothing else is ours
            ours = {}
        if not os.path.lexists(full) or name in ours:
            return
        if name == self.main:
            if self.force:
                return
            fail(full, "already exists; " + self.hint)
        if os.path.isdir(full) and not os.path.islink(full):
            fail(full, "is a folder in the way of a file of nmaem %s; move it away or choose "
                       "another output" % self.command)
        fail(full, "is in the way: nmaem %s would write this file, and it was not written "
                   "by nmaem here (%s does not list it); move it away or choose another "
                   "output" % (self.command, os.path.basename(self.manifest)))

    def _make_parent(self, name):
        parts = name.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            sub = "/".join(parts[:k])
            full = self._full(sub)
            if os.path.isdir(full):
                continue
            if os.path.lexists(full):
                fail(full, "is a file in the way of the folder %s of nmaem %s; move it away "
                           "or choose another output" % (sub, self.command))
            try:
                os.mkdir(full)
            except OSError as exc:
                raise os_error(exc, full, "cannot create the folder") from None
            self.dirs.append(sub)

    def _commit(self):
        sizes = {}
        for n in self.files:
            full = self._full(n)
            if os.path.isfile(full):
                sizes[n] = os.path.getsize(full)
        old_dirs = [d for d in (self.previous or {}).get("dirs") or () if d not in self.dirs]
        self.dirs += [d for d in old_dirs if any(n.startswith(d + "/") for n in sizes)]
        discard = [_backup(n) for n in self.replaced]
        self._write_manifest(complete=True, sizes=sizes, discard=discard)
        for b in discard:
            _unlink(self._full(b))
        for d in sorted(old_dirs, key=len, reverse=True):   # those no longer used
            if d not in self.dirs:
                try:
                    os.rmdir(self._full(d))
                except OSError:
                    pass

    def _remove_folder_if_new(self):
        if self.created_folder:
            try:
                os.rmdir(self.folder)
            except OSError:
                pass


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


def _some(names, k=3):
    return ", ".join(names[:k]) + (" and %d more" % (len(names) - k) if len(names) > k else "")


class _NoOutput:
    """The stand-in of an output the user did not ask for (``target`` None)."""

    def __enter__(self) -> "_NoOutput":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def path(self, name: Optional[str] = None) -> None:
        return None

    def claim(self, names: Iterable[str]) -> List[str]:
        return []


def command_outputs(target: Optional[PathLike], command: str, kind: str = "folder",
                    products: Sequence[str] = (),
                    inputs: Iterable[Optional[PathLike]] = (), force: bool = False,
                    hint: str = FORCE_HINT,
                    log: Optional[Callable[[str], object]] = None
                    ) -> Union[CommandOutputs, _NoOutput]:
    """The output ``target`` of the command ``command`` (a context manager: see the module
    docstring). ``kind``: ``folder`` or ``file``; ``products``: the files (names in the
    folder) known before the work, checked and listed at once (more may be added with
    ``out.path(name)`` or ``out.claim(names)``); ``inputs``: files the output must not
    replace; ``force``: replace an earlier output of ours; ``hint``: the end of the
    "already exists" message; ``log``: where the roll-back and stale-lock messages go
    (stderr). ``target`` None: an output not asked for (``path`` gives None)."""
    if target is None:
        return _NoOutput()
    return CommandOutputs(target, command, kind=kind, products=products, inputs=inputs,
                          force=force, hint=hint, log=log)


def check_outputs(target: Optional[PathLike], command: str, kind: str = "folder",
                  products: Sequence[str] = (),
                  inputs: Iterable[Optional[PathLike]] = (), force: bool = False,
                  hint: str = FORCE_HINT) -> None:
    """The refusals of :func:`command_outputs` before any work, writing nothing: a command
    that reads its inputs for long calls it first (the same checks run again under the
    lock when it writes)."""
    if target is None:
        return
    out = CommandOutputs(target, command, kind=kind, products=products, inputs=inputs,
                         force=force, hint=hint)
    out._check_target()
    if out.kind == "folder" and not os.path.isdir(out.folder):
        return
    m = read_manifest(out.manifest)
    if m is not None and not m.get("complete"):
        return                         # rolled back when the command starts
    out._refuse(m)

