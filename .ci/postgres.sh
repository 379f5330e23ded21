#!/usr/bin/env bash
# Starts a throw-away PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package) for the
# service's tests, and prints the URL they read from JAXDP_TEST_POSTGRES_URL.
#   source .ci/postgres.sh start   -> exports JAXDP_TEST_POSTGRES_URL, PGDATA_DIR
#   .ci/postgres.sh stop DIR       -> stops the cluster in DIR and removes it
set -euo pipefail
action=${1:-start}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
run_as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
if [ "$action" = stop ]; then
  dir=${2:?cluster directory}
  run_as_postgres "'$bin/pg_ctl' -D '$dir/data' -m immediate stop" >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi
dir=$(mktemp -d /tmp/jaxdp-pg.XXXXXX)
port=${JAXDP_PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
[ "$(id -u)" = 0 ] && chown postgres "$dir"
run_as_postgres "'$bin/initdb' -D '$dir/data' -A trust -U postgres --no-sync" >/dev/null
run_as_postgres "'$bin/pg_ctl' -D '$dir/data' -l '$dir/log' -w -o \"-h 127.0.0.1 -p $port -k '$dir' -c fsync=off\" start" >/dev/null
export PGDATA_DIR=$dir
export JAXDP_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
echo "$JAXDP_TEST_POSTGRES_URL"
