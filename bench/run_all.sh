#!/usr/bin/env bash
# Reproduce every sender figure of docs/benchmarks.md ("Sender") on a fresh Debian 12 machine, as root:
#
#   bash bench/run_all.sh
#
# It installs what is missing (Debian's varnish, wrk and iproute2; the venv in .venv with purged, as
# .ci/setup.sh does), then runs, each printing its figures (every repeat and the median):
#   1. bench/netns_delay.py --check   the 80 ms TUN-delayed link between two namespaces, and its measured RTT
#   2. bench/sender_bench.py --httpx  loopback: purged into 1 and 4 varnishd vs the wrk ceiling, plus httpx
#   3. bench/crossdc_bench.py         80 ms RTT: PURGE/s per node, pipelined vs one request in flight
# PROFILE=1 also installs py-spy into the venv and prints where purged spends its CPU (4 nodes, 1 repeat).
# Extra arguments go to sender_bench.py (e.g. --repeats 5). Takes about 15 minutes.
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"   # set -euo pipefail; cd to the repository
need_debian varnishd varnish
need_debian wrk wrk
need_debian ip iproute2
setup_python ""
[ "$(id -u)" = 0 ] || { echo "run_all: needs root (network namespaces, /dev/net/tun)" >&2; exit 1; }

echo "== $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs, $(varnishd -V 2>&1 | head -1), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "== git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
echo
.venv/bin/python bench/netns_delay.py --check
echo
.venv/bin/python bench/sender_bench.py --httpx "$@"
echo
.venv/bin/python bench/crossdc_bench.py
if [ "${PROFILE:-0}" = 1 ]; then
  [ -x .venv/bin/py-spy ] || .venv/bin/python -m pip install -q --disable-pip-version-check py-spy
  echo
  .venv/bin/python bench/sender_bench.py --nodes 4 --repeats 1 --no-wrk --settings 64x2 --profile py-spy
fi
