"""Reading CSV tables that may be gzipped, the one way every reader of the project does it.

Crystal tables carry whole CIF files in a cell, longer than the csv module's default field
limit, so the limit is lifted here once for all readers. Errors are left to the caller, which
knows what the file was for and so what its one line must say.
"""

from __future__ import annotations

import csv
import gzip
import sys
from pathlib import Path
from typing import IO

__all__ = ["READ_ERRORS", "open_text", "read_dict_rows"]

#: What reading a bad or missing table raises; callers turn these into their own error line.
READ_ERRORS = (OSError, UnicodeDecodeError, csv.Error)


def open_text(path: Path) -> IO[str]:
    """The file as UTF-8 text, decompressed when its name ends in ``.gz``."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return open(path, newline="", encoding="utf-8")


def read_dict_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and every row (as a dict) of a CSV or CSV.GZ file."""
    csv.field_size_limit(sys.maxsize)
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows
