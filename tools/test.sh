#!/usr/bin/env bash
# Install what is needed, then run the whole test suite, FUSE tests included.
#
# Usage: bash tools/test.sh [PYTEST ARGS...]    e.g. -k rename, or tests/test_cli.py
# Exits with pytest's code, except that "no tests collected" (5) and a missing /dev/fuse
# are failures too: the FUSE tests must run, never be skipped. BUILDATFS_TEST_TIMEOUT
# (seconds, default 3600) bounds the whole run, so that a wedged mount cannot hang CI.
set -euo pipefail

repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$repo_root"

bash tools/setup.sh

if [[ ! -c /dev/fuse ]]; then
    echo "test.sh: /dev/fuse is missing, so the FUSE tests cannot run." >&2
    echo "test.sh: load the module (modprobe fuse), or start the container with" \
        "--device /dev/fuse --cap-add SYS_ADMIN." >&2
    exit 1
fi
if ! command -v fusermount3 >/dev/null; then
    echo "test.sh: fusermount3 is missing; install the fuse3 package (tools/setup.sh does)." >&2
    exit 1
fi

# Run all of tests/ unless the arguments name test files or node ids themselves.
selects_tests=0
for arg in "$@"; do
    if [[ $arg == tests* || ($arg != -* && -e ${arg%%::*}) ]]; then
        selects_tests=1
    fi
done
((selects_tests)) || set -- tests "$@"

timeout_seconds=${BUILDATFS_TEST_TIMEOUT:-3600}
status=0
timeout --kill-after=60 "$timeout_seconds" \
    python3 -m pytest --durations=15 "$@" || status=$?

case $status in
    0) ;;
    5) echo "test.sh: pytest collected no tests; that counts as a failure." >&2 ;;
    124 | 137)
        echo "test.sh: the tests did not finish within ${timeout_seconds}s and were stopped;" \
            "look for a hung mount with findmnt -t fuse.buildatfs." >&2 ;;
    *) echo "test.sh: pytest failed with exit code $status." >&2 ;;
esac
exit "$status"
