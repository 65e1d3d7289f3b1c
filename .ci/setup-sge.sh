#!/usr/bin/env bash
# A real single-node Grid Engine (Debian's Son of Grid Engine 8.1.9) on this machine, for
# tests/test_sge.py.
#
# Installs gridengine-master, -exec and -client with debconf preseeded (cell "default",
# this host as master); makes the host name an alias of "localhost" in Grid Engine's own
# host_aliases (the name resolves to 127.0.0.1, which resolves back to "localhost", and
# qmaster refuses clients whose name and address disagree); starts sge_qmaster, loads the
# configuration from files (root may run jobs, a one-second scheduler, execd reporting every
# 2 s instead of 40 (the kill of a job whose task failed waits for it), this host as submit
# and execution host, the parallel environment "$PE" for tight integration with
# `qrsh -inherit`, the queue "$QUEUE" with $SLOTS slots and no load thresholds), starts
# sge_execd, and waits (bounded) until the queue takes jobs. Jobs left over from an
# earlier run are deleted. Without systemd; idempotent (a second run leaves a healthy
# cluster as it is). Runs as root. On failure it prints the daemons' last log lines.
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
NODE="$(hostname)"
PE="${SGE_PE:-smp}"
QUEUE="${SGE_QUEUE:-all.q}"
SLOTS="${SGE_SLOTS:-4}"
# How often execd reports to qmaster (default 40 s). When a tightly integrated task fails,
# qmaster kills the whole job, but execd only learns of it at its next report. 5 s: the job's
# driver must see the lost host and say so before that kill (on a machine loaded 30-60 it
# once did not within 2 s), and a test waits for the kill no longer than a minute.
REPORT=00:00:05
COMMON="$SGE_ROOT/$SGE_CELL/common"
SPOOL=/var/spool/gridengine
WORK="$(mktemp -d /tmp/setup-sge.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

log() { echo "setup-sge: $*" >&2; }

fail() {
    log "$*; last logs:"
    tail -n 15 "$SPOOL/qmaster/messages" "$SPOOL"/execd/*/messages >&2 2>/dev/null || true
    timeout 10 qstat -f >&2 2>/dev/null || true
    exit 1
}

daemon_pid() {  # daemon_pid NAME: the pid of the live (not zombie) process named NAME
    local pid
    for pid in $(pgrep -x "$1"); do
        if [[ -r "/proc/$pid/stat" && "$(cut -d' ' -f3 "/proc/$pid/stat")" != Z ]]; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# execd runs and has written its pid file (in a spool folder named as it resolves its own
# host: localhost here)
execd_registered() {
    local pid
    pid="$(daemon_pid sge_execd)" && grep -qx "$pid" "$SPOOL"/execd/*/execd.pid 2>/dev/null
}

q() {  # q CMD...: run a Grid Engine command quietly; its output is shown if it fails
    local out
    out="$("$@" 2>&1)" || fail "$* failed: $out"
}

wait_for() {  # wait_for SECONDS WHAT CMD...: run CMD every 0.2 s until it succeeds
    local seconds=$1 what=$2
    shift 2
    local end=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then fail "$what not within ${seconds}s"; fi
        sleep 0.2
    done
}

queue_ok() {  # the queue instance on this host exists and has no state (u, E, d, a...)
    local line
    line="$(timeout 10 qstat -f -q "$QUEUE@$NODE" 2>/dev/null | grep "^$QUEUE@")" || return 1
    [[ "$(awk '{print NF}' <<<"$line")" == 5 ]]   # queuename qtype used/tot load arch [states]
}

global_ok() {  # global_ok <CONFIG: root may run jobs, execd reports every $REPORT
    local conf
    conf="$(cat)"
    grep -Eq '^min_uid +0$' <<<"$conf" && grep -Eq '^min_gid +0$' <<<"$conf" \
        && grep -Eq "^load_report_time +$REPORT\$" <<<"$conf"
}

cluster_ok() {
    command -v qsub >/dev/null 2>&1 && daemon_pid sge_qmaster >/dev/null && execd_registered || return 1
    timeout 10 qconf -sconf 2>/dev/null | global_ok || return 1
    timeout 10 qconf -sp "$PE" 2>/dev/null | grep -Eq '^control_slaves +TRUE$' || return 1
    timeout 10 qconf -sq "$QUEUE" 2>/dev/null | grep -Eq "^pe_list +.*\\b$PE\\b" || return 1
    queue_ok
}

