#!/usr/bin/env bash
# `make demo`: build the lab, run the gateway on deploy/examples/lab.toml, and show what the
# internet host sees from each scenario's backend. Everything is removed again on exit
# (also on failure or Ctrl-C) unless LAB_KEEP=1 and the demo succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
SNATGW="$VENV/bin/snatgw"
PREFIX=snatgw
BE="$PREFIX-be"
GW="$PREFIX-gw"
CONFIG=build/lab.toml  # a copy of deploy/examples/lab.toml, free to edit and reload
SERVER=198.51.100.2
LOGDIR=build
LOG="$LOGDIR/demo-gateway.log"
GW_PID=""
KEEP=${LAB_KEEP:-0}

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, iptables); try: sudo make demo" >&2
  exit 1
fi
for f in "$SNATGW"; do
  [ -x "$f" ] || { echo "demo: $f missing; run make setup" >&2; exit 1; }
done

stop_gateway() {
  # Only the gateway this script started, by its pid.
  [ -n "$GW_PID" ] || return 0
  if kill -0 "$GW_PID" 2>/dev/null; then
    kill -TERM "$GW_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$GW_PID" 2>/dev/null; then
      echo "demo: gateway $GW_PID ignored SIGTERM for 10 s, killing it" >&2
      kill -KILL "$GW_PID" 2>/dev/null || true
    fi
  fi
  local rc=0
  wait "$GW_PID" 2>/dev/null || rc=$?
  GW_PID=""
  return "$rc"
}

