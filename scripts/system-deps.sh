#!/usr/bin/env bash
# System packages some tests need, installed from Debian's packages when missing (a no-op when present):
#   postgresql                      a real PostgreSQL server (test_postgres.py)
#   chromium                        headless browser (test_ui_browser.py)
#   docker.io, busybox-static       a real Docker engine and the test image's root file system
#   docker-compose                  `docker-compose config` of deploy/docker-compose.yaml
#   slurm-wlm, munge                a real one-node Slurm cluster
#   slurmdbd, mariadb-server        Slurm accounting (sacct) for that cluster
# The tests start and stop these engines themselves (neuroflow_dagster_tests/engines/); nothing is
# started or enabled here. A test whose engine cannot start fails.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
have chromium || need+=(chromium)
have dockerd || need+=(docker.io)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)
have docker-compose || need+=(docker-compose)
have slurmctld || need+=(slurm-wlm)
have munged || need+=(munge)
have slurmdbd || need+=(slurmdbd)
have mariadbd || need+=(mariadb-server)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    # Debian's maintainer scripts must not start the services: the tests start private instances.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && trap 'rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
      || echo "warning: could not install ${need[*]}; the tests that need them will fail and say why"
  else
    echo "note: ${need[*]} not installed (needs root and apt-get); the tests that need them will fail and say why"
  fi
fi
