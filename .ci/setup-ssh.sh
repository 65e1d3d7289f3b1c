#!/usr/bin/env bash
# Start a dedicated OpenSSH server on loopback for the ssh launcher tests (tests/test_ssh.py).
#
# Idempotent (a running server is reused only if the pid file names an sshd started with
# this folder's config and it listens on the port file's port); runs as root on a fresh
# Debian. Everything lives in one folder
# ($ISDGRID_SSHD_DIR, default /tmp/isdgrid-sshd): a host key, a client key the tests log
# in with, sshd_config, the port (file `port`) and the pid file (`sshd.pid`). The server
# listens on 127.0.0.1 only, on the first free port from 2222 up, and accepts only the
# client key (root login by key). Stop it with: kill "$(cat /tmp/isdgrid-sshd/sshd.pid)".
set -euo pipefail

DIR="${ISDGRID_SSHD_DIR:-/tmp/isdgrid-sshd}"

if ! command -v /usr/sbin/sshd >/dev/null 2>&1 || ! command -v ssh >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openssh-server openssh-client >/dev/null
fi

ours() {  # ours PID: PID is an sshd started with this folder's sshd_config
    local cmdline
    [[ "$1" =~ ^[0-9]+$ ]] || return 1
    # sshd may rewrite its title into one string ("sshd: /usr/sbin/sshd -f ... [listener]")
    cmdline="$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *sshd*" -f $DIR/sshd_config "* ]]
}

# Reuse a running server only if the pid file names our own sshd and it listens on the
# port of the port file: a pid file can outlive its server, and the pid go to another process.
pid="$(cat "$DIR/sshd.pid" 2>/dev/null || true)"
port="$(cat "$DIR/port" 2>/dev/null || true)"
if ours "$pid"; then
    if [[ "$port" =~ ^[0-9]+$ ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "setup-ssh: sshd already running (pid $pid, port $port)"
        exit 0
    fi
    echo "setup-ssh: stopping our sshd (pid $pid), which does not listen on the port file's port ('$port')"
    kill "$pid" 2>/dev/null || true
elif [ -n "$pid" ]; then
    echo "setup-ssh: $DIR/sshd.pid names pid $pid, which is not our sshd; starting one"
fi

mkdir -p "$DIR" /run/sshd
chmod 700 "$DIR"
[ -f "$DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/host_ed25519"
[ -f "$DIR/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/client_ed25519"
cp "$DIR/client_ed25519.pub" "$DIR/authorized_keys"
chmod 600 "$DIR/authorized_keys"

port=2222
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    port=$((port + 1))
done
echo "$port" > "$DIR/port"

cat > "$DIR/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
X11Forwarding no
PrintMotd no
MaxStartups 50:30:100
MaxSessions 50
LogLevel INFO
CONF

rm -f "$DIR/sshd.pid"
/usr/sbin/sshd -f "$DIR/sshd_config" -E "$DIR/sshd.log"
for _ in $(seq 50); do
    [ -s "$DIR/sshd.pid" ] && break
    sleep 0.1
done
[ -s "$DIR/sshd.pid" ] || { echo "setup-ssh: sshd did not start; see $DIR/sshd.log" >&2; exit 1; }
echo "setup-ssh: sshd pid $(cat "$DIR/sshd.pid") on 127.0.0.1:$port (folder $DIR)"
