"""The report stages' library: per-report loading, generated text, figures, the index and notebook execution.

The papermill templates ``pipelines/report.ipynb`` (one run at one temperature setting, every arm) and
``pipelines/index.ipynb`` (every report) are thin: they call the functions re-exported here. The report
only reads tables the other stages wrote; it never re-analyses samples.
"""

from crmse.report.display import (
    MAX_COLUMNS,
    PAGE_WIDTH_PX,
    figure_html,
    figure_png,
    show,
    show_markdown,
    show_table,
    split_columns,
    table_html,
)
from crmse.report.figures import (
    fig_audit,
    fig_dihedrals,
    fig_hr,
    fig_overview,
    fig_parity,
    fig_spurious,
    fig_stability,
    fig_temperatures,
)
from crmse.report.index import (
    ReportKey,
    collect_runs,
    discover_runs,
    index_paragraph,
    index_table,
    seed_table,
    several_seeds,
)
from crmse.report.index_figures import fig_arms, fig_sweep, index_figures
from crmse.report.molecule import draw_molecule, fig_worst
from crmse.report.notebook import execute_report, render_html
from crmse.report.run import ReportError, RunData, load_run, required_inputs
from crmse.report.style import fmt, set_style
from crmse.report.text import (
    CORRELATION_NOTE,
    audit_sentence,
    audit_table,
    detector_sentence,
    evidence_table,
    metrics_table,
    run_header,
    summary_paragraph,
    temperature_sentence,
)
from crmse.report.training import fig_chains, fig_holes, fig_training

#: Figure keys of a report, in page order (each appears as ``<figure id="fig-<key>">`` in the HTML).
RUN_FIGURES = ("overview", "temperature", "spurious", "worst", "stability", "hr", "dihedral", "parity", "training",
               "chains", "holes", "audit")

__all__ = [
    "CORRELATION_NOTE", "MAX_COLUMNS", "PAGE_WIDTH_PX", "RUN_FIGURES", "ReportError", "ReportKey", "RunData",
    "audit_sentence", "audit_table", "collect_runs", "detector_sentence", "discover_runs", "draw_molecule",
    "evidence_table", "execute_report", "fig_arms", "fig_audit", "fig_chains", "fig_dihedrals", "fig_holes",
    "fig_hr", "fig_overview", "fig_parity", "fig_spurious", "fig_stability", "fig_sweep", "fig_temperatures",
    "fig_training", "fig_worst", "figure_html", "figure_png", "fmt", "index_figures", "index_paragraph",
    "index_table", "load_run", "metrics_table", "render_html", "required_inputs", "run_header", "seed_table",
    "set_style", "several_seeds", "show", "show_markdown", "show_table", "split_columns", "summary_paragraph",
    "table_html", "temperature_sentence",
]
