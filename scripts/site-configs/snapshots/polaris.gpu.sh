#!/bin/bash
#PBS -N fnx.gpu.block-0
#PBS -o /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/job.out
#PBS -e /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/job.err
#PBS -l select=2:ncpus=32:ngpus=4
#PBS -l walltime=06:00:00
#PBS -r n
#PBS -q preemptable
#PBS -A CHANGEME
#PBS -l filesystems=home:eagle
#PBS -l place=scatter

# fnx 0.1.0 block 0 of pool gpu: one manager per node (mpiexec launcher)
cd /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0
export FNX_POOL=gpu FNX_BLOCK=0
# managers drain 300s before the walltime ends
export FNX_DRAIN_AT=$(( $(date +%s) + 21300 ))

# worker_init
module use /soft/modulefiles
module load conda
conda activate /lus/eagle/projects/CHANGEME/envs/fnx

# one line per node of the allocation (blank lines and spaces are not hosts)
if [ -n "${PBS_NODEFILE:-}" ]; then sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$PBS_NODEFILE" | sort -u > /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
elif [ -n "${COBALT_NODEFILE:-}" ]; then sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$COBALT_NODEFILE" | sort -u > /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then scontrol show hostnames "$SLURM_JOB_NODELIST" > /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
else hostname > /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/hosts
fi
FNX_NODES=$(wc -l < /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/hosts)
mpiexec -n "$FNX_NODES" --ppn 1 --hostfile /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0/hosts --depth=64 --cpu-bind depth /lus/eagle/projects/CHANGEME/fnx/bin/fnx manager --interchange tcp://ADDRESS-OF-bond0:54000 --uid 'block-0.{rank}' --run-dir /lus/eagle/projects/CHANGEME/fnx/runs/gpu/block-0 --run-id fnx-gpu-block-0 --python python3 --heartbeat-period-ms 5000 --heartbeat-threshold-ms 30000 --max-result-bytes 10485760 --kill-grace-ms 2000 --block-id 0 --slots 4 --cpu-affinity block --accelerators 0,1,2,3 --drain-after-ms 21300000 --curve-keys /lus/eagle/projects/CHANGEME/fnx/keys/gpu.manager
