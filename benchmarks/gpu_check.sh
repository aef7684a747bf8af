#!/usr/bin/env bash
# One-shot GPU check of crmse (meant for a bare NVIDIA H200 machine, <= 8 minutes): MD and training throughput
# (benchmarks/md_throughput.py, crmse_throughput.py, train_throughput.py) and a paper-model slice of the pipeline
# run WITHOUT dvc (the stage scripts of pipelines/ called directly, in a temporary copy of the project), then
# stage times and a headline. TINY=1 runs the same thing at toy scale on the CPU (a few minutes).
#
#   WHEELS=wheels CRMSE_DATA_MIRROR=/path/to/md17 bash benchmarks/gpu_check.sh
#   TINY=1 CRMSE_DATA_MIRROR=/work/shared/data/md17 bash benchmarks/gpu_check.sh
#
# Environment:
#   TINY=1             toy sizes on the CPU (tiny R, few iterations, ~0.05 ps, tiny model in the pipeline slice)
#   WHEELS=dir         install the extra wheels below from this folder (pip --no-index --no-deps --target)
#   CRMSE_DATA_MIRROR  folder holding md17_ethanol.npz (the project's mirror, /work/shared/data/md17; see its
#                      SOURCES.md); without it the pipeline slice is skipped (benchmarks use the test fixture)
#   GPU_CHECK_OUT      results folder (default: $OUT/gpu_check when $OUT is set, else a new temporary folder)
#   PYTHON             interpreter (default: .venv/bin/python of the checkout if present, else python3)
#   BUDGET_S           wall-clock budget in s (default 480 on a GPU, 900 with TINY=1): every section runs under
#                      `timeout`, capped by what is left; a section that would start with < 10 s left is skipped
#   THREADS            torch CPU threads (default 4; 1 with TINY=1)
#   KEEP=1             keep the temporary project copy (printed path)
#
# Packages a bare machine with torch, numpy, scipy, pandas, matplotlib, seaborn, h5py and pytorch-lightning lacks
# (found by importing every module these scripts and pipeline stages use with everything else blocked).
# All are installed with --no-deps: schnetpack 2.2's declared requirements (black, pre-commit, hydra, tensorboard,
# pytest, ...) are imported by nothing here. dvc, papermill and pyscf are NOT needed (no dvc, no report, no audit):
#   schnetpack==2.2.0 ase==3.29.0 matscipy==1.3.1 vesin==0.6.2 torch-ema==0.3 fasteners==0.20 dirsync==2.2.6
#   progressbar==2.5 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 tabulate==0.10.0 rich==15.0.0
#   markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
# Download them on a machine with internet (PY = the GPU machine's Python minor version, e.g. 3.11 or 3.12;
# matscipy's wheel is per Python version (cp3xx), vesin's per platform only, the rest are pure Python;
# progressbar and antlr4-python3-runtime exist only as source archives, so `pip wheel` builds their pure-Python
# wheels):
#   pip download --only-binary=:all: --no-deps --python-version "$PY" --implementation cp \
#       --platform manylinux_2_28_x86_64 -d wheels/ schnetpack==2.2.0 ase==3.29.0 matscipy==1.3.1 vesin==0.6.2 \
#       torch-ema==0.3 fasteners==0.20 dirsync==2.2.6 omegaconf==2.3.1 tabulate==0.10.0 rich==15.0.0 \
#       markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
#   pip wheel --no-deps -w wheels/ progressbar==2.5 antlr4-python3-runtime==4.9.3
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINY="${TINY:-0}"
T0=$(date +%s)
if [[ "$TINY" == 1 ]]; then BUDGET_S="${BUDGET_S:-900}"; THREADS="${THREADS:-1}"; else
  BUDGET_S="${BUDGET_S:-480}"; THREADS="${THREADS:-4}"; fi
