"""HDF5 elements reached without leaving the file: no external links, external storage or virtual datasets.

An HDF5 file can hold pointers to other files: an external link (``h5py.ExternalLink``) to
an element of another HDF5 file, a dataset whose bytes lie in raw files (external storage),
and a virtual dataset mapped onto datasets of other files. Following one makes the reader
open a file the user did not name: a FIFO blocks the read forever, and a path such as
``/dev/zero`` or someone else's file is read as if it were the data. vaeeval reads only
what is inside the file it is given, so these are refused before any byte of data is read.

Even asking whether a name exists (``name in group``, ``group.get(name)``) follows an external
link in h5py, so links are read here with the low-level API, one path component at a time;
soft links (to another element of the same file) are followed the same way.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaeeval.errors import DataError

if TYPE_CHECKING:
    import h5py

MAX_SOFT_LINKS = 32  # soft links followed on the way to one element (a cycle of them ends here)
_INSIDE = "vaeeval reads only what is inside the file it is given"


def has(group: h5py.Group, name: str) -> bool:
    """Whether ``group`` has a link ``name`` (one component), without following it."""
    return bool(group.id.links.exists(name.encode()))


def member(path: Path, group: h5py.Group, name: str, where: str) -> Any:
    """``group[name]`` (``name`` a path, relative or absolute), or None when there is no such element,
    with every link on the way read before it is followed.

    Raises:
        DataError: a link on the way to another file, or soft links nested past ``MAX_SOFT_LINKS``.
    """
    return _follow(path, group, name, where, 0)


def check_inside(path: Path, element: Any, where: str) -> None:
    """Refuse ``element`` when it, or anything under it (a group's members, their members ...), reaches outside the file.

    Raises:
        DataError: an external link, a dataset with external storage, or a virtual dataset, named with its place.
    """
    _check(path, element, where, set())


def _check(path: Path, element: Any, where: str, seen: set[Any]) -> None:
    import h5py

    if element.id in seen:  # hard links can make a group its own member
        return
    seen.add(element.id)
    if isinstance(element, h5py.Dataset):
        if element.external:
            files = sorted({str(name) for name, _, _ in element.external})
            raise DataError(path, f"{where} ({element.name}) keeps its values in the file {files[0]}"
                                  f"{f' and {len(files) - 1} more' if len(files) > 1 else ''}, not in this one; {_INSIDE}")
        if element.is_virtual:
            raise DataError(path, f"{where} ({element.name}) is a virtual dataset mapped onto other files; {_INSIDE}")
        return
    if isinstance(element, h5py.Group):
        for name in element.keys():  # the link names, none followed
            inner = member(path, element, name, where)
            if inner is not None:  # a soft link to nothing: nothing to read
                _check(path, inner, where, seen)


def _follow(path: Path, group: Any, name: str, where: str, depth: int) -> Any:
    import h5py

    at = group.file if name.startswith("/") else group
    for part in (part for part in name.split("/") if part and part != "."):
        if not isinstance(at, h5py.Group) or not has(at, part):
            return None
        info = at.id.links.get_info(part.encode())
        if info.type == h5py.h5l.TYPE_HARD:
            at = at[part]
        elif info.type == h5py.h5l.TYPE_SOFT:
            if depth >= MAX_SOFT_LINKS:
                raise DataError(path, f"{where}: soft links nested more than {MAX_SOFT_LINKS} deep: corrupt")
            target = at.id.links.get_val(part.encode()).decode(errors="replace")
            at = _follow(path, at, posixpath.normpath(posixpath.join(at.name, target)), where, depth + 1)
        else:
            value = at.id.links.get_val(part.encode()) if info.type == h5py.h5l.TYPE_EXTERNAL else None
            outside = f"the file {value[0].decode(errors='replace')}" if value else "another file"
            raise DataError(path, f"{where}: {posixpath.join(at.name, part)} is a link to {outside}; {_INSIDE}")
    return at
