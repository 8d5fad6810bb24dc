#!/usr/bin/env bash
# A real Slurm "cluster" on one machine: two emulated nodes n1 and n2, for integration tests and for
# trying the slurm/ scripts before using a real cluster.
#
#   scripts/local_slurm.sh start    install (apt) if needed, configure, start; waits until n1/n2 are idle
#   scripts/local_slurm.sh stop     stop the daemons this script started (by their pid files)
#   scripts/local_slurm.sh status   exit 0 when controller and both nodes answer and are usable
#   scripts/local_slurm.sh install  only install the system packages (Slurm, munge, PMIx, Open MPI, git-lfs), as root
#
# Exit codes: 0 ok, 1 failed, 2 usage, 3 (status) not running, 4 this machine cannot host it (not root,
# packages cannot be installed, no UTS namespaces).
#
# Idempotent; needs root; no systemd (daemons are started by hand). Debian/Ubuntu packages:
# slurm-wlm munge libpmix-dev (not just libpmix2, else `srun --mpi=pmix` fails) openmpi-bin.
#
# Traps handled here (see docs/platform-notes.md of the shared workspace):
# - no cgroups/systemd: SlurmUser=root, proctrack/linuxproc, task/none, no accounting (use
#   `sbatch --wait` and `scontrol show job`, kept for MinJobAge=3600 s);
# - two slurmd on one host (Debian builds MULTIPLE_SLURMD): one port and spool dir per node, each
#   slurmd in its own UTS namespace with hostname n1/n2 (Open MPI shared memory crashes otherwise),
#   n1/n2 in /etc/hosts so they resolve as MASTER_ADDR;
# - `scontrol requeue` restarts a job only after the credential expires: cred_expire=10 s;
# - CPUs per node are declared (L2E_SLURM_CPUS, default 4) and trusted (config_overrides) so a
#   2-core machine can host 2 tasks per node; a job asking for more never starts, so wrap
#   `sbatch --wait` in `timeout`;
# - JobRequeue=0 like many production clusters: only jobs submitted with --requeue are requeued.
#
# Environment: L2E_SLURM_DIR (state, logs, spool; default /tmp/l2e-slurm), L2E_SLURM_CPUS. To apply a
# changed setting to a running cluster: stop, then start.
set -euo pipefail

STATE_DIR=${L2E_SLURM_DIR:-/tmp/l2e-slurm}
CPUS_PER_NODE=${L2E_SLURM_CPUS:-4}
NODES=(n1 n2)
CONF=/etc/slurm/slurm.conf
MARKER="# written by l2e-dist scripts/local_slurm.sh"
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$STATE_DIR/slurmctld.pid

die() { echo "local_slurm: $*" >&2; exit 1; }
# Exit code 4: this machine cannot host the local cluster at all (tests skip on it; other failures fail).
cannot() { echo "local_slurm: $*" >&2; exit 4; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v mpirun >/dev/null || missing+=(openmpi-bin)
    dpkg -s libpmix-dev >/dev/null 2>&1 || missing+=(libpmix-dev)
    command -v unshare >/dev/null || missing+=(util-linux)
    git lfs version >/dev/null 2>&1 || missing+=(git-lfs)  # l2e-convert --git (tests/test_publish_git.py)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || cannot "cannot install ${missing[*]}: run as root (or install them yourself)"
    command -v apt-get >/dev/null || cannot "cannot install ${missing[*]}: no apt-get (Debian/Ubuntu needed)"
    echo "local_slurm: installing ${missing[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }; then
        cannot "apt-get could not install ${missing[*]}"
    fi
}

write_config() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    mkdir -p /etc/slurm "$STATE_DIR/ctld"
    local host tmp
    host=$(hostname)
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat >"$tmp" <<EOF
$MARKER
ClusterName=l2elocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
JobRequeue=0
KillWait=10
InactiveLimit=0
SchedulerType=sched/backfill
NodeName=n[1-2] NodeHostName=$host NodeAddr=127.0.0.1 Port=[6818-6819] CPUs=$CPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$tmp"
    mv -f "$tmp" "$CONF"
}

add_hosts_entries() {
    local node
    for node in "${NODES[@]}"; do
        # /etc/hosts is often a bind mount in containers: append, never replace the file.
        grep -qE "^[^#]*[[:space:]]$node([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts
    done
}

start_munge() {
    pid_alive "$MUNGE_PID" && return 0
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged
}

start_slurm() {
    mkdir -p "$STATE_DIR"
    if ! pid_alive "$CTLD_PID"; then
        # -c: a fresh controller each start (no stale jobs or drained nodes from an earlier run).
        slurmctld -c
    fi
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE_DIR/spool-$node"
        pid_alive "$STATE_DIR/slurmd-$node.pid" && continue
        unshare --uts sh -c "hostname $node && exec slurmd -N $node"
    done
}

nodes_ready() {
    local states
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
    [[ $(grep -cE '^n[12] (idle|mixed|allocated|completing)$' <<<"$states") -eq 2 ]]
}

wait_ready() {
    local i
    for i in $(seq 1 150); do
        nodes_ready && return 0
        # A node left down/drained by an earlier crash would never take jobs.
        if ((i % 25 == 0)); then
            scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    sinfo -N >&2 || true
    die "nodes n1/n2 did not become idle within 30 s; logs: $STATE_DIR/*.log"
}

stop_pidfile() {
    local pidfile=$1 pid i
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid"
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || cannot "must run as root (installs packages, writes /etc/slurm and /etc/hosts)"
    install_packages
    unshare --uts true 2>/dev/null ||
        cannot "unshare --uts is not permitted here (needs CAP_SYS_ADMIN, e.g. docker run --privileged)"
    write_config
    add_hosts_entries
    start_munge
    start_slurm
    wait_ready
    echo "local_slurm: up (nodes n1 n2, $CPUS_PER_NODE CPUs each; state in $STATE_DIR)"
}

cmd_stop() {
    local node
    for node in "${NODES[@]}"; do
        stop_pidfile "$STATE_DIR/slurmd-$node.pid"
    done
    stop_pidfile "$CTLD_PID"
    stop_pidfile "$MUNGE_PID"
    echo "local_slurm: stopped"
}

cmd_status() {
    local ok=0 node
    pid_alive "$MUNGE_PID" && echo "munged: running" || { echo "munged: stopped"; ok=3; }
    pid_alive "$CTLD_PID" && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=3; }
    for node in "${NODES[@]}"; do
        pid_alive "$STATE_DIR/slurmd-$node.pid" && echo "slurmd $node: running" ||
            { echo "slurmd $node: stopped"; ok=3; }
    done
    if ((ok == 0)); then
        sinfo -N 2>/dev/null || true
        nodes_ready || { echo "nodes: not idle"; ok=3; }
    fi
    return $ok
}

cmd_install() {
    install_packages
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
