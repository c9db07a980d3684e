#!/usr/bin/env bash
# A local Slurm cluster for the Slurm tests: munged, slurmctld and two slurmd (node1, node2) on this host.
#   tests/slurm/cluster.sh start   install Debian's slurm-wlm and munge if missing, write the config, start
#   tests/slurm/cluster.sh stop    stop exactly the daemons `start` recorded, and the jobs they ran
# Root only (it writes /etc/slurm and starts daemons). Process tracking is proctrack/cgroup where this host lets
# us create cgroups (production clusters run it), else proctrack/linuxproc; SLURM_TEST_PROCTRACK picks one. Facts it relies on: two slurmd on one host need
# NodeAddr=127.0.0.1, a Port each, NodeHostname = this host's name and `slurmd -N <node>`.
set -euo pipefail
STATE=${SLURM_TEST_STATE:-/tmp/difftune-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname)

start() {
    stop  # a cluster this script started before (another test run) goes first: one slurmctld per config
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge \
            || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; }; } \
            >"$STATE.apt.log" 2>&1 || { echo "apt-get install slurm-wlm munge failed: see $STATE.apt.log" >&2; exit 1; }
    fi
    mkdir -p "$STATE" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    local proctrack=${SLURM_TEST_PROCTRACK:-}
    if [ -z "$proctrack" ]; then  # cgroup as production clusters run it, where this host lets us make cgroups
        proctrack=proctrack/linuxproc
        if mkdir /sys/fs/cgroup/freezer/difftune_probe 2>/dev/null; then
            rmdir /sys/fs/cgroup/freezer/difftune_probe
            proctrack=proctrack/cgroup
        fi
    fi
    # cgroup v1 (freezer and friends mounted one per controller, as in this CI's containers); v2 elsewhere
    [ -d /sys/fs/cgroup/freezer ] && plugin=cgroup/v1 || plugin=autodetect
    printf 'CgroupPlugin=%s\nCgroupAutomount=yes\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' \
        "$plugin" >/etc/slurm/cgroup.conf
    cat >"$CONF" <<CONF
ClusterName=difftune
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=$proctrack
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# a requeued job starts seconds after its hold ends, not at the next minute's scheduling pass
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmctldPort=6817
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
JobRequeue=1
MinJobAge=600
NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=17001 CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=17002 CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    grep -qw node1 /etc/hosts || echo "127.0.0.1 node1 node2" >>/etc/hosts  # node 0's name is the rendezvous
    chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then  # (a munged the package started is left to the system)
        runuser -u munge -- munged --force  # --force: past a socket or lock a killed munged left behind
        cp /run/munge/munged.pid "$STATE/munged.pid"
    fi
    slurmctld
    slurmd -N node1
    slurmd -N node2
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o %T -t idle 2>/dev/null | wc -l)" -ge 1 ] && [ "$(sinfo -h -N -o %T | grep -c idle)" -eq 2 ]; then
            echo "slurm: node1 node2 idle ($proctrack)"; return 0
        fi
        sleep 1
    done
    echo "slurm nodes did not come up:" >&2; sinfo -N >&2 || true; stop; exit 1
}

stop() {
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        scancel --full --user=root 2>/dev/null || true  # jobs first, so no trainer outlives its daemons
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
    fi
    for file in "$STATE"/slurmd-node*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        [ -f "$file" ] || continue
        pid=$(cat "$file")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true  # one that would not stop in 10 s
        rm -f "$file"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