if [[ -n "${GPU_CHECK_OUT:-}" ]]; then RES="$GPU_CHECK_OUT"
elif [[ -n "${OUT:-}" ]]; then RES="$OUT/gpu_check"
else RES="$(mktemp -d -t gpu_check.XXXXXX)"; fi
mkdir -p "$RES"
RES="$(cd "$RES" && pwd)"
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"
cleanup() { if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
exec > >(tee -a "$RES/gpu_check.log") 2>&1

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
export PYTHONHASHSEED=0 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
# Inductor's compile cache lives with the run: a compile time measured here is a cold one.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) TINY=$TINY budget ${BUDGET_S}s results $RES"
echo "== host: $(uname -srm), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; else echo "== nvidia-smi: not present"; fi

# --- extra wheels --------------------------------------------------------------------------------------------------
SITE="$WORK/site"
if [[ -n "${WHEELS:-}" ]]; then
  echo "== installing carried wheels from $WHEELS into $SITE"
  # --ignore-requires-python: schnetpack 2.2.0 declares Python >= 3.12 but runs on 3.11 (as the Makefile installs it).
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --ignore-requires-python --target "$SITE" \
    schnetpack ase matscipy vesin torch-ema fasteners dirsync progressbar omegaconf antlr4-python3-runtime \
    tabulate rich markdown-it-py mdurl pygments
fi

# --- a temporary copy of the project: the checkout's params.yaml, data/, models/ are never touched ------------------
PROJ="$WORK/proj"
mkdir -p "$PROJ"
cp -r "$REPO/src" "$REPO/pipelines" "$REPO/presets" "$REPO/params.yaml" "$REPO/dvc.yaml" "$PROJ/"
find "$PROJ" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$SITE:$PROJ/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF'
import platform, torch
print(f"== python {platform.python_version()}, torch {torch.__version__}, CUDA available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""))
import ase, schnetpack  # noqa: F401  (fails here, not in a stage, when a wheel is missing)
import crmse
print(f"== schnetpack {schnetpack.__version__} ({schnetpack.__file__}), ase {ase.__version__} ({ase.__file__}), "
      f"crmse from {crmse.__file__}")
EOF
CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ "$CUDA" == 1 && "$TINY" != 1 ]]; then DEV=cuda; else DEV=cpu; fi
if [[ "$DEV" == cpu && "$TINY" != 1 ]]; then
  echo "== no CUDA device: the GPU-scale run would take hours on a CPU; rerun with TINY=1 (CUDA paths skipped)"
  exit 1
fi
[[ "$CUDA" == 1 ]] || echo "== CUDA paths skipped: torch sees no CUDA device (CPU-only TINY run)"

# --- timing helper --------------------------------------------------------------------------------------------------
STAGES="$RES/stages.tsv"
printf 'section\tstatus\twall_s\n' > "$STAGES"
FAILED=0

# section NAME CAP_S CMD...: run CMD under `timeout` (CAP_S, capped by the budget left); record status and wall time.
section() {
  local name="$1" cap="$2"; shift 2
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if ((left < 10)); then
    echo "== SKIP $name: budget of ${BUDGET_S}s spent"; printf '%s\tskipped (budget)\t0\n' "$name" >> "$STAGES"
    FAILED=$((FAILED + 1)); return 1
  fi
  ((cap > left)) && cap=$left
  echo "== $name (limit ${cap}s): $*"
  local t rc dt
  t=$(date +%s.%N)
  set +e; timeout --kill-after=10 "$cap" "$@"; rc=$?; set -e
  dt=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  local status=ok
  if ((rc == 124 || rc == 137)); then status="timed out"; elif ((rc != 0)); then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STAGES"
  echo "== $name: $status, ${dt}s"
  [[ "$status" == ok ]] || { FAILED=$((FAILED + 1)); return 1; }
}

skip() {  # skip NAME REASON
  echo "== SKIP $1: $2"; printf '%s\tskipped (%s)\t0\n' "$1" "$2" >> "$STAGES"; FAILED=$((FAILED + 1))
}

