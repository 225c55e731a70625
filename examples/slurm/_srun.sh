# Sourced by the sbatch scripts: `run CMD ...` runs CMD under srun, inside $CONTAINER_IMAGE when set.
run() {
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    srun --kill-on-bad-exit=1 --container-image="$CONTAINER_IMAGE" \
      ${CONTAINER_MOUNTS:+--container-mounts="$CONTAINER_MOUNTS"} --container-workdir="${CONTAINER_WORKDIR:-$PWD}" "$@"
  else
    srun --kill-on-bad-exit=1 "$@"
  fi
}
