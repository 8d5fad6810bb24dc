#!/bin/bash
# Per-node half of slurm/pretrain_deepspeed.sbatch: srun starts this once per node; it writes the DeepSpeed
# hostfile for the allocation locally (no shared file needed) and starts the DeepSpeed launcher for this
# node only (--no_ssh: no ssh, no pdsh), which spawns the node's training processes.
#
#   slurm_deepspeed_node.sh MODULE [ARGS...]
#   needs MASTER_ADDR, MASTER_PORT, L2E_NODELIST, L2E_TASKS_PER_NODE (set by the batch script), SLURM_NODEID.
set -euo pipefail
module=$1
shift
read -ra python <<<"${L2E_PYTHON:-python}"
hostfile=${TMPDIR:-/tmp}/l2e-hostfile-$SLURM_JOB_ID-$SLURM_NODEID
"${python[@]}" -m l2e_dist.parallel.hostlist hostfile \
    --nodelist "$L2E_NODELIST" --tasks-per-node "$L2E_TASKS_PER_NODE" >"$hostfile"
# Slurm signals every process of the step. SIGUSR1's default action would kill the two launcher processes;
# srun then tears the step down and the ranks get only KillWait seconds to checkpoint. Ignore it here; the
# training processes install their own handler, which replaces the inherited "ignore".
trap '' USR1
exec "${python[@]}" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank --module "$module" "$@"
