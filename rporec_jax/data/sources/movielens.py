"""MovieLens 100K (`u.data`, `u.item`) and 1M (`ratings.dat`, `movies.dat`) in GroupLens formats."""

from __future__ import annotations

import dataclasses
import re
import shutil
import zipfile
from pathlib import Path

from rporec_jax.data.interactions import DUPLICATES, Interactions, build_interactions
from rporec_jax.data.items import item_msg
from rporec_jax.data.rows import DataError, RowReport
from rporec_jax.data.sources._io import (download, file_digest, iter_lines, missing_note, owned_tmp_dir,
                                         put_recorded, remove_stale_tmp_dirs)

# Published by GroupLens next to each zip (`<name>.zip.md5`).
ARCHIVES = {
    "100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
}
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


@dataclasses.dataclass(frozen=True)
class MovieLensConfig:
    """A GroupLens MovieLens directory (`root` holds u.data/u.item or ratings.dat/movies.dat).

    duplicates: 'drop' (default) or 'keep' rating rows that repeat an earlier (user, movie, timestamp); counted
    either way (`RowReport.duplicate_rows`, shown by `stats`). A movie id twice in the movies file is an error.
    """

    root: str = ""
    variant: str = "100k"
    download: bool = True
    encoding: str = "latin-1"
    skip_bad_rows: bool = False
    duplicates: str = "drop"

    def __post_init__(self):
        if self.variant not in ARCHIVES:
            raise ValueError(f"MovieLens variant must be one of {sorted(ARCHIVES)}, got {self.variant!r}")
        if self.duplicates not in DUPLICATES:
            raise ValueError(f"MovieLensConfig.duplicates={self.duplicates!r}; expected one of {DUPLICATES}")

    @property
    def name(self) -> str:
        """Returns the dataset name used for prompt templates and directory names."""
        return f"movielens-{self.variant}"

    def files(self) -> list[Path]:
        """Returns [ratings file, movies file]; when either is absent, extracts both from the GroupLens zip in
        `root` (checked against the published MD5), downloading it first if absent and `download` is set."""
        root = Path(self.root)
        names = ("u.data", "u.item") if self.variant == "100k" else ("ratings.dat", "movies.dat")
        paths = [root / n for n in names]
        if not all(p.exists() for p in paths):
            url, md5 = ARCHIVES[self.variant]
            archive = root / Path(url).name
            if archive.exists():
                if (got := file_digest(archive, "md5")) != md5:
                    raise ValueError(f"{archive}: MD5 {got} does not match the published {md5} of {url}; delete "
                                     f"it to download it again")
            elif not self.download:
                raise FileNotFoundError(f"{root}: expected {list(names)} or {archive.name} (download disabled)")
            else:
                download(url, archive, md5, why=missing_note(root, Path(url).stem, names))
            extract(archive, names, root, url)
        return paths

    def load(self) -> Interactions:
        """Returns the interactions ordered by rating timestamp (seconds)."""
        return load_movielens(self)


def extract(archive: Path, names: tuple[str, ...], root: Path, url: str) -> None:
    """Extracts the members of `archive` named `names` (at any depth) into `root`, each recorded as coming from
    `url`: into a temp dir first, then renamed, so a killed extraction never leaves a partial file in `root`."""
    remove_stale_tmp_dirs(root, ".tmp-extract-*")
    tmp = owned_tmp_dir(root, ".tmp-extract")
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if Path(member).name in names:
                    (tmp / Path(member).name).write_bytes(z.read(member))
        missing = [n for n in names if not (tmp / n).exists()]
        if missing:
            raise ValueError(f"{archive}: has no {missing}; expected a GroupLens {Path(url).name}")
        for n in names:
            put_recorded(tmp / n, root / n, f"{url}#{n}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split_title(title: str) -> tuple[str, str]:
    m = _TITLE_YEAR.match(title)
    return (m.group(1), m.group(2)) if m else (title.strip(), "unknown")


def load_movielens(cfg: MovieLensConfig) -> Interactions:
    """Returns interactions and item texts (title, year, genres) of a MovieLens directory."""
    report = RowReport(skip_bad_rows=cfg.skip_bad_rows)
    ratings_path, movies_path = cfg.files()
    v100k = cfg.variant == "100k"
    texts: dict[int, str] = {}
    first_line: dict[int, int] = {}
    for lineno, line in iter_lines(movies_path, report, cfg.encoding):
        f = line.split("|") if v100k else line.split("::")
        want = 5 + len(GENRES_100K) if v100k else 3
        if len(f) != want:
            report.bad(movies_path, lineno, None, f"has {len(f)} fields, expected {want}")
            continue
        try:
            mid = int(f[0])
        except ValueError:
            report.bad(movies_path, lineno, "movie_id", f"expected an integer, got {f[0]!r}")
            continue
        if mid in first_line:
            report.bad(movies_path, lineno, "movie_id", f"movie id {mid} is already on line {first_line[mid]}; "
                                                        "each id must appear once")
            continue
        first_line[mid] = lineno
        if v100k:
            flags = f[5:]
            if any(x not in ("0", "1") for x in flags):
                report.bad(movies_path, lineno, "genres", "expected 19 flags of 0/1")
                continue
            genres = [g for g, x in zip(GENRES_100K, flags) if x == "1"]
        else:
            genres = [g for g in f[2].split("|") if g]
        title, year = _split_title(f[1])
        texts[mid] = item_msg([("title", title), ("year", year), ("genres", genres)])
    if not texts:
        raise DataError(movies_path, None, None, f"has no movie rows{report.skipped_note()}")
    events = []
    sep = "\t" if v100k else "::"
    for lineno, line in iter_lines(ratings_path, report, cfg.encoding):
        f = line.split(sep)
        if len(f) != 4:
            report.bad(ratings_path, lineno, None, f"has {len(f)} fields, expected 4 (user, item, rating, timestamp)")
            continue
        names = ("user_id", "item_id", "rating", "timestamp")
        try:
            vals = []
            for name, x in zip(names, f):
                bad = name
                vals.append(float(x) if name == "rating" else int(x))
        except ValueError:
            report.bad(ratings_path, lineno, bad, f"expected a number, got {f[names.index(bad)]!r}")
            continue
        user, item, _, ts = vals
        if item not in texts:
            report.bad(ratings_path, lineno, "item_id", f"item {item} is not in {movies_path.name}")
            continue
        events.append((user, item, ts))
    if not events:
        raise DataError(ratings_path, None, None, f"has no rating rows{report.skipped_note()}")
    return build_interactions(cfg.name, events, texts, report, duplicates=cfg.duplicates)
