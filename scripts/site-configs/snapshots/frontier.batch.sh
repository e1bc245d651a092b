#!/bin/bash
#SBATCH --job-name=fnx.batch.block-0
#SBATCH --output=/ccs/proj/CHANGEME/fnx/runs/batch/block-0/job.out
#SBATCH --error=/ccs/proj/CHANGEME/fnx/runs/batch/block-0/job.err
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=02:00:00
#SBATCH --exclusive
#SBATCH --cpus-per-task=56
#SBATCH --no-requeue
#SBATCH --account=CHANGEME
#SBATCH --partition=batch
#SBATCH --gpus-per-node=8

# fnx 0.1.0 block 0 of pool batch: one manager per node (srun launcher)
cd /ccs/proj/CHANGEME/fnx/runs/batch/block-0
export FNX_POOL=batch FNX_BLOCK=0
# managers drain 300s before the walltime ends
export FNX_DRAIN_AT=$(( $(date +%s) + 6900 ))

# worker_init
module load miniforge3
conda activate /ccs/proj/CHANGEME/envs/fnx

srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpu-bind=none --kill-on-bad-exit=0 --cpus-per-task=56 /ccs/proj/CHANGEME/fnx/bin/fnx manager --interchange tcp://ADDRESS-OF-hsn0:54000 --uid 'block-0.{rank}' --run-dir /ccs/proj/CHANGEME/fnx/runs/batch/block-0 --run-id fnx-batch-block-0 --python python3 --heartbeat-period-ms 5000 --heartbeat-threshold-ms 30000 --max-result-bytes 10485760 --kill-grace-ms 2000 --block-id 0 --slots 8 --cpu-affinity block --accelerators 0,1,2,3,4,5,6,7 --drain-after-ms 6900000 --curve-keys /ccs/proj/CHANGEME/fnx/keys/batch.manager
