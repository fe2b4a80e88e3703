"""Video-root indexing and path resolution shared by every adapter.

One walk of the video root builds three lookups: relative path, file name and file stem. An
annotation path is then matched, in order, by
1. its normalised relative path (absolute paths are first reduced to their file name: annotation
   files often carry another machine's absolute paths),
2. its file name anywhere under the root (clips in per-movie or per-class subfolders),
3. its name taken as a stem (annotations that drop the extension, e.g. DiDeMo's `abc.`),
4. its stem (the file exists with another container, e.g. `.mkv` instead of `.mp4`).
Where several files share a name or stem, video containers win, then the shallowest, then the
first in sorted order. A relative path that leaves the root through `..` is flagged, not matched.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
     ".3g2", ".3gpp", ".mts", ".m2ts", ".ts", ".qt", ".asf", ".divx", ".ogv", ".vob"}
)
_ABSOLUTE = r"^(?:/|[A-Za-z]:/)"
_EXTENSION = r"\.[^./]*$"


def to_posix(paths: pd.Series) -> pd.Series:
    """Paths as POSIX strings (backslashes of Windows-made annotations become slashes)."""
    return paths.fillna("").astype(str).str.strip().str.replace("\\", "/", regex=False)


def file_names(paths: pd.Series) -> pd.Series:
    """The last component of each POSIX path."""
    return paths.str.rsplit("/", n=1).str[-1]


def strip_extension(names: pd.Series) -> pd.Series:
    """`a.mp4` -> `a`, `a.` -> `a`, `a` -> `a` (trailing dots dropped first)."""
    return names.str.rstrip(".").str.replace(_EXTENSION, "", regex=True)


def ids_from_paths(paths: pd.Series) -> pd.Series:
    """Video ids for user folders: relative path without extension; absolute: the file stem."""
    posix = to_posix(paths)
    absolute = posix.str.contains(_ABSOLUTE, regex=True)
    rel = posix.str.replace(r"^(?:\./)+", "", regex=True)
    return strip_extension(rel.where(~absolute, file_names(posix)))


@dataclass(frozen=True)
class VideoIndex:
    """Every file under a video root, by relative path, by name and by stem."""

    root: Path
    rel: frozenset[str]
    by_name: dict[str, str]
    by_stem: dict[str, str]

    @classmethod
    def build(cls, root: str | Path) -> VideoIndex:
        """Walk `root` once (following links, skipping hidden entries); empty if it is absent."""
        root = Path(root)
        files: list[str] = []
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                base = Path(dirpath).relative_to(root).as_posix()
                prefix = "" if base == "." else base + "/"
                files.extend(prefix + f for f in filenames if not f.startswith("."))
        else:
            log.warning("video root %s does not exist: every video will be marked missing", root)
        df = pd.DataFrame({"rel": pd.Series(files, dtype=str)})
        df["name"] = file_names(df["rel"])
        df["stem"] = strip_extension(df["name"])
        suffix = df["name"].str.extract(r"(\.[^.]*)$", expand=False).str.lower()
        df["rank_video"] = ~suffix.isin(VIDEO_EXTENSIONS)
        df["depth"] = df["rel"].str.count("/")
        df = df.sort_values(["rank_video", "depth", "rel"], kind="stable")
        by_name = df.drop_duplicates("name").set_index("name")["rel"].to_dict()
        by_stem = df.drop_duplicates("stem").set_index("stem")["rel"].to_dict()
        clashes = int(df["stem"].duplicated().sum())
        if clashes:
            log.info("video root %s: %d files share a stem with another file", root, clashes)
        log.info("indexed %d files under %s", len(df), root)
        return cls(root=root, rel=frozenset(df["rel"]), by_name=by_name, by_stem=by_stem)

    def resolve(self, paths: pd.Series) -> pd.DataFrame:
        """Match annotation paths under the root.

        Returns a frame on the same index: `path` (POSIX, relative to the root: the matched file,
        else the normalised annotation path or, for absolute paths, the file name), `exists`
        (bool) and `outside` (bool: a relative path that leaves the root via `..`).
        """
        posix = to_posix(paths)
        absolute = posix.str.contains(_ABSOLUTE, regex=True)
        names = file_names(posix)
        normal = posix.map(posixpath.normpath)
        outside = ~absolute & ((normal == "..") | normal.str.startswith("../"))
        rel = normal.where(~absolute, names)
        found = rel.where(rel.isin(self.rel))
        for lookup, keys in (
            (self.by_name, names),
            (self.by_stem, names.str.rstrip(".")),
            (self.by_stem, strip_extension(names)),
        ):
            found = found.fillna(keys.map(lookup))
        found = found.where(~outside)
        return pd.DataFrame(
            {
                "path": found.fillna(rel).astype(str),
                "exists": found.notna().astype(bool),
                "outside": outside.astype(bool),
            },
            index=paths.index,
        )
