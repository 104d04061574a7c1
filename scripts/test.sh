#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Debian: swaks, redis-server, slapd, ldap-utils, systemd for systemd-analyze; Python: a venv
# with the gateway and its test extras), then pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v swaks >/dev/null 2>&1 || need_apt+=(swaks)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)  # started by test fixtures
[ -x /usr/sbin/slapd ] || need_apt+=(slapd)  # our own instance per test module (tests/slapdrig.py)
command -v ldapsearch >/dev/null 2>&1 || need_apt+=(ldap-utils)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)  # verifies systemd/*.service, *.socket
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        # slapd: install only, no system directory (the tests start their own instances)
        echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "scripts/test.sh: missing ${need_apt[*]}; install them (apt-get install ${need_apt[*]}) or run as root" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# Regenerate the twistd plugin cache as the installing user (twisted-notes §4).
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

.venv/bin/ruff check
exec .venv/bin/python -m pytest "$@"
