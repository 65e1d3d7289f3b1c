#!/usr/bin/env bash
# Start a dedicated OpenSSH server on loopback for the ssh launcher tests (tests/test_ssh.py).
#
# Idempotent; runs as root on a fresh Debian. Everything lives in one folder
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

if [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; then
    echo "setup-ssh: sshd already running (pid $(cat "$DIR/sshd.pid"), port $(cat "$DIR/port"))"
    exit 0
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