cleanup() {
  local rc=$?
  if [ "$KEEP" = 1 ] && [ "$rc" -eq 0 ]; then
    return 0
  fi
  stop_gateway || true
  "$SNATGW" lab down --prefix "$PREFIX" >/dev/null || echo "demo: lab down failed; run: make lab-down" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== lab up ($PREFIX)"
"$SNATGW" lab up --prefix "$PREFIX" | sed -n '1,9p'

echo
echo "== gateway: ip netns exec $GW $SNATGW run --config $CONFIG (log: $LOG)"
mkdir -p "$LOGDIR"
cp deploy/examples/lab.toml "$CONFIG"
: >"$LOG"
ip netns exec "$GW" "$SNATGW" run --config "$CONFIG" </dev/null >/dev/null 2>"$LOG" &
GW_PID=$!
ready=0
for _ in $(seq 150); do  # 15 s
  if grep -Eq '"event": ?"gateway_ready"' "$LOG"; then ready=1; break; fi
  kill -0 "$GW_PID" 2>/dev/null || break
  sleep 0.1
done
if [ "$ready" -ne 1 ]; then
  echo "demo: the gateway did not become ready; its log:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi
echo "gateway ready (pid $GW_PID)"

echo
echo "== what the internet host ($SERVER, whoami) saw"
printf '%-11s %-40s %s\n' "backend" "scenario" "seen as (ip:port)"
printf '%-11s %-40s %s\n' "-------" "--------" "-----------------"
failed=0
while IFS='|' read -r backend scenario; do
  if seen=$(ip netns exec "$BE" curl -sS --max-time 5 --interface "$backend" "http://$SERVER/" 2>&1); then
    :
  else
    seen="FAILED: $seen"
    failed=1
  fi
  printf '%-11s %-40s %s\n' "$backend" "$scenario" "$seen"
done <<'EOF'
10.10.1.1|2: pool web -> frontend 198.51.100.10
10.10.2.1|1: instance IP 198.51.100.20
10.10.3.1|3: default SNAT 198.51.100.30/.31
EOF

echo
echo "== nslookup myip.opendns.com $SERVER from each backend (the article's way; the lab's DNS"
echo "   answers with the address the query came from; nslookup runs as the backend's uid,"
echo "   which the lab routes from that backend address)"
printf '%-11s %-40s %s\n' "backend" "scenario" "myip.opendns.com"
printf '%-11s %-40s %s\n' "-------" "--------" "----------------"
# The backends above, plus each classic role instance the config names that is a lab backend.
"$VENV/bin/python" - "$CONFIG" >build/demo-myip.txt <<'PY'
import sys, tomllib
from gateway.lab import layout
print("10.10.1.1|2: pool web -> frontend 198.51.100.10")
print("10.10.2.1|1: instance IP 198.51.100.20")
print("10.10.3.1|3: default SNAT 198.51.100.30/.31")
with open(sys.argv[1], "rb") as fh:
    cfg = tomllib.load(fh)
routed = layout.backend_addresses()[: layout.ROUTED_BACKENDS]
for svc in cfg.get("cloud_services", []):
    for role in svc.get("roles", []):
        how = f"VIP {svc['vip']}" if role.get("endpoints") else "default SNAT"
        for addr in role.get("instances", [])[:1]:
            if addr in routed:
                print(f"{addr}|classic {role['kind']} {svc['name']}/{role['name']} -> {how}")
PY
while IFS='|' read -r backend scenario; do
  uid=$("$VENV/bin/python" -c "from gateway.lab.layout import backend_uid; print(backend_uid('$backend'))")
  if out=$(ip netns exec "$BE" setpriv --reuid="$uid" --regid="$uid" --clear-groups \
           nslookup -timeout=3 -retry=1 myip.opendns.com "$SERVER" 2>&1); then
    seen=$(printf '%s\n' "$out" | awk '/^Name:/ {n = 1} n && /^Address/ {print $2}')
  else
    seen="FAILED: $(printf '%s' "$out" | tr '\n' ' ')"
    failed=1
  fi
  printf '%-11s %-40s %s\n' "$backend" "$scenario" "$seen"
done <build/demo-myip.txt

echo
echo "== ping $SERVER from 10.10.3.1"
if ! ip netns exec "$BE" ping -n -c 2 -W 2 -I 10.10.3.1 "$SERVER" | tail -n 2; then
  failed=1
fi

if [ "$failed" -ne 0 ]; then
  echo "demo: some traffic did not get through; gateway log: $LOG" >&2
  exit 1
fi

echo
echo "== the operator's view: $SNATGW flows, then $SNATGW ports"
"$SNATGW" flows
echo
"$SNATGW" ports

if [ "$KEEP" = 1 ]; then
  cat <<EOF

== LAB_KEEP=1: the lab and the gateway (pid $GW_PID) keep running
  curl:     ip netns exec $BE curl --interface 10.10.1.2 http://$SERVER/
  udp:      ip netns exec $BE sh -c 'echo hi | nc -u -w 1 -s 10.10.3.2 $SERVER 5000'
  ping:     ip netns exec $BE ping -c 3 -I 10.10.2.1 $SERVER
  myip:     ip netns exec $BE setpriv --reuid=64003 --regid=64003 --clear-groups nslookup myip.opendns.com $SERVER
            (uid 64000+i leaves from the i-th backend: 64000 10.10.1.1 .. 64003 10.10.2.1 .. 64005 10.10.3.2)
  netstat:  ip netns exec $BE ss -tunap        (the backend's view of its flows)
  capture:  ip netns exec $GW tcpdump -n -i out0
  operator: $SNATGW flows | ports | stats | status   (add --json for scripts)
  reload:   edit $CONFIG (e.g. more pool members), then $SNATGW reload
  far side: tail -f /run/snatgw-lab/$PREFIX/whoami.log
  gateway log: $LOG
  stop:     kill $GW_PID && tail --pid=$GW_PID -f /dev/null && make lab-down
EOF
  exit 0
fi

echo
echo "== stopping the gateway (SIGTERM to pid $GW_PID)"
rc=0
stop_gateway || rc=$?
echo "gateway exit code: $rc"
grep -E '"event": ?"gateway_stopped"' "$LOG" | tail -n 1 || true
if [ "$rc" -ne 0 ]; then
  exit 1
fi
