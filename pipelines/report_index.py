"""DVC stage `report_index`: reports/index.ipynb + reports/index.html, every report and every arm.

Reads metrics/<mol>/n<size>/s<seed>/T<setting>/<arm>/metrics.json (with audit files) and the reference's
metrics.json of the molecules, train_sizes, seeds, md.temperatures and arms in params.yaml (outputs of
settings removed from params.yaml stay on disk but leave the index).
"""

import argparse
import sys
from pathlib import Path

from papermill.exceptions import PapermillExecutionError

from crmse.report import execute_report

TEMPLATE = Path(__file__).with_name("index.ipynb")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--all-runs", action="store_true", help="index every report on disk, not only declared ones")
    parser.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    args = parser.parse_args()
    params = {"root": ".", "declared_only": not args.all_runs}
    try:
        nb, page = execute_report(TEMPLATE, Path(args.out) / "index.ipynb", params, "crmse: all runs", cwd=".",
                                  progress=not args.no_progress)
    except PapermillExecutionError as exc:  # the failing cell and its traceback; nothing was written
        sys.exit(f"error: the report notebook failed, no report written:\n{exc}")
    print(f"report_index: wrote {nb} and {page}")
