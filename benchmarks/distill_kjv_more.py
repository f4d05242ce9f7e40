"""More public-domain KJV text for the encoder student (`gpu_distill.py --extra-text`): 12 books beside the bundled
ones, none of the held-out Ruth / Ecclesiastes, one chapter per line, verse numbers stripped - the format of
tokenmill/distill/data/kjv_*.txt. Built from Debian's `bible-kjv` (the `bible` reader) and `bible-kjv-text` (4.38)
packages, fetched with `apt-get download` into a scratch folder (nothing is installed).

    python benchmarks/distill_kjv_more.py --out /tmp/kjv_more.txt     # ~2.1 MB, 577 chapters
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

# `bible` verse ranges: Exodus-Deuteronomy, Joshua, 2 Samuel-2 Kings, Job, Psalms 73-150 (1-72 are bundled), Isaiah,
# Jeremiah, Mark, Luke, Romans-1 Corinthians, Hebrews, Revelation.
RANGES = ["Exo1:1-Deu34:12", "Jos1:1-Jos24:33", "2Sa1:1-2Ki25:30", "Job1:1-Job42:17", "Psa73:1-Psa150:6",
          "Isa1:1-Isa66:24", "Jer1:1-Jer52:34", "Mar1:1-Mar16:20", "Luk1:1-Luk24:53", "Rom1:1-1Co16:24",
          "Heb1:1-Heb13:25", "Rev1:1-Rev22:21"]
_CHAPTER_HEADER = re.compile(r"^\S.* \d+$")  # "Exodus 1"; verse lines start with spaces
_VERSE_NUMBER = re.compile(r"^\s+\d+\s+")


def chapters(reader_output: str) -> list[str]:
    """One line per chapter from `bible`'s output (a header line, then verses wrapped over several lines)."""
    out, chapter = [], []
    for line in reader_output.splitlines():
        if _CHAPTER_HEADER.match(line):
            if chapter:
                out.append(" ".join(chapter))
            chapter = []
            continue
        text = _VERSE_NUMBER.sub("", line).strip()
        if text:
            chapter.append(text)
    if chapter:
        out.append(" ".join(chapter))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kjv-") as scratch:
        root = Path(scratch)
        subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=root, check=True)
        for deb in root.glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(root / "pkg")], check=True)
        # the reader resolves -d against its search path: a path relative to its working folder works, not an absolute
        reader = [str(root / "pkg/usr/bin/bible"), "-d", "usr/lib/bible.data"]
        lines = []
        for verses in RANGES:
            lines += chapters(subprocess.run(reader + [verses], cwd=root / "pkg", capture_output=True, text=True,
                                             check=True).stdout)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(lines)} chapters, {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
