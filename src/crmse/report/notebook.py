"""Executing a report notebook with papermill on this interpreter, and rendering it as standalone HTML."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crmse.io import atomic_path


@contextmanager
def kernel_environment() -> Iterator[str]:
    """A Jupyter kernel spec that runs THIS interpreter (the project's venv), whatever else is installed.

    A kernel named "python3" elsewhere on JUPYTER_PATH or in ~/.local/share/jupyter could point at another
    Python; a private spec prepended to JUPYTER_PATH for the duration cannot. Yields the kernel name.
    """
    name = "crmse-python"
    with tempfile.TemporaryDirectory(prefix="crmse-kernel-") as tmp:
        spec = Path(tmp) / "kernels" / name
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            # The kernel's own log (a warning about unencrypted local TCP, and an "error" when it is shut down
            # with SIGINT at the end) is noise in a stage's output; cell errors still fail the stage.
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=CRITICAL"],
            "display_name": "crmse (project venv)",
            "language": "python",
        }))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def render_html(nb: Any, title: str) -> str:
    """Standalone HTML of an executed notebook: outputs only (code hidden), images embedded."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


#: papermill's per-execution clocks (notebook and cell metadata): dropped so that a rerun gives the same bytes.
_RUN_KEYS = ("start_time", "end_time", "duration")


def strip_run_metadata(nb: Any) -> Any:
    """Drop every execution time from ``nb`` and give its cells fixed ids, in place; returns ``nb``.

    nbformat gives the cell papermill injects a random id; the template's cells are renumbered with it.
    """
    for meta in (nb.metadata.get("papermill", {}), *(c.metadata.get("papermill", {}) for c in nb.cells)):
        for key in _RUN_KEYS:
            meta.pop(key, None)
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)  # nbclient's clocks
        cell.id = f"cell-{i}"
    return nb


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path)


def execute_report(
    template: str | os.PathLike,
    out_ipynb: str | os.PathLike,
    parameters: Mapping[str, Any],
    title: str,
    cwd: str | os.PathLike = ".",
    progress: bool = True,
) -> tuple[Path, Path]:
    """Execute ``template`` with papermill, write the executed notebook and its HTML (same stem), atomically;
    the same inputs give the same bytes (no execution times, fixed cell ids).

    Nothing is written when a cell fails (papermill's error names the cell and shows its traceback).
    Returns (ipynb path, html path).
    """
    import nbformat
    import papermill as pm

    out_ipynb = Path(out_ipynb)
    out_html = out_ipynb.with_suffix(".html")
    with kernel_environment() as kernel, tempfile.TemporaryDirectory(prefix="crmse-report-") as tmp:
        executed = Path(tmp) / out_ipynb.name
        pm.execute_notebook(
            str(template), str(executed), parameters=dict(parameters), kernel_name=kernel, cwd=str(cwd),
            progress_bar=progress, report_mode=True,
        )
        nb = nbformat.read(executed, as_version=4)
    # Open in Jupyter with the ordinary kernel name, and record paths relative to the project, not temp paths.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    pm_meta = nb.metadata.get("papermill", {})
    pm_meta["input_path"] = _relative(Path(template), Path(cwd))
    pm_meta["output_path"] = _relative(out_ipynb, Path(cwd))
    strip_run_metadata(nb)
    page = render_html(nb, title)
    with atomic_path(out_ipynb) as tmp_nb:
        nbformat.write(nb, tmp_nb)
    with atomic_path(out_html) as tmp_html:
        tmp_html.write_text(page, encoding="utf-8")
    return out_ipynb, out_html
