#!/usr/bin/env bash
# One-GPU check: GRPO vs RLSD (live, synced) step time and peak memory, FSDP2 with a distillation loss, ZeRO-3, and
# RLSD generating with TRL's colocated vLLM (teacher in the trainer / served by the engine) where vllm is importable.
#   bash benchmarks/gpu/check.sh [--smoke] [--out FILE] [--rows a,b]   run (installs trl/deepspeed from wheels if missing)
#   bash benchmarks/gpu/check.sh --fetch-wheels DIR                     download the wheels to carry (needs network)
# Wheels are looked for in $RLSD_WHEELS (default benchmarks/gpu/wheels); nothing is downloaded when running.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
WHEELS="${RLSD_WHEELS:-$HERE/wheels}"

fetch_wheels() {
    # Download trl (no deps), datasets/math-verify with their deps, and a deepspeed wheel with its small deps.
    local dir="$1"
    mkdir -p "$dir"
    "$PYTHON" -m pip download --no-deps "trl==1.16.0" -d "$dir" || return 1
    # For a GPU machine with another Python, set RLSD_WHEELS_PYTHON_VERSION (e.g. 3.12): binary wheels for it.
    local target=()
    [[ -n "${RLSD_WHEELS_PYTHON_VERSION:-}" ]] \
        && target=(--python-version "$RLSD_WHEELS_PYTHON_VERSION" --only-binary=:all:)
    "$PYTHON" -m pip download "${target[@]}" "datasets==5.2.0" "math-verify==0.9.0" pyyaml setuptools wheel -d "$dir" \
        || echo "warning: datasets/math-verify wheels not downloaded"
    if "$PYTHON" -m pip wheel --no-deps --no-build-isolation deepspeed -w "$dir"; then
        "$PYTHON" -m pip download "${target[@]}" hjson py-cpuinfo ninja msgpack einops pydantic -d "$dir" \
            || echo "warning: some deepspeed dependencies not downloaded"
    else
        echo "warning: no deepspeed wheel built: the zero3 rows will be skipped"
    fi
    echo "wheels in $dir:"; ls "$dir"
}

has_module() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

install_from_wheels() {
    # install_from_wheels MODULE PIP_SPEC [--no-deps]: install from $WHEELS only if MODULE is missing.
    local module="$1" spec="$2" nodeps="${3:-}"
    has_module "$module" && return 0
    local name="${spec%%=*}"
    if ! ls "$WHEELS" 2>/dev/null | grep -qiE "^${name//[-_]/[-_]}-[0-9]"; then
        echo "install: $module missing and no $name wheel in $WHEELS"; return 1
    fi
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" $nodeps "$spec" >/dev/null 2>&1 \
        && echo "install: $spec from $WHEELS" || { echo "install: $spec from $WHEELS failed"; return 1; }
}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    [[ -n "${2:-}" ]] || { echo "usage: $0 --fetch-wheels DIR" >&2; exit 2; }
    fetch_wheels "$2"; exit $?
fi

SMOKE=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && SMOKE=1; done
if [[ "$SMOKE" == 0 ]]; then
    install_from_wheels datasets "datasets==5.2.0"
    install_from_wheels trl "trl==1.16.0" --no-deps
    install_from_wheels math_verify "math-verify==0.9.0"
    if ! has_module deepspeed; then
        for dep in hjson:hjson cpuinfo:py-cpuinfo ninja:ninja msgpack:msgpack einops:einops; do
            install_from_wheels "${dep%%:*}" "${dep##*:}" --no-deps >/dev/null
        done
        install_from_wheels deepspeed deepspeed --no-deps || echo "zero3: skipped, deepspeed wheel not found"
    fi
    has_module rlsd || "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps -e "$ROOT" >/dev/null 2>&1 \
        || echo "install: rlsd not installed, using PYTHONPATH=src"
fi
has_module trl || { echo "trl is missing and could not be installed from $WHEELS: nothing can run" >&2; exit 1; }
has_module vllm || echo "vllm: not importable by $PYTHON: the vllm-colocate and vllm-served-teacher rows are skipped" \
    "(GPU: pip install vllm==0.31.0; CPU: make install-vllm, then PYTHON=.venv-vllm/bin/python)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$HERE/check.py" "$@"