delete_leftover_jobs() {
    if [[ -n "$(timeout 10 qstat -u '*' 2>/dev/null)" ]]; then
        log "deleting leftover jobs"
        timeout 20 qdel -f -u '*' >/dev/null 2>&1 || true
        wait_for 30 "leftover jobs gone" bash -c '[[ -z "$(qstat -u "*" 2>/dev/null)" ]]'
    fi
}

stop_daemon() {  # stop_daemon NAME: SIGTERM, then wait (qmaster takes about 10 s)
    local pid
    pid="$(daemon_pid "$1")" || return 0
    log "stopping $1 ($pid)"
    kill "$pid"
    for _ in $(seq 150); do daemon_pid "$1" >/dev/null || return 0; sleep 0.2; done
    log "$1 did not stop within 30 s: killing it"
    kill -9 "$pid" 2>/dev/null || true
}

if cluster_ok; then
    delete_leftover_jobs
    log "cluster already up (queue $QUEUE@$NODE, parallel environment $PE)"
    exit 0
fi

# -- install -------------------------------------------------------------------------
if ! command -v qsub >/dev/null 2>&1 || [[ ! -x /usr/sbin/sge_qmaster || ! -x /usr/sbin/sge_execd ]]; then
    log "installing gridengine"
    debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string $SGE_CELL
gridengine-common shared/gridenginemaster string $NODE
EOF
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends gridengine-master gridengine-exec gridengine-client >/dev/null
fi
[[ -s "$COMMON/bootstrap" ]] || fail "no $COMMON/bootstrap: the gridengine-master package did not set up the cell"

# -- host name: an alias of "localhost" ----------------------------------------------
if [[ "$NODE" != localhost ]] && ! grep -Eqs "^$NODE +localhost$" "$COMMON/host_aliases"; then
    log "writing $COMMON/host_aliases ($NODE localhost)"
    echo "$NODE localhost" >"$COMMON/host_aliases"
    stop_daemon sge_execd
    stop_daemon sge_qmaster
fi

# -- qmaster -------------------------------------------------------------------------
if ! daemon_pid sge_qmaster >/dev/null; then
    log "starting sge_qmaster"
    /usr/sbin/sge_qmaster
fi
wait_for 30 "qmaster answering" timeout 5 qconf -sh

# -- configuration, loaded from files ------------------------------------------------
config_changed=0
qconf -sconf | grep -v '^#' >"$WORK/global"   # -Mconf takes the configuration's name from the file's
if ! global_ok <"$WORK/global"; then
    log "global configuration: min_uid 0, min_gid 0 (root's jobs), load_report_time $REPORT"
    sed -i -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
        -e "s/^load_report_time .*/load_report_time $REPORT/" "$WORK/global"
    q qconf -Mconf "$WORK/global"
    config_changed=1
fi
qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' \
    -e 's/^job_load_adjustments .*/job_load_adjustments NONE/' \
    -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time 0:0:0/' >"$WORK/sched"
q qconf -Msconf "$WORK/sched"
qconf -ss 2>/dev/null | grep -qx "$NODE" || q qconf -as "$NODE"
if ! qconf -sel 2>/dev/null | grep -qx "$NODE"; then
    cat >"$WORK/$NODE" <<EOF
hostname              $NODE
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
    q qconf -Ae "$WORK/$NODE"
fi
cat >"$WORK/pe" <<EOF
pe_name            $PE
slots              999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$pe_slots
control_slaves     TRUE
job_is_first_task  FALSE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
if qconf -sp "$PE" >/dev/null 2>&1; then q qconf -Mp "$WORK/pe"; else q qconf -Ap "$WORK/pe"; fi
cat >"$WORK/queue" <<EOF
qname                 $QUEUE
hostlist              $NODE
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               $PE
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
if qconf -sq "$QUEUE" >/dev/null 2>&1; then q qconf -Mq "$WORK/queue"; else q qconf -Aq "$WORK/queue"; fi

# -- execd (it reads the global configuration when it starts) -------------------------
if [[ "$config_changed" == 1 ]]; then stop_daemon sge_execd; fi
if ! daemon_pid sge_execd >/dev/null; then
    log "starting sge_execd"
    /usr/sbin/sge_execd
fi
wait_for 30 "execd registered with qmaster" execd_registered
timeout 10 qmod -c "$QUEUE" >/dev/null 2>&1 || true   # clear an error state left by a refused job
timeout 10 qmod -e "$QUEUE" >/dev/null 2>&1 || true
wait_for 30 "queue $QUEUE@$NODE taking jobs" queue_ok
delete_leftover_jobs
cluster_ok || fail "the cluster is up but not configured as expected"
log "cluster up: queue $QUEUE@$NODE with $SLOTS slots, parallel environment $PE"
