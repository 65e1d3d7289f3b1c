#!/bin/bash
# Replica exchange on the hosts of a Grid Engine parallel job: one host daemon per host,
# started with `qrsh -inherit` (the parallel environment needs control_slaves TRUE), which
# forks one worker per slot.
# Grid Engine runs a job script with /bin/sh unless told otherwise: `-S /bin/bash` below.
#
#   cd /path/to/project && qsub -pe smp 4 scripts/sge_job.sh
#
# Environment: PYTHON (default python3), ROUNDS (default 10), ISDGRID_BIND (address the
# daemons listen on; default: each host's name as $PE_HOSTFILE lists it).
#$ -N isdgrid-rex
#$ -S /bin/bash
#$ -cwd
#$ -V
#$ -j y
#$ -o isdgrid-rex.$JOB_ID.out
#$ -l h_rt=00:30:00
set -euo pipefail

args=(--launcher sge --rounds "${ROUNDS:-10}")
if [[ -n "${ISDGRID_BIND:-}" ]]; then
    args+=(--bind "$ISDGRID_BIND")
fi
echo "job $JOB_ID: $NSLOTS slots on $(cut -d' ' -f1 "$PE_HOSTFILE" | sort -u | tr '\n' ' ')"
exec "${PYTHON:-python3}" scripts/scheduler_job_driver.py "${args[@]}"
