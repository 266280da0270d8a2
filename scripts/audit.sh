#!/usr/bin/env bash
# Audit the resolved Python environment for known vulnerabilities with pip-audit.
#   scripts/audit.sh [pip-audit args]      e.g. scripts/audit.sh -s osv
# pip-audit needs an advisory service (PyPI's JSON API, OSV or ecosyste.ms). A package it could not
# look up is not "clean", and pip-audit says "No known vulnerabilities found" even when it audited
# nothing at all; so this script counts what was really looked up and prints NOT AUDITED (exit 3)
# unless every installed package was. Exit 0: audited, none known; 1: vulnerabilities listed.
set -u
if ! python -c "import pip_audit" 2>/dev/null; then
  echo "NOT AUDITED: pip-audit is not installed (pip install pip-audit)"; exit 3
fi
report=$(mktemp)
trap 'rm -f "$report"' EXIT
python -m pip_audit --progress-spinner off --skip-editable "$@" -f json -o "$report" 2>&1 | tail -5
python - "$report" <<'EOF'
import json, sys

try:
    deps = json.load(open(sys.argv[1]))["dependencies"]
except (OSError, ValueError, KeyError):
    print("NOT AUDITED: pip-audit wrote no report (the advisory service could not be reached?)")
    sys.exit(3)
skipped = [d for d in deps if d.get("skip_reason")]
audited = [d for d in deps if not d.get("skip_reason")]
vulns = [(d["name"], d["version"], v["id"], ", ".join(v.get("fix_versions") or []) or "no fix")
         for d in audited for v in d.get("vulns") or []]
for name, version, vid, fix in vulns:
    print(f"{name} {version}: {vid} (fixed in: {fix})")
if skipped or not audited:
    why = skipped[0]["skip_reason"] if skipped else "no package was looked up"
    print(f"NOT AUDITED: {len(audited)} of {len(deps)} packages looked up; {len(skipped)} could not be ({why})")
    sys.exit(3)
print(f"AUDITED {len(audited)} packages: " + (f"{len(vulns)} known vulnerabilities listed above" if vulns
                                               else "no known vulnerabilities"))
sys.exit(1 if vulns else 0)
EOF
