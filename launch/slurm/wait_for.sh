# Sourced by train.sbatch and node.sh. wait_for PID: wait until PID ends and set $status to its exit status.
# A trap that sets interrupted=1 makes bash's `wait` return early (128 + the signal) while PID still runs: it is
# waited for again, not taken for its status. While $stop is 1 (set by such a trap, before or during the wait), the
# command in $on_stop runs every 5 s until PID ends: a stop re-sent reaches processes that were not yet listening.
keep_stopping() {  # PID: while $stop is 1 and PID runs, run $on_stop every 5 s
    while [ "${stop:-0}" = 1 ] && kill -0 "$1" 2>/dev/null; do
        sleep 5
        eval "${on_stop:-:}"
    done
}

wait_for() {
    local pid=$1 rc last=""
    keep_stopping "$pid"  # the stop came before PID was started
    while :; do
        interrupted=0
        wait "$pid"
        rc=$?
        if [ "$rc" = 127 ] && [ -n "$last" ]; then  # already reaped and reported: keep what it returned
            status=$last
            return
        fi
        if [ "$interrupted" = 1 ] && [ "$rc" -gt 128 ]; then
            last=$rc
            keep_stopping "$pid"
            continue
        fi
        status=$rc
        return
    done
}
