# Sourced by test.sh and speedrun.sh: check prerequisites, install uv if missing,
# create .venv with every dependency and build rustbpe (Rust, via maturin).
command -v python3 >/dev/null 2>&1 || { echo "error: python3 not found: install Python >= 3.10 (e.g. apt-get install python3 python3-pip)" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: Python >= 3.10 is needed, found $(python3 --version 2>&1): install a newer Python" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || { echo "error: the Rust toolchain (cargo) is missing: install it with 'curl https://sh.rustup.rs -sSf | sh -s -- -y' and open a new shell" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
    echo "installing uv (the Python package manager) with pip"
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv || { echo "error: could not install uv with pip: install it (pip install uv) and retry" >&2; exit 1; }
    export PATH="$(python3 -m site --user-base)/bin:$PATH"
fi
# uv shows what it downloads and builds; nothing to do when .venv is already in sync
echo "setting up .venv: torch and the other dependencies, and rustbpe built from Rust (the first time: a few minutes)"
uv sync --group dev
