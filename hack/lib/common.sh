# Shared by hack/test.sh and hack/demo.sh: one way to get the Python environment ready.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

step() { printf '\n==> %s\n' "$*"; }

# Debian packages the suite needs; installed only when missing (CI and fresh machines).
ensure_debian_packages() {
  local missing=()
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  command -v go >/dev/null 2>&1 || missing+=(golang-go)
  # tests/unit/test_bench_peers.py runs the bench's HAProxy configuration for real
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
      echo "need root to apt-get install ${missing[*]}" >&2
      return 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The project's virtualenv with pinned dependencies; re-installed when pyproject.toml changes.
ensure_python_env() {
  local stamp="$VENV/.nhigate-pyproject.sha256"
  local want
  want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  if [ ! -x "$PY" ]; then
    step "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    step "installing nhigate and pinned dependencies (pip)"
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip==25.3
    "$PY" -m pip install -q --disable-pip-version-check -e "${ROOT}[dev]"
    echo "$want" > "$stamp"
  fi
}
