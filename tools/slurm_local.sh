#!/usr/bin/env bash
# A real single-node Slurm on localhost (munge + slurmctld + slurmd from Debian's packages, no systemd): what CI and
# users without a cluster submit llmhpc's Slurm jobs to. Run as root.
#
#   bash tools/slurm_local.sh [start|stop|status]     (default: start; a running cluster is left as it is)
#
# start: installs the packages if missing, writes /etc/slurm/slurm.conf for this machine (all its CPUs and most of
# its memory as node "localhost" in partition "debug"), starts munged as the munge user, then slurmctld and slurmd,
# and waits until the node is idle. The settings that matter for llmhpc's tests are marked below: requeue allowed,
# a fast scheduler and short credential expiry, so that a job requeued after USR1 restarts within ~20 s.
# Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log. Exit status: 0 up, 3 the packages could not be
# installed, 1 anything else.
set -euo pipefail

ACTION="${1:-start}"
CONF=/etc/slurm/slurm.conf

running() { sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; }

daemons_left() { pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null; }

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    for _ in $(seq 40); do  # until they are gone, so that a start right after does not find them
        daemons_left || return 0
        sleep 0.5
    done
    echo "slurm: daemons still running after 20 s:$(for d in slurmd slurmctld munged; do pgrep -x "$d" >/dev/null \
        && printf ' %s' "$d"; done)" >&2
    return 1
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client \
            munge >/dev/null; }; then
        echo "slurm: could not install slurmctld, slurmd, slurm-client and munge with apt-get" >&2
        exit 3  # the machine cannot have Slurm (callers may skip); every other failure is 1
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || setpriv --reuid=munge --regid=munge --init-groups munged
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat > "$CONF" <<EOF
# Written by llmhpc's tools/slurm_local.sh: one node, this machine.
ClusterName=llmhpc-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# --- what llmhpc's requeue tests rely on ----------------------------------------------------------------------
JobRequeue=1
# a requeued job may start again as soon as its credential expires (default 120 s) ...
AuthInfo=cred_expire=10
# ... and the scheduler looks every second
SchedulerParameters=bf_interval=1,sched_interval=1
# ---------------------------------------------------------------------------------------------------------------
# no cgroups in a container: track a job's processes by process group; no task binding
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
    if running; then
        echo "slurm: already running ($(sinfo -h -o '%P %D %T' | head -1))"
        return
    fi
    install_packages
    start_munge
    write_conf
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if running; then
            echo "slurm: up ($(sinfo -h -o '%P %D %T %c CPUs' | head -1))"
            return
        fi
        sleep 0.5
    done
    echo "slurm: the node did not become idle within 30 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
    scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
    running || exit 1
}

case "$ACTION" in
    start) start ;;
    stop) stop; echo "slurm: stopped" ;;
    status) if running; then sinfo; else echo "slurm: not running"; exit 1; fi ;;
    *) echo "usage: bash tools/slurm_local.sh [start|stop|status]" >&2; exit 2 ;;
esac
