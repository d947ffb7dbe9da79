# slurm/launch.sh - the body shared by fit.sbatch, multinode.sbatch and sweep.sbatch (sourced, not run).
#
# Expects from the template: CONFIG (config file(s), space-separated, may be empty), ACTIVATE (a command
# that puts the project's python on PATH), RUNS (folder for run folders), FIT_ARGS (bash array of extra
# fit arguments). Starts one `srun python -m lightning_diffusion fit` with one task per GPU on every node.
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:?run this through sbatch}"
eval "$ACTIVATE"

# One id per run, stable across requeues: array tasks are ARRAYJOB_TASK, other jobs their job id; the
# cluster name keeps ids unique on W&B when several clusters log to one project. Always set: sbatch copies
# the submitting shell's environment, and a WANDB_RUN_ID left there would merge unrelated runs.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  job_key="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  job_key="$SLURM_JOB_ID"
fi
RUN_ID="${SLURM_CLUSTER_NAME:-slurm}-${job_key}"
export WANDB_RUN_ID="$RUN_ID"
RUN_DIR="$RUNS/$RUN_ID"
mkdir -p "$RUN_DIR"

# Rendezvous: the first node of the allocation, a port derived from this job's id (array tasks have their
# own SLURM_JOB_ID, so tasks sharing a node do not collide); the same port again after a requeue.
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_ADDR="$(scontrol show node -o "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
MASTER_ADDR="${MASTER_ADDR:-$first_node}"  # the address SLURM itself reaches the node at
MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# Resume: Lightning restores the newest hpc_ckpt_*.ckpt in default_root_dir by itself; the helper adds
# `--ckpt_path last*.ckpt` only when such a checkpoint is newer (a crash without the requeue signal).
mapfile -d '' RESUME_ARGS < <(python -m lightning_diffusion.training.slurm_job resume-args "$RUN_DIR")

CONFIG_ARGS=()
for config in $CONFIG; do CONFIG_ARGS+=(--config "$config"); done

echo "[launch] job ${job_key} restart ${SLURM_RESTART_COUNT:-0}: run ${RUN_ID}, ${SLURM_JOB_NUM_NODES} node(s)" \
     "x ${SLURM_NTASKS_PER_NODE} task(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run folder ${RUN_DIR}," \
     "resume args: ${RESUME_ARGS[*]:-none, Lightning restores an hpc checkpoint itself}"

# `srun` starts one process per task; Lightning's SLURMEnvironment reads the ranks from SLURM's variables.
# --signal=SIGUSR1 (without `B:`, so it reaches these processes) is handled by RequeueOnSignal: hpc_ckpt
# saved by all ranks at a step boundary, then `scontrol requeue` (Lightning's in-handler save can hang DDP).
# Until RequeueOnSignal installs its handler, SIGUSR1 is ignored (an ignored signal stays ignored across exec):
# SLURM delivered the signal a second time as the requeued job's new step started (seen on the local cluster),
# and its default action killed the restarted run before it could restore its checkpoint.
srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' usr1-ignored python -m lightning_diffusion fit \
  "${CONFIG_ARGS[@]}" \
  --trainer.callbacks+=lightning_diffusion.training.slurm_requeue.RequeueOnSignal \
  --trainer.default_root_dir "$RUN_DIR" \
  --trainer.num_nodes "$SLURM_JOB_NUM_NODES" \
  --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  "${RESUME_ARGS[@]}" \
  "${FIT_ARGS[@]}"
