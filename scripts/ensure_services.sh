#!/usr/bin/env bash
# Make sure the local services the tests and the benchmark use are answering:
#   PostgreSQL 127.0.0.1:5432 and Redis 127.0.0.1:6379 (required), RabbitMQ 127.0.0.1:5672 (optional).
# A service that is installed but stopped is started and waited for (bounded). Idempotent and
# quick when everything is already up. Prints one status line per service.
# Exits non-zero if PostgreSQL or Redis cannot be made to answer; RabbitMQ only warns.
set -uo pipefail

HOST=127.0.0.1
PG_PORT=${SAGAS_PG_PORT:-5432}
REDIS_PORT=${SAGAS_REDIS_PORT:-6379}
AMQP_PORT=${SAGAS_AMQP_PORT:-5672}
WAIT_SECONDS=${SAGAS_SERVICE_WAIT:-30}
failed=0

tcp_up() { timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1" >/dev/null 2>&1; }
pg_up() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1
  else
    tcp_up "$PG_PORT"
  fi
}
redis_up() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
  else
    tcp_up "$REDIS_PORT"
  fi
}
rabbit_up() { tcp_up "$AMQP_PORT"; }

# wait_for CHECK: poll every 0.5 s for at most WAIT_SECONDS.
wait_for() {
  local check=$1 deadline=$((SECONDS + WAIT_SECONDS))
  until "$check"; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}

start_postgres() {
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  local version
  for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  done
}

start_redis() {
  command -v redis-server >/dev/null 2>&1 || return 1
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
}

start_rabbit() {
  command -v rabbitmq-server >/dev/null 2>&1 || return 1
  rabbitmq-server -detached >/dev/null 2>&1
}

# ensure NAME PORT CHECK START REQUIRED
ensure() {
  local name=$1 port=$2 check=$3 start=$4 required=$5
  if "$check"; then
    echo "ensure_services: $name ($HOST:$port): up"
    return 0
  fi
  echo "ensure_services: $name ($HOST:$port): not answering, starting it ..."
  if "$start" && wait_for "$check"; then
    echo "ensure_services: $name ($HOST:$port): up (started)"
    return 0
  fi
  if [ "$required" = yes ]; then
    echo "ensure_services: ERROR: $name is not answering on $HOST:$port and could not be started" \
         "(within ${WAIT_SECONDS}s). Tests need it." >&2
    failed=1
  else
    echo "ensure_services: WARNING: $name is not answering on $HOST:$port; tests that need it will" \
         "skip locally and fail under CI." >&2
  fi
}

ensure PostgreSQL "$PG_PORT" pg_up start_postgres yes
ensure Redis "$REDIS_PORT" redis_up start_redis yes
ensure RabbitMQ "$AMQP_PORT" rabbit_up start_rabbit no

if [ "$failed" -ne 0 ]; then
  echo "ensure_services: required services are down; see the messages above." >&2
  exit 1
fi
exit 0
