#!/usr/bin/env bash
# A team MLflow tracking server on this machine: PostgreSQL backend store + artifact folder,
# both listening on 127.0.0.1 only.
#
#   scripts/tracking_server.sh start    # install PostgreSQL if absent (root + apt), init, start both
#   scripts/tracking_server.sh status   # what is running, and the tracking URI
#   scripts/tracking_server.sh env      # print 'export MLFLOW_TRACKING_URI=...'
#   scripts/tracking_server.sh stop     # stop mlflow server and PostgreSQL (data is kept)
#
# Settings (environment variables):
#   BLINAPROFILE_TRACKING_DIR   state folder (default: $HOME/.blinaprofile/tracking). It holds
#                               pgdata/ (the PostgreSQL cluster), artifacts/ (the artifact
#                               destination), logs and pid files. Every folder above it must
#                               be enterable by the 'postgres' user when run as root.
#   BLINAPROFILE_TRACKING_PORT  port of mlflow server (default 5000)
#   BLINAPROFILE_PG_PORT        port of PostgreSQL (default 5433)
#   BLINAPROFILE_MLFLOW         mlflow executable (default: the project's .venv/bin/mlflow)
#
# Then point clients at it:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#   blinaprofile train ... ; blinaprofile compare ; blinaprofile promote NAME VERSION
#
# Security: both servers bind to 127.0.0.1; PostgreSQL accepts TCP logins only with the
# generated password (scram-sha-256), kept in <dir>/pgpass (mode 600) and passed to mlflow
# through PGPASSFILE, never on a command line. To share with a team on other machines, put
# an authenticating reverse proxy in front; do not bind these servers to a public address.
#
# Exit codes: 0 ok; 1 error; 3 PostgreSQL is not installed and cannot be installed here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${BLINAPROFILE_TRACKING_DIR:-$HOME/.blinaprofile/tracking}
PORT=${BLINAPROFILE_TRACKING_PORT:-5000}
PGPORT=${BLINAPROFILE_PG_PORT:-5433}
MLFLOW=${BLINAPROFILE_MLFLOW:-$ROOT/.venv/bin/mlflow}
HOST=127.0.0.1
DB=mlflow
DBUSER=mlflow

say() { echo "tracking_server: $*" >&2; }
die() { say "error: $*"; exit "${2:-1}"; }

is_root() { [ "$(id -u)" = 0 ]; }

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

