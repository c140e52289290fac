#!/bin/sh
# What the official postgres image's entrypoint does for docker-compose.yml: on an empty PGDATA, initdb with
# POSTGRES_USER and POSTGRES_PASSWORD (scram-sha-256 over TCP from anywhere), create POSTGRES_DB, run the
# *.sql and *.sh files of /docker-entrypoint-initdb.d on a server that listens on its Unix socket only, stop
# it; then run the server (as the postgres user) on every interface.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"

if [ "${1:-}" != postgres ]; then
    exec "$@"
fi
shift
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"

    socket=$(mktemp -d)
    pg_ctl --pgdata="$PGDATA" --wait --silent \
        -o "-c listen_addresses='' -c unix_socket_directories=$socket" start
    export PGHOST="$socket" PGUSER="$POSTGRES_USER"
    if [ "$POSTGRES_DB" != postgres ]; then
        psql --dbname=postgres --set=ON_ERROR_STOP=1 --quiet \
            --command="CREATE DATABASE \"$POSTGRES_DB\""
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case $script in
            *.sql) echo "postgres-entrypoint: running $script"
                   psql --dbname="$POSTGRES_DB" --set=ON_ERROR_STOP=1 --quiet --file="$script" ;;
            *.sh) echo "postgres-entrypoint: running $script"
                  . "$script" ;;
        esac
    done
    pg_ctl --pgdata="$PGDATA" --wait --silent --mode=fast stop
    unset PGHOST PGUSER
    rm -rf "$socket"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
