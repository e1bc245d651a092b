#!/bin/bash
#SBATCH --job-name=fnx.gpu.block-0
#SBATCH --output=/global/cfs/cdirs/CHANGEME/fnx/runs/gpu/block-0/job.out
#SBATCH --error=/global/cfs/cdirs/CHANGEME/fnx/runs/gpu/block-0/job.err
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=02:00:00
#SBATCH --exclusive
#SBATCH --cpus-per-task=128
#SBATCH --no-requeue
#SBATCH --account=CHANGEME
#SBATCH --qos=regular
#SBATCH --constraint=gpu
#SBATCH --gpus-per-node=4

# fnx 0.1.0 block 0 of pool gpu: one manager per node (srun launcher)
cd /global/cfs/cdirs/CHANGEME/fnx/runs/gpu/block-0
export FNX_POOL=gpu FNX_BLOCK=0
# managers drain 300s before the walltime ends
export FNX_DRAIN_AT=$(( $(date +%s) + 6900 ))

# worker_init
module load python
conda activate /global/common/software/CHANGEME/envs/fnx-gpu

srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpu-bind=none --kill-on-bad-exit=0 --cpus-per-task=128 /global/common/software/CHANGEME/fnx/bin/fnx manager --interchange tcp://ADDRESS-OF-hsn0:54001 --uid 'block-0.{rank}' --run-dir /global/cfs/cdirs/CHANGEME/fnx/runs/gpu/block-0 --run-id fnx-gpu-block-0 --python python3 --heartbeat-period-ms 5000 --heartbeat-threshold-ms 30000 --max-result-bytes 10485760 --kill-grace-ms 2000 --block-id 0 --slots 4 --cpu-affinity block --accelerators 0,1,2,3 --drain-after-ms 6900000 --curve-keys /global/cfs/cdirs/CHANGEME/fnx/keys/gpu.manager