# --- throughput benchmarks ------------------------------------------------------------------------------------------
B="$REPO/benchmarks"
MIRROR="${CRMSE_DATA_MIRROR:-}"
NPZ_ARGS=()
[[ -n "$MIRROR" && -f "$MIRROR/md17_ethanol.npz" ]] && NPZ_ARGS=(--npz "$MIRROR/md17_{molecule}.npz")
if [[ "$TINY" == 1 ]]; then
  MD=(--device cpu --replicas 1 8 --seconds 0.2 --rounds 1 --threads "$THREADS")
  section "md_throughput small" 240 "$PYTHON" "$B/md_throughput.py" "${MD[@]}" --model small \
    --compile-replicas 8 --out "$RES/md_throughput_small.json" || true
  section "md_throughput paper" 120 "$PYTHON" "$B/md_throughput.py" "${MD[@]}" --model paper \
    --methods bare crmse crmse+VL "integrator only" spk.md ASE --out "$RES/md_throughput_paper.json" || true
  section "crmse_throughput" 120 "$PYTHON" "$B/crmse_throughput.py" --device cpu --model small --chains 4 \
    --iterations 3 --warmup 1 --steps-per-iter 5 --n-train 50 --threads "$THREADS" "${NPZ_ARGS[@]}" \
    --out "$RES/crmse_throughput.json" || true
  if [[ ${#NPZ_ARGS[@]} -gt 0 ]]; then
    (cd "$PROJ" && section "train_throughput" 120 "$PYTHON" "$B/train_throughput.py" --device cpu --model small \
      --molecules ethanol --size 64 --epochs 1 --neighbour-lists ase --threads "$THREADS" "${NPZ_ARGS[@]}" \
      --out "$RES/train_throughput.json") || true
  else skip "train_throughput" "no CRMSE_DATA_MIRROR with md17_ethanol.npz"; fi
else
  MD=(--device cuda --replicas 64 1024 4096 16384 --seconds 0.5 --rounds 2 --threads "$THREADS" --max-step-s 5)
  section "md_throughput small" 60 "$PYTHON" "$B/md_throughput.py" "${MD[@]}" --model small \
    --methods bare crmse crmse+VL "integrator only" spk.md --out "$RES/md_throughput_small.json" || true
  section "md_throughput paper" 110 "$PYTHON" "$B/md_throughput.py" "${MD[@]}" --model paper \
    --compile-replicas 1024 4096 --methods bare bare+compile crmse crmse+VL "integrator only" spk.md \
    --out "$RES/md_throughput_paper.json" || true
  section "crmse_throughput" 45 "$PYTHON" "$B/crmse_throughput.py" --device cuda --model paper --chains 512 \
    --iterations 10 --warmup 2 --n-train 1000 --threads "$THREADS" "${NPZ_ARGS[@]}" \
    --out "$RES/crmse_throughput.json" || true
  if [[ ${#NPZ_ARGS[@]} -gt 0 ]]; then
    (cd "$PROJ" && section "train_throughput" 30 "$PYTHON" "$B/train_throughput.py" --device cuda --model paper \
      --molecules ethanol --size 1000 --epochs 1 --trainers crmse --threads "$THREADS" "${NPZ_ARGS[@]}" \
      --out "$RES/train_throughput.json") || true
  else skip "train_throughput" "no CRMSE_DATA_MIRROR with md17_ethanol.npz"; fi
fi
# (a subshell's section writes its own row to stages.tsv; its FAILED count is recounted from the table below)

# --- the pipeline slice, without dvc ----------------------------------------------------------------------------------
# Params: presets/paper.yaml, then this override (a preset file of the temporary copy, applied the same way).
# The temperature is the nominal MD17 500 K for the chains and the samples, and the `auto` bounds are wide: a minute of
# pretraining must not stop a timing run (T_auto is still computed by pretrain and recorded in mse_metrics.json).
if [[ "$TINY" == 1 ]]; then
  SIZE=100
  cat > "$PROJ/presets/gpu_check.yaml" <<EOF
molecules: [ethanol]
train_sizes: [$SIZE]
seeds: [0]
device: cpu
torch_threads: $THREADS
split: {n_val: 10, n_test: 20}
model: {n_atom_basis: 16, n_filters: 16, n_interactions: 2, n_rbf: 20, cutoff: 5.0, dtype: float32}
mse: {max_epochs: 1000, max_steps: 300, max_minutes: 0.5}
crmse: {chains: {n: 4, steps_per_iter: 2, temperature: 500}, iterations: 6, selection: {every: 3}}
crmse_memory: {scouts: {n: 4}}
md: {temperatures: [500], auto_temperature_frames: 8, auto_temperature_bounds: [1.0e-3, 1.0e+12], n_replicas: 3,
     equilibration_fs: 5, production_ps: 0.05, save_every: 2, chunk_frames: 5, conf_temperature_frames: 8}
evaluate: {conf_temperature_frames: 8, bootstrap_draws: 10}
audit: {molecules: [ethanol]}
EOF
else
  SIZE=1000
  cat > "$PROJ/presets/gpu_check.yaml" <<EOF
molecules: [ethanol]
train_sizes: [$SIZE]
seeds: [0]
device: cuda
torch_threads: $THREADS
mse: {max_steps: 3000, max_minutes: 0.75}
crmse: {chains: {n: 512, temperature: 500}, iterations: 200, selection: {every: 50}}
crmse_memory: {scouts: {n: 512}}
md: {temperatures: [500], auto_temperature_frames: 200, auto_temperature_bounds: [1.0e-3, 1.0e+12], n_replicas: 1024,
     equilibration_fs: 250, production_ps: 2, conf_temperature_frames: 256}
evaluate: {conf_temperature_frames: 64, bootstrap_draws: 50}
audit: {molecules: [ethanol]}
EOF
fi
P=(ethanol "$SIZE" 0)
if [[ -z "$MIRROR" || ! -f "$MIRROR/md17_ethanol.npz" ]]; then
  skip "pipeline" "CRMSE_DATA_MIRROR does not hold md17_ethanol.npz"
else
  export CRMSE_DATA_MIRROR="$MIRROR"
  if [[ "$TINY" == 1 ]]; then CAP=(60 60 120 120 120 60); else CAP=(30 30 100 75 40 40); fi
  run() {  # run NAME CAP SCRIPT ARGS...: a stage script of the copy, from the copy's root
    local name="$1" cap="$2" script="$3"; shift 3
    (cd "$PROJ" && section "$name" "$cap" "$PYTHON" "pipelines/$script" "$@")
  }
  # `python -m crmse.presets NAME` twice, in the copy: paper, then the override above (each merge is validated).
  if (cd "$PROJ" && section "params: presets paper + gpu_check" 60 bash -c \
        "'$PYTHON' -m crmse.presets paper && '$PYTHON' -m crmse.presets gpu_check") &&
     run "download" "${CAP[0]}" download.py ethanol && run "split" "${CAP[1]}" split.py "${P[@]}" &&
     run "pretrain" "${CAP[2]}" pretrain.py "${P[@]}"; then
    ARMS=(mse)
    for arm in crmse crmse_memory; do
      if run "posttrain $arm" "${CAP[3]}" posttrain.py "${P[@]}" "$arm"; then ARMS+=("$arm"); fi
    done
    for arm in "${ARMS[@]}"; do
      run "sample $arm" "${CAP[4]}" sample.py "${P[@]}" 500 "$arm" &&
        run "evaluate $arm" "${CAP[5]}" evaluate.py "${P[@]}" 500 "$arm" || true
    done
    # The sample stage's engine on the slice's MSE model, eager against torch.compile; on the GPU all pairs
    # (static shapes) in mode reduce-overhead, i.e. with CUDA graphs.
    if [[ "$TINY" == 1 ]]; then CMD=(--device cpu --replicas 3 --steps 5 --rounds 1); else
      CMD=(--device cuda --replicas 1024 --skin 0 --mode reduce-overhead --steps 200 --rounds 2); fi
    section "compile_md" 90 "$PYTHON" "$B/compile_md.py" --workspace "$PROJ" --molecules ethanol --size "$SIZE" \
      "${CMD[@]}" --threads "$THREADS" --out "$RES/compile_md.json" || true
  fi
  # Small outputs of the slice (stage timings, metrics, logs, params) next to the benchmark results.
  mkdir -p "$RES/pipeline"
  cp "$PROJ/params.yaml" "$RES/pipeline/params.yaml"
  for d in timings metrics models; do
    if [[ -d "$PROJ/$d" ]]; then
      (cd "$PROJ" && find "$d" \( -name '*.json' -o -name '*.csv' \) -exec cp --parents {} "$RES/pipeline/" \;)
    fi
  done
fi

# --- headline ----------------------------------------------------------------------------------------------------------
"$PYTHON" - "$RES" "$(($(date +%s) - T0))" <<'PY' | tee "$RES/headline.md"
"""Headline of a gpu_check run: section times, throughput per method, the pipeline slice's stage timings."""
import csv
import json
import sys
from pathlib import Path

res, total = Path(sys.argv[1]), sys.argv[2]
print(f"\n# gpu_check headline ({total} s before this summary)\n")
rows = list(csv.DictReader((res / "stages.tsv").open(), delimiter="\t"))
print("| section | status | wall s |\n|---|---|---|")
for r in rows:
    print(f"| {r['section']} | {r['status']} | {r['wall_s']} |")


def num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


for f in sorted(res.glob("md_throughput_*.json")):
    d = json.loads(f.read_text())
    if "rows" not in d:
        print(f"\n{f.name}: {d}")
        continue
    info = d.get("device_info", {})
    print(f"\n## {f.name}: {info.get('device_name')}, torch {info.get('torch')}, {info.get('threads')} threads, "
          f"{d.get('date')} (replica-steps per wall second, best round)\n")
    print("| molecule | model | R | bare | bare+compile | compile/eager | compile s | crmse | crmse/bare | crmse+VL "
          "| spk.md | not timed |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        w = r["wall"]

        def f0(k: str, w: dict = w) -> str:
            return f"{w[k]:.0f}" if k in w else "—"

        def q(a: str, b: str, w: dict = w) -> str:
            return f"{w[a] / w[b]:.2f}" if a in w and b in w else "—"

        cs = f"{r['compile_s']:.0f}" if "compile_s" in r else "—"
        print(f"| {r['molecule']} | {r.get('model')} | {r['R']} | {f0('bare')} | {f0('bare+compile')} | "
              f"{q('bare+compile', 'bare')} | {cs} | {f0('crmse')} | {q('crmse', 'bare')} | {f0('crmse+VL')} | "
              f"{f0('spk.md')} | {', '.join(r.get('skipped', {})) or '—'} |")
f = res / "crmse_throughput.json"
if f.exists():
    print("\n## CRMSE post-training (train_crmse)\n\n| arm | chains | scouts | it/s | chain replica-steps/s |"
          "\n|---|---|---|---|---|")
    for r in json.loads(f.read_text())["rows"]:
        print(f"| {r['arm']} | {r['chains']} | {r['scouts']} | {r['iterations_per_s']:.2f} | "
              f"{r['chain_steps_per_s']:.0f} |")
f = res / "compile_md.json"
if f.exists():
    d = json.loads(f.read_text())
    print(f"\n## the sample stage's engine, eager vs torch.compile ({d['device_name']}, mode {d['args']['mode']})"
          "\n\n| molecule | R | skin Å | compile s | eager | compiled | compiled/eager |\n|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        print(f"| {r['molecule']} | {r['replicas']} | {r['skin']} | {r['compile_s']:.0f} | "
              f"{max(r['rates']['eager']):.0f} | {max(r['rates']['compiled']):.0f} | {r['ratio_best']:.2f} |")
f = res / "train_throughput.json"
if f.exists():
    d = json.loads(f.read_text())
    print(f"\n## MSE training ({d['device']}, batch {d['batch_size']})\n")
    for r in d["rows"]:
        print(f"- {r['molecule']} {r['trainer']}: {r['frames_per_s']:.0f} frames/s")
pipe = res / "pipeline"
if pipe.exists():
    print("\n## pipeline slice: stage timings and metrics\n")
    for f in sorted((pipe / "timings").rglob("*.json")):
        d = json.loads(f.read_text())
        flat = {k: v for k, v in d.items() if num(v)}
        flat |= {f"{k}.{k2}": v2 for k, v in d.items() if isinstance(v, dict) for k2, v2 in v.items() if num(v2)}
        keep = {k: v for k, v in flat.items() if "per_s" in k or "per_day" in k or k.endswith("wall_s")}
        print(f"- {f.relative_to(pipe)}: " + ", ".join(f"{k} {v:.4g}" for k, v in list(keep.items())[:8]))
    for f in sorted((pipe / "metrics").rglob("metrics.json")):
        d = json.loads(f.read_text())
        keys = ("test_forces_mae", "stable_fraction", "spurious_replica_fraction", "hr_mae", "energy_w1")
        print(f"- {f.relative_to(pipe)}: " + ", ".join(f"{k} {d[k]:.3g}" for k in keys if num(d.get(k))))
PY
FAILED=$(awk -F'\t' 'NR > 1 && $2 != "ok"' "$STAGES" | wc -l)
echo "== gpu_check done in $(($(date +%s) - T0)) s; $FAILED section(s) not ok; results in $RES"
((FAILED == 0))
