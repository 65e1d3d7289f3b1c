#!/bin/bash
# Replica exchange on the nodes of a SLURM allocation: one srun step (host daemon) per node,
# which forks one worker per task.
#
#   cd /path/to/project && sbatch scripts/slurm_job.sh
#
# Options on the sbatch command line win over these (sbatch --ntasks=16 scripts/slurm_job.sh).
# Environment: PYTHON (interpreter, default python3), ROUNDS (default 10), ISDGRID_BIND
# (address the daemons listen on; default: each node's name; 127.0.0.1 on a single node).
#SBATCH --job-name=isdgrid-rex
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=isdgrid-rex-%j.out
set -euo pipefail

# sbatch runs a copy of this script: find the project from the submit folder.
cd "${SLURM_SUBMIT_DIR:-.}"
args=(--launcher slurm --rounds "${ROUNDS:-10}")
if [[ -n "${ISDGRID_BIND:-}" ]]; then
    args+=(--bind "$ISDGRID_BIND")
fi
echo "job $SLURM_JOB_ID: nodes $SLURM_JOB_NODELIST, tasks per node $SLURM_TASKS_PER_NODE"
exec "${PYTHON:-python3}" scripts/scheduler_job_driver.py "${args[@]}"
