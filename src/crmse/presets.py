"""Apply a preset: merge presets/<name>.yaml into params.yaml and validate the result.

Usage: ``python -m crmse.presets paper`` (``cpu`` restores the CPU defaults).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from crmse.io import atomic_path
from crmse.params import ParamsError, deep_merge, validate


def merge_preset(name: str, params_path: str | Path = "params.yaml", presets_dir: str | Path = "presets") -> dict:
    """``params_path`` with the preset merged in, validated; nothing is written."""
    preset_file = Path(presets_dir) / f"{name}.yaml"
    if not preset_file.exists():
        known = sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))
        raise ParamsError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    params = yaml.safe_load(Path(params_path).read_text())
    merged = deep_merge(params, yaml.safe_load(preset_file.read_text()) or {})
    validate(merged)
    return merged


def apply_preset(name: str, params_path: str | Path = "params.yaml", presets_dir: str | Path = "presets") -> dict:
    """Merge the preset into ``params_path`` (written atomically only if the result validates)."""
    merged = merge_preset(name, params_path, presets_dir)
    with atomic_path(params_path) as tmp:
        tmp.write_text(
            f"# preset: {name} (applied with `make preset PRESET={name}`; comments of the original were dropped)\n"
            + yaml.safe_dump(merged, sort_keys=False, default_flow_style=None)
        )
    return merged


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m crmse.presets NAME")
    apply_preset(sys.argv[1])
    print(f"params.yaml now uses preset {sys.argv[1]!r}")
