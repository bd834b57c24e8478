#!/usr/bin/env bash
# The MCP conformance suite's client scenarios against tests/conformance/client.py (our module, SDK-login mode).
# Usage: tests/conformance/run.sh PYTHON   (a Python with the MCP SDK 2.x and this package installed);
# CONFORMANCE_EXTRA="scenario ..." runs more scenarios.
# Installs the pinned suite, and a node >= 22 it needs (it ships as the npm package "node"), into
# .venv/conformance once. Fails on any failed check or any warning.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${1:?usage: tests/conformance/run.sh PYTHON}"
SUITE_VERSION=0.1.16
NODE_VERSION=22.23.3
DIR=.venv/conformance

if [ "$(cat "$DIR/versions" 2>/dev/null)" != "$SUITE_VERSION $NODE_VERSION" ]; then
    mkdir -p "$DIR"
    (cd "$DIR" && npm install --silent --no-audit --no-fund --no-save \
        "@modelcontextprotocol/conformance@$SUITE_VERSION" "node@$NODE_VERSION") || exit 1
    echo "$SUITE_VERSION $NODE_VERSION" > "$DIR/versions"
fi
export PATH="$PWD/$DIR/node_modules/.bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CLIENT="$PYTHON tests/conformance/client.py"

# Every scenario the SDK's own reference client passes with suite 0.1.16 (docs/mcp.md has the table). Not run:
# auth/2025-03-26-oauth-metadata-backcompat (the SDK's client fails it too).
SCENARIOS=(initialize tools_call elicitation-sep1034-client-defaults sse-retry
    auth/2025-03-26-oauth-endpoint-fallback auth/resource-mismatch auth/offline-access-scope
    auth/offline-access-not-supported auth/client-credentials-basic auth/client-credentials-jwt)

status=0
check() {  # $1: what ran; stdin: its output
    local out
    out="$(sed 's/\x1b\[[0-9;]*m//g')"
    if ! grep -Eq '(Total|Passed): .*, 0 failed, 0 warnings' <<<"$out" || grep -Eq 'FAILED|✗' <<<"$out"; then
        echo "conformance: $1 FAILED"
        grep -E 'FAILURE|WARNING|✗|Passed:|Total:' <<<"$out" | head -40
        status=1
    else
        echo "conformance: $1 passed ($(grep -Eo '(Total|Passed): [^,]*' <<<"$out" | tail -1))"
    fi
}
check "suite auth" < <(conformance client --command "$CLIENT" --suite auth 2>&1)
for scenario in "${SCENARIOS[@]}" ${CONFORMANCE_EXTRA:-}; do
    check "$scenario" < <(conformance client --command "$CLIENT" --scenario "$scenario" 2>&1)
done
exit $status
