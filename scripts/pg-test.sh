#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests of several nodes.
#
#   scripts/pg-test.sh start DIR PORT   initdb into DIR unless it holds a
#                                        cluster already (as the postgres user
#                                        when run as root), start it on
#                                        127.0.0.1:PORT, print its URL
#   scripts/pg-test.sh stop DIR         stop it
#
# The cluster trusts local connections: it is for tests only, on loopback.
# PG_TEST_OPTIONS adds server settings ("-c ssl=on -c ssl_cert_file=...").
set -euo pipefail

bindir() {
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return
    fi
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    echo "pg-test: PostgreSQL's server programs (initdb, pg_ctl) are not installed;" \
         "on Debian: apt-get install postgresql" >&2
    exit 1
}

# Runs a PostgreSQL program as the postgres user when we are root (initdb
# refuses root), as ourselves otherwise.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

cmd=${1:-}
dir=${2:-}
[ -n "$dir" ] || { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }
bin=$(bindir)
case "$cmd" in
start)
    port=${3:?usage: $0 start DIR PORT}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 >"$dir/initdb.log" 2>&1 ||
            { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c fsync=off ${PG_TEST_OPTIONS:-}" \
        start >/dev/null ||
        { cat "$dir/server.log" >&2; exit 1; }
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
