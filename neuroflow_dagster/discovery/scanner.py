"""The file-system side of discovery: which folders are sessions, whether they are stable, what is in them.

Three levels of cost, used from cheapest to dearest so that a tick over thousands of unchanged folders
stays well under a second:

1. :func:`tree_signature` - ``stat`` of the session's directories only (and ``scandir`` of those that
   have subdirectories). Adding, removing or renaming a file changes its directory's mtime/ctime, so an
   unchanged signature means nothing was copied in or taken out.
2. :func:`stat_walk` - ``stat`` of every file too, for the stability rule: the newest of st_mtime and
   st_ctime. ctime matters because ``cp -p`` / ``rsync -t`` keep the old mtime but cannot keep ctime.
3. :func:`read_headers` - DICOM headers only: the lean reader (``headers.py``) for common files,
   pydicom (``stop_before_pixels`` + ``specific_tags``) for the rest.

Inputs are never written. Nothing here raises for a bad file: problems are counted and named.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from neuroflow_dagster.discovery.headers import read_header_fields
from neuroflow_dagster.discovery.protocol import SeriesInfo

DICOM_SUFFIXES = frozenset({".dcm", ".ima"})
HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "ImageType",
    "Modality",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "StudyDate",
    "StudyTime",
]
MAX_UNREADABLE_EXAMPLES = 5
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


class IncomingFolderError(Exception):
    """``paths.dicom_incoming`` itself cannot be listed (missing, unmounted, no permission)."""


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_dicom_candidate(name: str) -> bool:
    """Suffix ``.dcm``, ``.ima`` (any case) or none, as the predecessor.

    A name whose last dot-part is all digits (``1.3.12.2.1107...``, UID-named exports) counts as having
    no suffix: such files are DICOM far more often than not, and an unreadable one is only counted.
    """
    if is_hidden(name) or name.upper() == "DICOMDIR":
        return False
    suffix = os.path.splitext(name)[1]
    return suffix == "" or suffix.lower() in DICOM_SUFFIXES or suffix[1:].isdigit()


def os_error_text(exc: OSError) -> str:
    """An OSError in an operator's words (the errno name stays for searching)."""
    code = errno.errorcode.get(exc.errno or 0, "")
    words = {
        errno.ELOOP: "a symbolic link loop",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "not a folder",
        errno.EIO: "input/output error (failing disk or network share?)",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{words} ({code})" if code else words


def printable_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (surrogate-escaped by os) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class SessionFolder:
    """A folder that is one scan session. ``scan_id`` is its path relative to the incoming root."""

    scan_id: str
    path: Path
    # Layout subject_session only: the SUBJECT folder name (the subject code) and the SESSION folder name.
    subject_folder: str | None = None
    session_folder: str | None = None


@dataclass(frozen=True)
class EntryProblem:
    """An entry of the incoming tree that is not a readable session folder; it alone is held.

    ``reason`` is ``unreadable`` (loop, dangling link, permission, I/O error, a name that is not UTF-8)
    or ``not_a_folder`` (a file where session folders are expected). ``subject_level``: in layout
    subject_session, the SUBJECT folder itself, so every session under it is affected.
    """

    scan_id: str
    path: Path
    reason: str
    message: str
    subject_level: bool = False


@dataclass
class Listing:
    folders: list[SessionFolder] = field(default_factory=list)
    problems: list[EntryProblem] = field(default_factory=list)


def _classify(entry: os.DirEntry[str], prefix: str, subject_level: bool) -> EntryProblem | bool:
    """True: a folder to use; False: skip silently (hidden, vanished); else the entry's problem."""
    name = entry.name
    if is_hidden(name):
        return False
    path = Path(entry.path)

    def problem(reason: str, message: str, rel: str = prefix + name, where: Path = path) -> EntryProblem:
        return EntryProblem(rel, where, reason, message, subject_level)

    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # A name with bytes that are not UTF-8 cannot be written to the registry, a JSON cursor, a
        # Dagster event or an e-mail; it is shown with replacement characters and held until renamed.
        shown = printable_name(name)
        return problem(
            "unreadable",
            f"the name {prefix + shown!r} is not valid UTF-8; rename it (e.g. convmv)",
            prefix + shown,
            path.parent / shown,
        )
    try:
        if entry.is_dir(follow_symlinks=True):
            return True
    except OSError as exc:
        return problem("unreadable", f"cannot be read: {os_error_text(exc)}")
    try:
        is_link = entry.is_symlink()
        os.lstat(path)
    except FileNotFoundError:
        return False  # vanished since the listing: gone, nothing to hold
    except OSError as exc:
        return problem("unreadable", f"cannot be read: {os_error_text(exc)}")
    if is_link:
        try:
            target = printable_name(os.readlink(path))
        except OSError:
            target = "?"
        if not os.path.exists(path):
            return problem("unreadable", f"a symbolic link to {target!r}, which does not exist")
        return problem("not_a_folder", f"a symbolic link to the file {target!r}, not a folder")
    return problem("not_a_folder", "a file, not a session folder (an archive to unpack? move it out of the way)")


def _entries(path: Path, prefix: str, subject_level: bool) -> tuple[list[os.DirEntry[str]], list[EntryProblem]]:
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    keep: list[os.DirEntry[str]] = []
    problems: list[EntryProblem] = []
    for e in entries:
        verdict = _classify(e, prefix, subject_level)
        if verdict is True:
            keep.append(e)
        elif isinstance(verdict, EntryProblem):
            problems.append(verdict)
    return keep, problems


def scan_incoming(root: Path, layout: str = "flat", participant_first: bool = True) -> Listing:
    """Session folders under ``root``, and every entry that is not one, with its reason.

    Hidden (dot) entries are skipped at every level. One bad entry (a symlink loop, a dangling link,
    a folder without permission, a file) is reported alone; only ``root`` itself failing to list raises
    :class:`IncomingFolderError`. Entries that vanish while being looked at are skipped: gone is gone.
    """
    if layout not in ("flat", "subject_session"):
        raise ValueError(f"unknown discovery.layout {layout!r}")
    try:
        top, problems = _entries(root, "", subject_level=layout != "flat")
    except OSError as exc:
        raise IncomingFolderError(f"paths.dicom_incoming {root}: cannot list: {os_error_text(exc)}") from exc
    listing = Listing(problems=problems)
    if layout == "flat":
        listing.folders = [SessionFolder(e.name, Path(e.path)) for e in top]
        return listing
    for outer in top:
        try:
            inner, inner_problems = _entries(Path(outer.path), outer.name + "/", subject_level=False)
        except FileNotFoundError:
            continue  # vanished between listing and scanning
        except OSError as exc:
            listing.problems.append(
                EntryProblem(
                    outer.name,
                    Path(outer.path),
                    "unreadable",
                    f"cannot list this folder: {os_error_text(exc)}; none of its sessions can be scanned",
                    subject_level=True,
                )
            )
            continue
        listing.problems.extend(inner_problems)
        for leaf in inner:
            subject, session = (outer.name, leaf.name) if participant_first else (leaf.name, outer.name)
            listing.folders.append(SessionFolder(f"{outer.name}/{leaf.name}", Path(leaf.path), subject, session))
    return listing


def list_session_folders(root: Path, layout: str = "flat", participant_first: bool = True) -> list[SessionFolder]:
    """Session folders under ``root`` (see :func:`scan_incoming` for the entries that are not)."""
    return scan_incoming(root, layout, participant_first).folders


@dataclass(frozen=True)
class Signature:
    """``value`` = mode letter + digest. Mode ``L``: leaf folders may be skipped (st_nlink is reliable
    here); ``F``: every folder must be listed (file systems such as btrfs report st_nlink 1)."""

    value: str
    n_dirs: int

    @property
    def leaf_skip(self) -> bool:
        return self.value.startswith("L")


def _digest(parts: list[tuple[str, int, int]], leaf_skip: bool) -> str:
    h = hashlib.blake2b(digest_size=8)
    for rel, mtime_ns, ctime_ns in sorted(parts):
        h.update(f"{rel}\0{mtime_ns}\0{ctime_ns}\n".encode("utf-8", "surrogateescape"))
    return ("L" if leaf_skip else "F") + h.hexdigest()


def tree_signature(path: Path, leaf_skip: bool = False) -> Signature:
    """Cheap change detector: (relative path, st_mtime_ns, st_ctime_ns) of every non-hidden directory.

    Adding, removing or renaming a file updates its directory's mtime and ctime, so the directories
    alone tell whether anything was copied in or taken out; no file is stat'ed. With ``leaf_skip`` a
    directory whose st_nlink is 2 (no subdirectories, as on ext4/xfs/NFS) is not even listed, the trick
    of find(1): a session of series folders then costs one stat per folder and one small scandir.
    Use it only when :func:`stat_walk` found st_nlink reliable for this tree (``Signature.leaf_skip``).
    Raises OSError if ``path`` itself is gone.
    """
    # Plain strings, not Path objects: this runs for every folder on every tick.
    parts: list[tuple[str, int, int]] = []
    stack: list[tuple[str, str]] = [(os.fspath(path), "")]
    while stack:
        current, rel = stack.pop()
        try:
            st = os.stat(current)
            if leaf_skip and st.st_nlink == 2:
                parts.append((rel, st.st_mtime_ns, st.st_ctime_ns))
                continue
            with os.scandir(current) as it:
                entries = list(it)
        except FileNotFoundError:
            if not rel:
                raise
            continue
        parts.append((rel, st.st_mtime_ns, st.st_ctime_ns))
        for e in entries:
            if e.is_dir(follow_symlinks=False) and not is_hidden(e.name):
                stack.append((e.path, f"{rel}/{e.name}" if rel else e.name))
    return Signature(_digest(parts, leaf_skip), len(parts))


@dataclass
class WalkResult:
    """Full stat walk of one session folder."""

    latest_change: float
    signature: Signature
    candidates: list[Path] = field(default_factory=list)
    n_files: int = 0
    n_stat: int = 0
    # Something vanished while walking: a copy/rename is in progress, treat as changed now.
    churn: bool = False
    # Entries inside the folder that cannot be read (relative path: reason); the folder is held.
    errors: list[str] = field(default_factory=list)
    # :func:`file_fingerprint` of the same walk.
    fingerprint: str = ""


def _fingerprint_digest(files: list[tuple[str, int, int, int]]) -> str:
    # 4 bytes: it only has to notice a change (a miss is a 1 in 4e9 chance, not an attack surface), and
    # it is stored per registered folder in the sensor cursor.
    h = hashlib.blake2b(digest_size=4)
    for rel, size, mtime_ns, ino in sorted(files):
        h.update(f"{rel}\0{size}\0{mtime_ns}\0{ino}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _file_error(entry: os.DirEntry[str], rel: str, exc: OSError) -> str | None:
    """The reason a file cannot be stat'ed, or None if it simply vanished (a copy or rename in progress)."""
    if isinstance(exc, FileNotFoundError):
        if entry.is_symlink():
            try:
                target = os.readlink(entry.path)
            except OSError:
                target = "?"
            return f"{printable_name(rel)}: a symbolic link to {printable_name(target)!r}, which does not exist"
        return None
    return f"{printable_name(rel)}: {os_error_text(exc)}"


def stat_walk(path: Path) -> WalkResult:
    """Newest max(st_mtime, st_ctime) over the folder, its subfolders and all their files.

    Hidden files count for stability (rsync writes ``.name.XXXXXX`` temp files) but are never DICOM
    candidates. Symlinked directories are not followed (no loops), symlinked files are. Also returns the
    folder's :func:`tree_signature`, in leaf-skip mode when every directory's st_nlink equalled
    2 + its number of subdirectories (so the cheap check can trust st_nlink on this file system), and
    its :func:`file_fingerprint`. A subfolder that cannot be listed or a file that cannot be stat'ed
    (permission, dangling link, loop) is named in ``errors``; the folder itself failing raises OSError.
    """
    parts: list[tuple[str, int, int]] = []
    files: list[tuple[str, int, int, int]] = []
    errors: list[str] = []
    latest = 0.0
    n_files = n_stat = 0
    churn = False
    nlink_reliable = True
    candidates: list[Path] = []
    stack = [(path, "")]
    while stack:
        current, rel = stack.pop()
        try:
            st = os.stat(current)
            with os.scandir(current) as it:
                entries = list(it)
        except FileNotFoundError:
            if not rel:
                raise
            churn = True
            continue
        except OSError as exc:
            if not rel:
                raise
            errors.append(f"{printable_name(rel)}/: {os_error_text(exc)}")
            continue
        n_stat += 1
        parts.append((rel, st.st_mtime_ns, st.st_ctime_ns))
        latest = max(latest, st.st_mtime, st.st_ctime)
        n_subdirs = 0
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                n_subdirs += 1
                if not is_hidden(e.name):
                    stack.append((Path(e.path), f"{rel}/{e.name}" if rel else e.name))
                continue
            n_files += 1
            frel = f"{rel}/{e.name}" if rel else e.name
            try:
                fst = os.stat(e.path)
            except OSError as exc:
                problem = _file_error(e, frel, exc)
                if problem is None:
                    churn = True
                else:
                    errors.append(problem)
                continue
            n_stat += 1
            latest = max(latest, fst.st_mtime, fst.st_ctime)
            if not is_hidden(e.name):
                files.append((frel, fst.st_size, fst.st_mtime_ns, fst.st_ino))
            if stat.S_ISREG(fst.st_mode) and is_dicom_candidate(e.name):
                candidates.append(Path(e.path))
        if st.st_nlink != 2 + n_subdirs:
            nlink_reliable = False
    candidates.sort()
    signature = Signature(_digest(parts, nlink_reliable), len(parts))
    return WalkResult(latest, signature, candidates, n_files, n_stat, churn, errors, _fingerprint_digest(files))


@dataclass(frozen=True)
class Fingerprint:
    value: str
    n_files: int
    errors: list[str]


def file_fingerprint(path: Path) -> Fingerprint:
    """(relative path, size, mtime_ns, inode) of every non-hidden file, as one digest.

    Catches what :func:`tree_signature` cannot: a file rewritten in place (a PACS re-send under the same
    name) changes neither its folder's mtime nor ctime. Same traversal as :func:`stat_walk`, whose
    ``fingerprint`` it reproduces; hidden files are left out (a ``.DS_Store`` written by a file browser
    is not new data). Not seen: a rewrite that keeps size, inode and mtime to the nanosecond (only a
    deliberate ``touch -d``/``-r`` back to the old time does that). Raises OSError if ``path`` is gone.
    """
    files: list[tuple[str, int, int, int]] = []
    errors: list[str] = []
    stack = [(os.fspath(path), "")]
    while stack:
        current, rel = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except FileNotFoundError:
            if not rel:
                raise
            continue
        except OSError as exc:
            if not rel:
                raise
            errors.append(f"{rel}/: {os_error_text(exc)}")
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if not is_hidden(e.name):
                    stack.append((e.path, f"{rel}/{e.name}" if rel else e.name))
                continue
            if is_hidden(e.name):
                continue
            frel = f"{rel}/{e.name}" if rel else e.name
            try:
                fst = os.stat(e.path)
            except OSError as exc:
                problem = _file_error(e, frel, exc)
                if problem is not None:
                    errors.append(problem)
                continue
            files.append((frel, fst.st_size, fst.st_mtime_ns, fst.st_ino))
    return Fingerprint(_fingerprint_digest(files), len(files), errors)


@dataclass
class HeaderSummary:
    """What the headers of one session's files say."""

    series: list[SeriesInfo] = field(default_factory=list)
    n_dicom: int = 0
    n_unreadable: int = 0
    unreadable_examples: list[str] = field(default_factory=list)
    # Earliest acquisition (or study) date/time over the series (first file of each), ISO 8601, no zone.
    acquisition: str | None = None
    modalities: list[str] = field(default_factory=list)
    n_read: int = 0


def _iso(date: str, time: str) -> str | None:
    date = (date or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    t = (time or "").strip().split(".")[0].ljust(6, "0")
    if not t.isdigit():
        t = "000000"
    return f"{date[:4]}-{date[4:6]}-{date[6:]}T{t[:2]}:{t[2:4]}:{t[4:6]}"


def _acquisition(ds: object) -> str | None:
    adt = str(getattr(ds, "AcquisitionDateTime", "") or "")
    if len(adt) >= 8:
        found = _iso(adt[:8], adt[8:])
        if found:
            return found
    return _iso(str(getattr(ds, "AcquisitionDate", "") or ""), str(getattr(ds, "AcquisitionTime", "") or "")) or _iso(
        str(getattr(ds, "StudyDate", "") or ""), str(getattr(ds, "StudyTime", "") or "")
    )


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[union-attr]
    return str(value).strip()


@dataclass
class _Group:
    description: str
    number: int | None
    image_type: str
    modality: str
    n: int = 0


def _series_number(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def read_headers(files: Iterable[Path], root: Path | None = None) -> HeaderSummary:
    """Group files by SeriesInstanceUID from their headers; unreadable files are counted, never raised.

    A file is DICOM if pydicom parses it and it has a SeriesInstanceUID; anything else is unreadable,
    and the first few are named with the reason. pydicom's warnings about odd files are silenced here
    (they would flood the sensor log every tick); the counts and examples say what matters.
    """
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_headers(files, root)
    finally:
        pydicom_logger.setLevel(level)


def _pydicom_dataset(f: Path) -> object:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(f, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        # No Part-10 preamble: old exports write the bare dataset. Accept it only if it yields a
        # well-formed SeriesInstanceUID, so a random file is not taken for DICOM.
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=True)
        if not _UID.match(_text(ds.get("SeriesInstanceUID"))):
            raise
        return ds


def _read_headers(files: Iterable[Path], root: Path | None) -> HeaderSummary:
    from pydicom.errors import InvalidDicomError

    summary = HeaderSummary()
    groups: dict[str, _Group] = {}
    modalities: set[str] = set()
    earliest: str | None = None
    for f in files:
        summary.n_read += 1
        reason: str | None = None
        try:
            # The lean reader takes the common files (the first few KB, a tenth of pydicom's CPU).
            ds = read_header_fields(f)
            if ds is None:
                ds = _pydicom_dataset(f)
            uid = _text(ds.get("SeriesInstanceUID"))
            if not uid:
                reason = "no SeriesInstanceUID"
            else:
                group = groups.get(uid)
                if group is None:
                    group = groups[uid] = _Group(
                        description=_text(ds.get("SeriesDescription")) or "Unknown",
                        number=_series_number(ds.get("SeriesNumber")),
                        image_type=_text(ds.get("ImageType")),
                        modality=_text(ds.get("Modality")),
                    )
                    if group.modality:
                        modalities.add(group.modality)
                    # Per series, not per file: converting the date/time elements of every file costs
                    # ~20 % of the read, and the session's order only needs the earliest series.
                    acq = _acquisition(ds)
                    if acq and (earliest is None or acq < earliest):
                        earliest = acq
                group.n += 1
        except InvalidDicomError:
            reason = "not DICOM (no DICM preamble)"
        except OSError as exc:
            reason = f"cannot read: {exc.strerror or exc}"
        except Exception as exc:  # pydicom raises many kinds on corrupt data; a bad file never stops a tick
            reason = f"corrupt: {type(exc).__name__}: {exc}"
        if reason is not None:
            summary.n_unreadable += 1
            if len(summary.unreadable_examples) < MAX_UNREADABLE_EXAMPLES:
                name = printable_name(os.path.relpath(f, root) if root is not None else str(f))
                summary.unreadable_examples.append(f"{name}: {reason[:160]}")
        else:
            summary.n_dicom += 1
    summary.series = sorted(
        (SeriesInfo(uid, g.description, g.n, g.number, g.image_type, g.modality) for uid, g in groups.items()),
        key=lambda s: (s.series_number is None, s.series_number or 0, s.description, s.uid),
    )
    summary.acquisition = earliest
    summary.modalities = sorted(modalities)
    return summary
