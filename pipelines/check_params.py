"""DVC stage `check_params`: validate the whole params.yaml before any other stage runs.

Every stage depends on its output, and it depends on params.yaml as a file, so any edit — including a
misspelt key no stage declares — is checked on the next ``dvc repro``. The output never changes, so a
valid edit reruns only the stages whose declared params changed.
"""

import sys
from pathlib import Path

from crmse.io import atomic_path
from crmse.params import ParamsError, load_params

if __name__ == "__main__":
    try:
        load_params()
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
    with atomic_path(Path("data/params_checked.txt")) as tmp:
        tmp.write_text("params.yaml passed crmse.params validation\n")
