"""DVC stage `report`: the papermill report of one run at one temperature setting, every arm side by side.

Executes pipelines/report.ipynb into reports/<mol>/n<size>/s<seed>/T<setting>.ipynb and renders a
standalone HTML next to it (figures embedded, code hidden). Reads only the tables of the evaluate, reference
and audit stages and the training logs (crmse.report.run). Run from the repository root.
"""

import sys
from pathlib import Path

from papermill.exceptions import PapermillExecutionError

from crmse.artifacts import temperature_folder
from crmse.report import ReportError, execute_report, load_run
from crmse.stage import run_parser, run_paths, stage_params

TEMPLATE = Path(__file__).with_name("report.ipynb")

if __name__ == "__main__":
    parser = run_parser(__doc__, temperature=True)
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    args = parser.parse_args()
    params = stage_params(args)
    try:  # fail fast, naming every missing input, before a kernel starts
        load_run(".", args.molecule, args.size, args.seed, args.temperature, params)
    except ReportError as exc:
        sys.exit(f"error: {exc}")
    out = run_paths(args).report(args.temperature, args.out)
    nb_params = {"molecule": args.molecule, "size": args.size, "seed": args.seed, "temperature": args.temperature,
                 "root": "."}
    title = f"crmse report: {args.molecule} n{args.size} s{args.seed} {temperature_folder(args.temperature)}"
    try:
        nb, page = execute_report(TEMPLATE, out, nb_params, title, cwd=".", progress=not args.no_progress)
    except PapermillExecutionError as exc:  # the failing cell and its traceback; nothing was written
        sys.exit(f"error: the report notebook failed, no report written:\n{exc}")
    print(f"report: wrote {nb} and {page}")
