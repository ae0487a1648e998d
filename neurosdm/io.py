"""Small I/O helpers: atomic writes (no half-written outputs, no stray temporary), checks of input files and output
locations before a command starts, and image grids.

Temporary files are named ``.NAME.PID-XXXX.tmp`` next to ``NAME``; a run killed by SIGKILL cannot remove its own,
so every later :func:`atomic_path` on the same ``NAME`` removes those whose process no longer exists
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np

from neurosdm.errors import GraphError, NeuroSDMError, OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block finishes.

    An error or Ctrl-C inside the block leaves ``path`` untouched and removes the temporary file.
    An :class:`OSError` (a full disk, a file size limit, a read-only location) becomes a one-line
    :class:`neurosdm.errors.OutputError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        with deferred_interrupts():  # the name is known before an interrupt can end the block
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
            os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, NeuroSDMError):
            shown = path.parent.parent / path.name if path.parent.name.startswith(STAGE_PREFIX) else path
            raise OutputError(f"cannot write {shown}: {os_reason(e)}") from None
        raise


STAGE_PREFIX = ".neurosdm-outputs."


@contextlib.contextmanager
def output_set(folder: str | os.PathLike):
    """Stage a command's several output files so that they appear together: yield a temporary directory inside
    ``folder`` (``.neurosdm-outputs.PID-XXXX``); when the block finishes, move every file in it into ``folder``
    (renames, no copy); on an error or a signal, remove it. Staging directories of killed runs (their process no
    longer exists) are removed first."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{STAGE_PREFIX}*-*"):
            pid = old.name[len(STAGE_PREFIX):].split("-", 1)[0]
            if old.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        with deferred_interrupts():
            stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as e:
        raise OutputError(f"cannot write into {folder}: {os_reason(e)}") from None
    try:
        yield stage
        with deferred_interrupts():  # all the renames or none
            for p in sorted(stage.iterdir()):
                os.replace(p, folder / p.name)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: nothing of this run is left
        if isinstance(e, OSError) and not isinstance(e, NeuroSDMError):
            raise OutputError(f"cannot write into {folder}: {os_reason(e)}") from None
        raise
    shutil.rmtree(stage, ignore_errors=True)


def os_reason(error: OSError) -> str:
    """An OSError in a few words (``No space left on device``, ``File too large``, ...), with advice for a full disk."""
    reason = error.strerror or first_line(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some space, or choose another output location)"
    return reason


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.PID-XXXX.tmp`` files next to ``path`` left by a killed run (whose process ``PID`` no longer
    exists on this machine); returns what was removed."""
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{glob_escape(path.name)}.*-*.tmp"):
            pid = p.name[len(path.name) + 2:].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


@contextlib.contextmanager
def atomic_buffer(path: str | os.PathLike):
    """Yield an in-memory file; write its bytes to ``path`` atomically (:func:`atomic_path`) when the block ends.
    For HDF5 writers (``nir.write``, ``nir.write_data``): the HDF5 library crashes (signal 11) when the disk fills
    under it, a plain write of the finished bytes fails cleanly."""
    buffer = io.BytesIO()
    with deferred_interrupts():  # an interrupt inside HDF5's callbacks would be printed and ignored
        yield buffer
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())


def interrupts_end_the_command() -> None:
    """SIGINT and SIGTERM raise :class:`KeyboardInterrupt` (the command's one-line exit 130). One that lands in a
    callback whose exceptions Python only prints ("Exception ignored in ...": weakref, h5py and other extension
    callbacks) is not printed but raised again 10 ms later (SIGALRM), in ordinary code; :func:`cancel_interrupts`
    stops that timer."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(s, interrupt)
    if not getattr(sys.unraisablehook, "neurosdm", False):
        sys.unraisablehook = _redeliver(sys.unraisablehook)


def _redeliver(previous):
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.01)
        else:
            previous(unraisable)

    hook.neurosdm = True
    return hook


def interrupt_handlers() -> dict:
    """The handlers of SIGINT, SIGTERM and SIGALRM now, for :func:`cancel_interrupts`."""
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}


def cancel_interrupts(previous: dict | None = None) -> None:
    """Stop :func:`interrupts_end_the_command`'s timer; restore ``previous`` handlers (:func:`interrupt_handlers`)."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in (previous or {}).items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM during the block and raise :class:`KeyboardInterrupt` at its end: for code that an
    interrupt cannot stop cleanly (h5py's object callbacks print an exception raised inside them and go on, so
    Ctrl-C during an HDF5 write was lost and the command exited 0). Outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if received:
        raise KeyboardInterrupt


def regular_file(path: str | os.PathLike, what: str, error: type[NeuroSDMError]) -> Path:
    """``path`` if it is a regular file (never opened here: a FIFO or a device would block or never end), else
    ``error`` (one line) saying what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {os_reason(e)}") from None
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a directory; pass a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise error(f"{what} {path} is {kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable (permission denied)")
    if path.suffix.lower() in (".npy", ".npz"):
        check_array_sizes(path, what, error)
    return path


