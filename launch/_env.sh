# Shared by launch/demo.sh and tests/run.sh: create .venv and install simvlm_jax.
VENV="${VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_venv() {  # ensure_venv [extra]
  local extra="${1:-}"
  local stamp="$VENV/.simvlm_installed${extra:+_$extra}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "Creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall when setup.py changed since the last install.
  if [[ ! -f "$stamp" || setup.py -nt "$stamp" ]]; then
    echo "Installing simvlm_jax${extra:+[$extra]} into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e ".${extra:+[$extra]}" >&2
    touch "$stamp"
  fi
}
