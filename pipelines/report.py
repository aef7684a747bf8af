"""DVC stage `report`: the papermill report of one (molecule, size, seed).

Executes pipelines/report.ipynb into reports/<mol>/n<size>/s<seed>.ipynb and renders a standalone HTML
next to it (figures embedded, code hidden). Run from the repository root.
"""

import sys
from pathlib import Path

from papermill.exceptions import PapermillExecutionError

from crmse.io import run_dir
from crmse.report import ReportError, execute_report, load_run
from crmse.stage import run_parser

TEMPLATE = Path(__file__).with_name("report.ipynb")

if __name__ == "__main__":
    parser = run_parser(__doc__)
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    args = parser.parse_args()
    try:  # fail fast, naming every missing input, before a kernel starts
        load_run(".", args.molecule, args.size, args.seed)
    except ReportError as exc:
        sys.exit(f"error: {exc}")
    out = run_dir(args.out, args.molecule, args.size, args.seed).with_suffix(".ipynb")
    params = {"molecule": args.molecule, "size": args.size, "seed": args.seed, "root": "."}
    title = f"crmse report: {args.molecule} n{args.size} s{args.seed}"
    try:
        nb, page = execute_report(TEMPLATE, out, params, title, cwd=".", progress=not args.no_progress)
    except PapermillExecutionError as exc:  # the failing cell and its traceback; nothing was written
        sys.exit(f"error: the report notebook failed, no report written:\n{exc}")
    print(f"report: wrote {nb} and {page}")
