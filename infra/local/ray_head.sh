#!/usr/bin/env bash
# Start or stop a local Ray head bound to loopback only (for `ray job submit` on one machine).
#   infra/local/ray_head.sh start   # prints the RAY_ADDRESS to export
#   infra/local/ray_head.sh stop
set -euo pipefail
PORT="${RAY_HEAD_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
AGENT_PORT="${RAY_DASHBOARD_AGENT_PORT:-52365}"
export RAY_USAGE_STATS_ENABLED=0
# Without this Ray replaces --node-ip-address=127.0.0.1 by the machine's address; a single-node
# head then binds every service to loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Keep Ray's token authentication on; clients need RAY_AUTH_MODE=token and read ~/.ray/auth_token.
export RAY_AUTH_MODE=token
case "${1:-}" in
  start)
    ray get-auth-token --generate > /dev/null
    ray start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true --dashboard-agent-listen-port="$AGENT_PORT" \
      --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --disable-usage-stats
    echo "for ray job submit:  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT}"
    ;;
  stop)
    ray stop --force
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