def check_array_sizes(path: Path, what: str, error: type[NeuroSDMError]) -> None:
    """An ``.npy`` file (or each array of an ``.npz``) holds the bytes its header declares: a header edited to
    declare 10^10 values is refused before numpy allocates them. Headers numpy cannot parse are left to the
    reader (its own one-line error)."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                sizes = [(path.name, _declared_bytes(f), os.fstat(f.fileno()).st_size)]
        else:
            with zipfile.ZipFile(path) as z:
                sizes = []
                for info in z.infolist():
                    if info.filename.endswith(".npy"):
                        with z.open(info) as f:
                            sizes.append((info.filename, _declared_bytes(f), info.file_size))
    except OSError:
        return  # the reader says why
    except Exception:  # a damaged header: numpy's parser raises ValueError, SyntaxError, tokenize's TokenError, ...
        kind = "a NumPy .npy file" if path.suffix.lower() == ".npy" else "a NumPy .npz archive"
        raise error(f"{what} {path} is not {kind}: {describe_head(path)}") from None
    for name, declared, held in sizes:
        if declared is not None and declared > held:
            raise error(f"{what} {path}: array {name} declares {declared:,} bytes but the file holds {held:,}")


def _declared_bytes(f) -> int | None:
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        return None  # version 3 (utf-8 field names): left to the reader
    shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
    if dtype.hasobject:
        return None
    return math.prod(shape) * dtype.itemsize


def _probe_directory(folder: Path, label: str) -> None:
    """Create and remove a probe file in ``folder``, or in its nearest existing ancestor when it does not exist yet
    (nothing is left behind): the real test of writability (``os.access`` says yes to root on a read-only
    mount)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{label} {folder} cannot be created: {existing} is not a directory")
    try:
        with deferred_interrupts():  # never an interrupt between creating the probe and removing it
            fd, probe = tempfile.mkstemp(prefix=".neurosdm-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{label} {folder} is not writable: {os_reason(e)}") from None


def check_output_dir(folder: str | os.PathLike, label: str = "output directory") -> Path:
    """Before a command's work: ``folder`` is (or can be made) a writable directory. :class:`OutputError` if it
    names an existing file or a location that cannot be written. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{label} {folder} exists and is not a directory; choose a directory with --out")
    _probe_directory(folder, label)
    return folder


def check_output_file(path: str | os.PathLike, force: bool = False, sources=(), label: str = "output") -> Path:
    """Before a command's work: ``path`` can be written (``--force`` to replace an existing file) and is none of
    ``sources`` (the command's inputs). :class:`OutputError` (one line) otherwise."""
    path = Path(path)
    for src in sources:
        if src is not None and Path(src).exists() and path.exists() and os.path.samefile(src, path):
            raise OutputError(f"{label} {path} is the command's input {src}; choose another output file")
    if path.is_dir():
        raise OutputError(f"{label} {path} is a directory; pass a file name")
    if path.exists() and not force:
        raise OutputError(f"{label} {path} already exists; use --force to overwrite it")
    if path.exists() and not path.is_file():
        raise OutputError(f"{label} {path} is not a regular file")
    _probe_directory(path.parent, f"{label} directory")
    return path


def check_outputs(out: str | os.PathLike | None, names=(), force: bool = False, sources=()) -> None:
    """The one ``--force`` rule of every command that writes outputs, applied before its work starts: ``out`` is a
    file (``names`` empty) or a directory that receives ``names``; an existing output file is refused unless
    ``force``, as is an output that is one of ``sources`` (the command's inputs; even with ``force``), a directory
    where a file is expected, a file where a directory is expected, and a location that cannot be written.
    :class:`OutputError` (one line). Nothing is created; ``out`` None: nothing to check."""
    if out is None:
        return
    if not names:
        check_output_file(out, force, sources)
        return
    folder = check_output_dir(out)
    for name in names:
        check_output_file(folder / name, force, sources)


def check_finite_report(report, what: str, where: str = "") -> None:
    """:class:`GraphError` (one line) when a report about to be printed or written (nested dicts, lists, numbers)
    holds NaN or an infinity: never a silent "total nan pJ"."""
    if isinstance(report, dict):
        for key, value in report.items():
            check_finite_report(value, what, f"{where}.{key}" if where else str(key))
    elif isinstance(report, (list, tuple)):
        for i, value in enumerate(report):
            check_finite_report(value, what, f"{where}[{i}]")
    elif isinstance(report, (float, np.floating)) and not math.isfinite(report):
        raise GraphError(f"{what} came out {float(report)} at {where} (values out of range?); nothing was written")


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """``[N, C, H, W]`` floats in [-1, 1] -> one uint8 image ``[rows*(H+pad)+pad, cols*(W+pad)+pad, 3]``."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol_rows = int(math.ceil(n / nrow))
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    pix = np.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if c == 1:
        pix = np.repeat(pix, 3, axis=1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pix[i].transpose(1, 2, 0)
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an ``[H, W, 3]`` uint8 array as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg

    with atomic_path(path) as tmp:
        mpimg.imsave(tmp, array, format="png")


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def describe_head(path: str | os.PathLike) -> str:
    """What a file starts with, for error messages: ``an empty file`` or ``a file starting with b'...'``."""
    with open(path, "rb") as f:
        head = f.read(8)
    return "an empty file" if not head else f"a file starting with {head!r}"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
