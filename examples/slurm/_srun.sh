# Sourced by the sbatch scripts: "${SRUN[@]}" CMD ... runs CMD under srun, inside $CONTAINER_IMAGE when set.
SRUN=(srun --kill-on-bad-exit=1
  ${CONTAINER_IMAGE:+"--container-image=$CONTAINER_IMAGE"}
  ${CONTAINER_MOUNTS:+"--container-mounts=$CONTAINER_MOUNTS"}
  ${CONTAINER_IMAGE:+"--container-workdir=${CONTAINER_WORKDIR:-$PWD}"})
