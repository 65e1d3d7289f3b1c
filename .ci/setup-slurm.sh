#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/test_slurm.py.
#
# Installs Debian's slurmctld, slurmd, the client tools and munge; writes a minimal
# /etc/slurm/slurm.conf for one node named after `hostname -s` at 127.0.0.1 with at least
# 4 CPUs (more than this machine may have), loopback only (no cgroups,
# no accounting: this also works in containers and gVisor sandboxes); starts munged,
# slurmctld and slurmd without systemd; waits (bounded) until the node is idle.
# Idempotent: a second run leaves a healthy cluster as it is. Runs as root.
set -euo pipefail

NODE="$(hostname -s)"
# At least 4 CPUs declared, whatever the machine has (config_overrides below lets slurmd
# take the configured count): tests run `sbatch --ntasks=4` with more slots than cores.
CPUS="$(nproc)"
if ((CPUS < 4)); then CPUS=4; fi
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm

log() { echo "setup-slurm: $*" >&2; }

cluster_ok() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state="$(timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1)" || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]] || return 1
    # a cluster left by an older version of this script may declare fewer CPUs
    (( "$(timeout 10 sinfo -h -N -n "$NODE" -o '%c' 2>/dev/null | head -n1)" >= CPUS ))
}

if cluster_ok; then
    log "cluster already up (node $NODE)"
    exit 0
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v srun >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    log "installing slurm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# -- munge ---------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating a munge key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do
    if munge -n </dev/null | unmunge >/dev/null 2>&1; then break; fi
    sleep 0.2
done
munge -n </dev/null | unmunge >/dev/null

# -- slurm.conf ----------------------------------------------------------------------
install -d -m 0755 /etc/slurm "$LOG" /var/spool/slurmctld /var/spool/slurmd /run/slurm
cat >"$CONF.new" <<EOF
# Written by .ci/setup-slurm.sh: one node, loopback only, no cgroups, no accounting.
ClusterName=isdgrid-test
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
changed=1
if [[ -f "$CONF" ]] && cmp -s "$CONF" "$CONF.new"; then changed=0; fi
mv "$CONF.new" "$CONF"

# -- daemons -------------------------------------------------------------------------
if [[ "$changed" == 1 ]]; then
    for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            log "restarting $(basename "$pidfile" .pid) for the new configuration"
            kill "$(cat "$pidfile")"
            for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.2; done
        fi
    done
fi
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# -- wait until the node is idle -----------------------------------------------------
for i in $(seq 60); do
    if cluster_ok; then
        log "cluster up: $(sinfo -h -N -o '%N %T %c CPUs' | head -n1)"
        exit 0
    fi
    state="$(timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
    if [[ "$state" == down* || "$state" == drain* ]] && (( i > 5 )); then
        timeout 10 scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    fi
    sleep 1
done
log "the node did not become idle within 60 s; last logs:"
tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
sinfo -N -l >&2 || true
exit 1
