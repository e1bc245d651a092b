#!/bin/bash
#PBS -N fnx.gpu.block-0
#PBS -o /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/job.out
#PBS -e /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/job.err
#PBS -l select=2
#PBS -l walltime=12:00:00
#PBS -r n
#PBS -q capacity
#PBS -A CHANGEME
#PBS -l filesystems=home:flare
#PBS -l place=scatter

# fnx 0.1.0 block 0 of pool gpu: one manager per node (mpiexec launcher)
cd /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0
export FNX_POOL=gpu FNX_BLOCK=0
# managers drain 1800s before the walltime ends
export FNX_DRAIN_AT=$(( $(date +%s) + 41400 ))

# worker_init
module load python
source /lus/flare/projects/CHANGEME/venvs/fnx/bin/activate

# one line per node of the allocation (blank lines and spaces are not hosts)
if [ -n "${PBS_NODEFILE:-}" ]; then sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$PBS_NODEFILE" | sort -u > /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
elif [ -n "${COBALT_NODEFILE:-}" ]; then sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$COBALT_NODEFILE" | sort -u > /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then scontrol show hostnames "$SLURM_JOB_NODELIST" > /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
else hostname > /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
fi
FNX_NODES=$(wc -l < /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/hosts)
mpiexec -n "$FNX_NODES" --ppn 1 --hostfile /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0/hosts --cpu-bind list:1-51,53-103,105-155,157-207 /lus/flare/projects/CHANGEME/fnx/bin/fnx manager --interchange tcp://ADDRESS-OF-hsn0:54000 --uid 'block-0.{rank}' --run-dir /lus/flare/projects/CHANGEME/fnx/runs/gpu/block-0 --run-id fnx-gpu-block-0 --python python3 --heartbeat-period-ms 5000 --heartbeat-threshold-ms 30000 --max-result-bytes 10485760 --kill-grace-ms 2000 --block-id 0 --slots 12 --cpu-affinity block --accelerators 0.0,0.1,1.0,1.1,2.0,2.1,3.0,3.1,4.0,4.1,5.0,5.1 --drain-after-ms 41400000 --curve-keys /lus/flare/projects/CHANGEME/fnx/keys/gpu.manager