ensure_postgres() {
  if [ -n "$(pg_bin)" ]; then return 0; fi
  if is_root && command -v apt-get >/dev/null 2>&1; then
    say "PostgreSQL not found; installing the Debian package 'postgresql'"
    apt-get update -qq >&2 || die "apt-get update failed" 3
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2 \
      || die "apt-get install postgresql failed" 3
    [ -n "$(pg_bin)" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb" 3
  else
    die "PostgreSQL not found under /usr/lib/postgresql and cannot be installed (needs root and apt-get)" 3
  fi
}

# run a PostgreSQL program as the cluster owner: 'postgres' when we are root (PostgreSQL
# refuses to run as root), else the current user
as_pg() {
  if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

PGDATA="$DIR/pgdata"
PGLOG="$DIR/postgres.log"
MLLOG="$DIR/mlflow.log"
MLPID="$DIR/mlflow.pid"
PGPASS="$DIR/pgpass"

pg_running() {
  local bin; bin=$(pg_bin) || return 1
  [ -f "$PGDATA/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

mlflow_running() {
  [ -f "$MLPID" ] && kill -0 "$(cat "$MLPID")" 2>/dev/null
}

psql_pg() {
  local bin; bin=$(pg_bin)
  as_pg "$bin/psql" -h "$PGDATA" -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tA "$@"
}

init_cluster() {
  local bin; bin=$(pg_bin)
  mkdir -p "$DIR" "$DIR/artifacts"
  chmod 755 "$DIR"
  if is_root; then
    runuser -u postgres -- test -x "$DIR" \
      || die "user 'postgres' cannot enter $DIR (a parent folder is private); set BLINAPROFILE_TRACKING_DIR elsewhere"
  fi
  if [ -f "$PGDATA/PG_VERSION" ]; then return 0; fi
  say "initialising a PostgreSQL cluster in $PGDATA"
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA"
  if is_root; then chown postgres:postgres "$PGDATA"; fi
  # local (socket) logins by OS user, TCP logins by password only
  as_pg "$bin/initdb" -D "$PGDATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  if [ ! -f "$PGPASS" ]; then
    local pw; pw=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    umask 077
    echo "$HOST:$PGPORT:$DB:$DBUSER:$pw" >"$PGPASS"
    chmod 600 "$PGPASS"
  fi
}

start_pg() {
  local bin; bin=$(pg_bin)
  if pg_running; then say "PostgreSQL already running ($PGDATA)"; return 0; fi
  touch "$PGLOG"
  if is_root; then chown postgres:postgres "$PGLOG"; fi
  as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PGLOG" -w -t 60 \
    -o "-c listen_addresses=$HOST -p $PGPORT -k $PGDATA" start >&2 \
    || { tail -n 20 "$PGLOG" >&2; die "PostgreSQL did not start"; }
  # role and database for mlflow (idempotent); the password comes from pgpass
  local pw; pw=$(cut -d: -f5 "$PGPASS")
  if [ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname = '$DBUSER'")" != 1 ]; then
    psql_pg -c "CREATE ROLE $DBUSER LOGIN PASSWORD '$pw'" >/dev/null
  fi
  if [ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_pg -c "CREATE DATABASE $DB OWNER $DBUSER" >/dev/null
  fi
  # keep the pgpass port in step with the port in use
  sed -i "s/^$HOST:[0-9]*:/$HOST:$PGPORT:/" "$PGPASS"
}

start_mlflow() {
  if mlflow_running; then say "mlflow server already running (pid $(cat "$MLPID"))"; return 0; fi
  [ -x "$MLFLOW" ] || MLFLOW=$(command -v mlflow || true)
  [ -n "$MLFLOW" ] || die "mlflow executable not found (run scripts/setup.sh or set BLINAPROFILE_MLFLOW)"
  # its own session, so 'stop' can end the server and its workers by one process-group id
  PGPASSFILE="$PGPASS" MLFLOW_DISABLE_TELEMETRY=true setsid "$MLFLOW" server \
    --backend-store-uri "postgresql://$DBUSER@$HOST:$PGPORT/$DB" \
    --artifacts-destination "$DIR/artifacts" \
    --serve-artifacts \
    --host "$HOST" --port "$PORT" --workers 1 \
    >"$MLLOG" 2>&1 < /dev/null &
  echo $! >"$MLPID"
  local py="$ROOT/.venv/bin/python"; [ -x "$py" ] || py=python3
  local i
  for i in $(seq 1 120); do
    if "$py" - "$HOST" "$PORT" <<'EOF' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=2).read()
EOF
    if ! mlflow_running; then tail -n 30 "$MLLOG" >&2; die "mlflow server exited"; fi
    sleep 1
  done
  [ "$i" -lt 120 ] || { tail -n 30 "$MLLOG" >&2; die "mlflow server not healthy after 120 s"; }
}

stop_all() {
  if mlflow_running; then
    local pid; pid=$(cat "$MLPID")
    say "stopping mlflow server (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$MLPID"
  if pg_running; then
    say "stopping PostgreSQL ($PGDATA)"
    as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w stop >&2 || true
  fi
}

status() {
  local ok=0
  if pg_running; then echo "postgresql  running  $HOST:$PGPORT  data $PGDATA"; else echo "postgresql  stopped"; ok=1; fi
  if mlflow_running; then echo "mlflow      running  http://$HOST:$PORT  (pid $(cat "$MLPID"), artifacts $DIR/artifacts)"; else echo "mlflow      stopped"; ok=1; fi
  return $ok
}

case "${1:-}" in
  start)
    ensure_postgres
    init_cluster
    start_pg
    start_mlflow
    say "ready: backend postgresql://$DBUSER@$HOST:$PGPORT/$DB, artifacts $DIR/artifacts"
    echo "MLFLOW_TRACKING_URI=http://$HOST:$PORT"
    ;;
  stop) stop_all ;;
  status) status ;;
  env) echo "export MLFLOW_TRACKING_URI=http://$HOST:$PORT" ;;
  *)
    sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 1
    ;;
esac
