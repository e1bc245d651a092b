#!/bin/bash
# Cobalt job fnx.knl.block-0: nodes, walltime, queue and account are qsub arguments
#COBALT --attrs filesystems=home,grand

# fnx 0.1.0 block 0 of pool knl: one manager per node (aprun launcher)
cd /lus/grand/projects/CHANGEME/fnx/runs/knl/block-0
export FNX_POOL=knl FNX_BLOCK=0
# managers drain 300s before the walltime ends
export FNX_DRAIN_AT=$(( $(date +%s) + 3300 ))

# worker_init
module load conda
conda activate /lus/grand/projects/CHANGEME/envs/fnx

aprun -n 2 -N 1 -d 64 -cc none /lus/grand/projects/CHANGEME/fnx/bin/fnx manager --interchange tcp://ADDRESS-OF-vlan2360:54000 --uid 'block-0.{rank}' --run-dir /lus/grand/projects/CHANGEME/fnx/runs/knl/block-0 --run-id fnx-knl-block-0 --python python3 --heartbeat-period-ms 5000 --heartbeat-threshold-ms 30000 --max-result-bytes 10485760 --kill-grace-ms 2000 --block-id 0 --slots 64 --drain-after-ms 3300000 --curve-keys /lus/grand/projects/CHANGEME/fnx/keys/knl.manager
