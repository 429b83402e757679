"""Reading the CSV tables jobs write (``probes.csv``, ``attribution.csv``) back, with one-line errors."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pandas as pd

from .spec import SpecError

__all__ = ["PROBE_COLUMNS", "read_table"]

PROBE_COLUMNS = ("layer", "component", "index", "kind", "metric", "value")
"""Columns every probes table has (``sparsity`` too, from sparsify kinds)."""


def read_table(path: str | os.PathLike, name: str, field: str, columns: tuple[str, ...] = ()) -> tuple[pd.DataFrame,
                                                                                                         Path]:
    """A CSV table given as the file or the directory holding ``name``, with at least ``columns``.

    Returns:
        The table (floats read back exactly) and the file it came from.

    Raises:
        SpecError: Naming ``field``, the file and what is wrong: missing, a directory without ``name``, empty, not
            UTF-8, not a CSV table, or lacking columns.
    """
    given = Path(path)
    file = given / name if given.is_dir() else given
    if not file.is_file():
        where = f"{str(given)!r} holds no {name}" if given.is_dir() else f"{str(file)!r} does not exist"
        raise SpecError(f"{where}; allowed: {name} or a directory holding it", field)
    try:
        df = pd.read_csv(file, float_precision="round_trip")
    except pd.errors.EmptyDataError:
        raise SpecError(f"{str(file)!r} is empty; allowed: a {name} a job wrote", field) from None
    except UnicodeDecodeError:
        raise SpecError(f"{str(file)!r} is not UTF-8 text; allowed: a {name} a job wrote", field) from None
    except (pd.errors.ParserError, csv.Error) as e:
        reason = " ".join(str(e).split())[:120]
        raise SpecError(f"{str(file)!r} is not a CSV table ({reason}); allowed: a {name} a job wrote", field) from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SpecError(f"{str(file)!r} lacks column(s) {', '.join(missing)}; allowed: a {name} with columns "
                        f"{', '.join(columns)}", field)  # fmt: skip
    return df, file
