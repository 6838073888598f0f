# Shared by the bench scripts (source it from the repository's root).

# start_http_backends DIR BASE: three `loadgen http-backend`s on ports
# BASE+1..BASE+3, logging to DIR/backends.log; appends their pids to `pids`
# and sets `backends` to their addresses.
start_http_backends() {
    local dir=$1 base=$2 i
    backends=()
    for i in 1 2 3; do
        target/release/loadgen http-backend --port $((base + i)) --id "$i" >>"$dir/backends.log" 2>&1 &
        pids+=($!)
        backends+=("127.0.0.1:$((base + i))")
    done
}
