#!/usr/bin/env bash
# The yardstick: the relay benchmark through Debian's Postfix on this machine.
#
#   bash bench/postfix_bench.sh [relay_bench.py options, e.g. -n 10000 -c 20 --json]
#
# Installs postfix if missing (debconf "No configuration", so the system instance stays
# unconfigured and stopped), then runs a SEPARATE throwaway instance: its own
# config_directory, queue_directory and data_directory in a temporary directory, smtpd on
# 127.0.0.1:<free port>, mynetworks = 127.0.0.0/8, relayhost = [127.0.0.1]:<sink port>,
# no local delivery, no TLS, no chroot.  Everything else stays at Postfix's defaults:
# queue files are fsync'd before the 250, default_process_limit = 100,
# smtp_connection_cache_on_demand = yes, default_destination_concurrency_limit = 20.
# bench/relay_bench.py --target postfix starts the sink and the load and measures the
# master's process tree; the instance is stopped and removed on exit (KEEP=1 keeps it).
#
# Root is needed (apt-get, and postfix itself starts as root).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

if ! command -v postconf >/dev/null 2>&1; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null; then
        apt-get update -q >/dev/null  # a fresh machine has no package lists yet
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
    fi
fi

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

WORK=$(mktemp -d /tmp/postfix-bench.XXXXXX)
CONF=$WORK/etc
QUEUE=$WORK/spool
DATA=$WORK/data
mkdir -p "$CONF" "$QUEUE" "$DATA"
chmod 755 "$WORK"
chown postfix:postfix "$DATA"
PORT=$(free_port)
SINK_PORT=$(free_port)

cleanup() {
    if [ -f "$QUEUE/pid/master.pid" ]; then
        postfix -c "$CONF" stop >/dev/null 2>&1 || true
        for _ in $(seq 1 100); do  # up to 10 s for the master to go
            [ -f "$QUEUE/pid/master.pid" ] && kill -0 "$(tr -d ' ' < "$QUEUE/pid/master.pid")" \
                2>/dev/null || break
            sleep 0.1
        done
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

cat > "$CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $QUEUE
data_directory = $DATA
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:$SINK_PORT
# no local delivery
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
# no TLS on either side
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
maillog_file = $WORK/maillog
maillog_file_prefixes = $WORK
EOF

# Debian's master.cf services, chroot off (the queue is not a prepared chroot), smtpd on
# the benchmark port only.  Process limits "-" = default_process_limit (100).
cat > "$CONF/master.cf" <<EOF
127.0.0.1:$PORT inet n -  n - - smtpd
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
EOF

postfix -c "$CONF" check
postfix -c "$CONF" start >/dev/null 2>&1 || { cat "$WORK/maillog" >&2 || true; exit 1; }
MASTER=""
for _ in $(seq 1 100); do  # up to 10 s for the master and its listener
    if [ -f "$QUEUE/pid/master.pid" ] && "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1).close()" 2>/dev/null; then
        MASTER=$(tr -d ' ' < "$QUEUE/pid/master.pid")
        break
    fi
    sleep 0.1
done
[ -n "$MASTER" ] || { echo "postfix did not start" >&2; cat "$WORK/maillog" >&2 || true; exit 1; }

{
    echo "postfix $(postconf -c "$CONF" -h mail_version) on 127.0.0.1:$PORT (master pid $MASTER), sink port $SINK_PORT"
    echo "postconf -n:"
    postconf -c "$CONF" -n | sed 's/^/    /'
    echo "relevant defaults:"
    postconf -c "$CONF" default_process_limit smtpd_client_connection_count_limit \
        smtp_connection_cache_on_demand smtp_connection_cache_time_limit \
        default_destination_concurrency_limit smtp_destination_concurrency_limit \
        in_flow_delay qmgr_message_active_limit smtp_pix_workarounds | sed 's/^/    /'
} >&2

set +e
"$PYTHON" "$HERE/relay_bench.py" --target postfix --port "$PORT" --pid "$MASTER" \
    --sink-port "$SINK_PORT" "$@"
status=$?
set -e
if grep -Eq 'warning|fatal|panic' "$WORK/maillog"; then
    echo "maillog warnings:" >&2
    grep -E 'warning|fatal|panic' "$WORK/maillog" | sort | uniq -c | sort -rn | head -10 >&2
fi
exit $status
