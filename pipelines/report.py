"""DVC stage `report`: the papermill report of one (molecule, size, seed).

Executes pipelines/report.ipynb into reports/<mol>/n<size>/s<seed>.ipynb and renders a standalone HTML
next to it (figures embedded, code hidden); ``--temperature K`` reports the temperature-ablation samples
into reports/<mol>/n<size>/s<seed>/T<K>.{ipynb,html}. Run from the repository root.
"""

import sys
from pathlib import Path

from papermill.exceptions import PapermillExecutionError

from crmse.io import run_dir, temperature_variant
from crmse.report import ReportError, execute_report, load_run
from crmse.stage import run_parser

TEMPLATE = Path(__file__).with_name("report.ipynb")

if __name__ == "__main__":
    parser = run_parser(__doc__, ablation=True)
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    args = parser.parse_args()
    variant = temperature_variant(args.temperature)
    try:  # fail fast, naming every missing input, before a kernel starts
        load_run(".", args.molecule, args.size, args.seed, variant)
    except ReportError as exc:
        sys.exit(f"error: {exc}")
    run = run_dir(args.out, args.molecule, args.size, args.seed)
    out = (run / variant if variant else run).with_suffix(".ipynb")
    params = {"molecule": args.molecule, "size": args.size, "seed": args.seed, "root": ".", "variant": variant}
    title = f"crmse report: {args.molecule} n{args.size} s{args.seed} {variant}".rstrip()
    try:
        nb, page = execute_report(TEMPLATE, out, params, title, cwd=".", progress=not args.no_progress)
    except PapermillExecutionError as exc:  # the failing cell and its traceback; nothing was written
        sys.exit(f"error: the report notebook failed, no report written:\n{exc}")
    print(f"report: wrote {nb} and {page}")
