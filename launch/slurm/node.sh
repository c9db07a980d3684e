#!/usr/bin/env bash
# One node's task of train.sbatch: `accelerate launch` the trainers here, and pass a stop signal on to them.
#
# Slurm signals a step's top process (proctrack/cgroup) or all of its processes (linuxproc). accelerate's launcher
# has no handler for SIGUSR1 and dies of it, taking the trainers down before they checkpoint; so it runs with
# SIGUSR1 ignored, and this script sends SIGUSR1 to the trainer processes (the launcher's children) when it gets
# USR1 or TERM, and again every 5 s until they exit: a trainer still starting up (its handler not yet installed)
# gets it once ready and stops after its first step. Exits with the launcher's status.
set -u
. "$(dirname "${BASH_SOURCE[0]}")/wait_for.sh"
trap '' USR1
accelerate launch --machine_rank "${SLURM_NODEID:-0}" "$@" &
launcher=$!
stop=0
on_stop="pkill -USR1 -P $launcher"
trap 'stop=1; interrupted=1; $on_stop 2>/dev/null' USR1 TERM
wait_for "$launcher"
exit "$status"
