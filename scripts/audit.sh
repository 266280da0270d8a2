#!/usr/bin/env bash
# Audit the resolved Python environment for known vulnerabilities with pip-audit (PyPI/OSV advisories).
#   scripts/audit.sh [pip-audit args]      e.g. scripts/audit.sh --format json
# pip-audit needs the advisory service: offline it cannot audit anything, and this script then says
# NOT AUDITED and exits 3 rather than reporting a clean result it does not have.
set -u
if ! python -c "import pip_audit" 2>/dev/null; then
  echo "NOT AUDITED: pip-audit is not installed (pip install pip-audit)"; exit 3
fi
out=$(python -m pip_audit --progress-spinner off --skip-editable "$@" 2>&1)
rc=$?
echo "$out"
skipped=$(echo "$out" | grep -c "could not be audited")
if echo "$out" | grep -qiE "connection|resolve|network|Max retries|timed out|offline" || [ "$skipped" -gt 0 ]; then
  echo "NOT AUDITED: the advisory service could not be reached ($skipped packages could not be audited)"; exit 3
fi
[ $rc -eq 0 ] && echo "AUDITED: no known vulnerabilities" || echo "AUDITED: known vulnerabilities listed above"
exit $rc
