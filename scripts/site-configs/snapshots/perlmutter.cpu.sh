#!/bin/bash
#SBATCH --job-name=fnx.cpu.block-0
#SBATCH --output=/global/cfs/cdirs/CHANGEME/fnx/runs/cpu/block-0/job.out
#SBATCH --error=/global/cfs/cdirs/CHANGEME/fnx/runs/cpu/block-0/job.err
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --exclusive
#SBATCH --cpus-per-task=256
#SBATCH --no-requeue
#SBATCH --account=CHANGEME
#SBATCH --qos=regular
#SBATCH --constraint=cpu

# fnx 0.1.0 block 0 of pool cpu: one manager per node (srun launcher)
cd /global/cfs/cdirs/CHANGEME/fnx/runs/cpu/block-0
export FNX_POOL=cpu FNX_BLOCK=0
# managers drain 300s before the walltime ends
export FNX_DRAIN_AT=$(( $(date +%s) + 14100 ))

# worker_init
module load python
conda activate /global/common/software/CHANGEME/envs/fnx

srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpu-bind=none --kill-on-bad-exit=0 --cpus-per-task=256 /global/common/software/CHANGEME/fnx/bin/fnx manager --interchange tcp://ADDRESS-OF-hsn0:54000 --uid 'block-0.{rank}' --run-dir /global/cfs/cdirs/CHANGEME/fnx/runs/cpu/block-0 --run-id fnx-cpu-block-0 --python python3 --heartbeat-period-ms 5000 --heartbeat-threshold-ms 30000 --max-result-bytes 10485760 --kill-grace-ms 2000 --block-id 0 --slots 128 --drain-after-ms 14100000 --curve-keys /global/cfs/cdirs/CHANGEME/fnx/keys/cpu.manager
