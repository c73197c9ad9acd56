"""What a run reads, listed once: every image under a folder (any depth, sorted), the lines of a list file, or the tar
shards a pattern names (with their sample counts). A listing is kept in the run directory (`listing-<what>.txt`) and
read back from there by `resume=true` and by a DDP run's other ranks, so they see the same images in the same order
even when files were added since the run began.

The run template opens a home for the listings (`kept_in(run_dir)`) around build and execute; a source asks for its
listing with `listed(name, make)`; the template writes the new ones beside config.yaml (`save_listings`). Outside a
run (benchmarks, notebooks) listings are made and not kept."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fdlight.artifacts import write_text
from fdlight.errors import FDLightError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"))
HEADER = "# fdlight listing 1 root="


@dataclass
class Listing:
    """Entries (paths relative to `root`, or absolute) in the order a run reads them; `counts`, when set, one
    number per entry (samples per shard)."""
    root: Path
    entries: list[str]
    counts: list[int] | None = field(default=None)

    def paths(self) -> list[str]:
        root = str(self.root)
        return [e if os.path.isabs(e) else os.path.join(root, e) for e in self.entries]

    def text(self) -> str:
        rows = self.entries if self.counts is None else [f"{e}\t{n}" for e, n in zip(self.entries, self.counts)]
        return "\n".join([HEADER + str(self.root), *rows]) + "\n"

    @classmethod
    def parse(cls, text: str, source: Path) -> Listing:
        lines = text.split("\n")
        if not lines or not lines[0].startswith(HEADER) or lines[-1] != "":
            raise FDLightError(f"{source} is not a whole fdlight listing; remove it to list the data again (the "
                               f"run then reads what is there now)")
        rows = lines[1:-1]
        if rows and "\t" in rows[0]:
            entries, counts = zip(*(r.rsplit("\t", 1) for r in rows))
            return cls(Path(lines[0][len(HEADER):]), list(entries), [int(n) for n in counts])
        return cls(Path(lines[0][len(HEADER):]), rows)


def walk_images(root: Path) -> list[str]:
    """Every image file under `root` at any depth (by suffix, any letter case; hidden files and folders left out),
    as paths relative to it, sorted. Linked folders are followed (each once, so a link up the tree ends)."""
    top = os.stat(root)
    found, stack, linked = [], [("", str(root))], {(top.st_dev, top.st_ino)}
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                name = e.name
                if name[0] == "." or "\n" in name or "\t" in name:  # hidden (._x); or a name the listing cannot hold
                    continue
                if e.is_dir():
                    if e.is_symlink():  # a link may lead back up the tree: each linked folder is read once
                        st = e.stat()
                        if (st.st_dev, st.st_ino) in linked:
                            continue
                        linked.add((st.st_dev, st.st_ino))
                    stack.append((prefix + name + "/", e.path))
                elif name[name.rfind("."):].lower() in IMAGE_SUFFIXES and e.is_file():
                    found.append(prefix + name)
    found.sort()
    return found


def read_list_file(path: Path) -> list[str]:
    """The paths a list file names, one a line (blank lines and # comments skipped), as written."""
    return [s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")]


class ListingHome:
    """Where a run keeps its listings, and those it made this time (written by save_listings)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.made = Path(run_dir), {}


_home: contextvars.ContextVar[ListingHome | None] = contextvars.ContextVar("fdlight_listing_home", default=None)


@contextlib.contextmanager
def kept_in(run_dir: Path):
    """Listings asked for inside this block are read from, and kept in, `run_dir`."""
    token = _home.set(ListingHome(run_dir))
    try:
        yield
    finally:
        _home.reset(token)


def listed(name: str, make, what: str) -> Listing:
    """The listing `name` of this run: the one kept in the run directory when there is one (a resumed run, another
    rank), else `make()` (kept when the run's config is written). `what` says what is listed, for the log."""
    home = _home.get()
    kept = home.run_dir / f"listing-{name}.txt" if home is not None else None
    if kept is not None and kept.is_file():
        listing = Listing.parse(kept.read_text(), kept)
        log.info("reading the %s listed when the run began (%s: %d entries); files added since are not read",
                 what, kept, len(listing.entries))
        return listing
    start = time.perf_counter()
    listing = make()
    log.info("listed %d %s in %.1f s", len(listing.entries), what, time.perf_counter() - start)
    if home is not None:
        home.made[kept.name] = listing
    return listing


def save_listings(run_dir: Path) -> list[Path]:
    """Write the listings this run made into its directory (rank 0, beside config.yaml); the paths written."""
    home = _home.get()
    if home is None or Path(run_dir) != home.run_dir:
        return []
    written = []
    for name, listing in home.made.items():
        if not (home.run_dir / name).exists():
            written.append(write_text(home.run_dir / name, listing.text()))
    return written
