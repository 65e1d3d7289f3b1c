#!/bin/bash
# The job tests/test_sge.py submits: tests/scheduler_hold_driver.py on the job's slots.
#
#   PYTHON=... PYTHONPATH=... qsub -pe smp 2 -o OUT tests/sge_hold_job.sh [driver options]
#
# After the driver ends the job prints "DRIVER-EXIT <code>" and stays HOLD seconds
# (default 0), so a test can look at the job's processes while it is still running.
#$ -N isdgrid-test
#$ -S /bin/bash
#$ -cwd
#$ -V
#$ -j y
set -uo pipefail
echo "SHELL {\"pid\": $$, \"job\": \"$JOB_ID\", \"slots\": $NSLOTS}"
"${PYTHON:-python3}" tests/scheduler_hold_driver.py --launcher sge "$@"
echo "DRIVER-EXIT $?"
sleep "${HOLD:-0}"
