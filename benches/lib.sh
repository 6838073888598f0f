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

# start_fronts DIR BIN: three backends (start_http_backends DIR 18700), our
# proxy BIN on 127.0.0.1:18710 (status 18720) and nginx on 18711, both as
# benches/run.sh configures them (2 workers each), answering and warmed up
# (2 s of wrk at 64 connections each); appends their pids to `pids` and
# sets `proxy` and `nginx` to their master pids.
start_fronts() {
    local dir=$1 bin=$2 port servers="" s
    start_http_backends "$dir" 18700
    sed "s|/tmp/bench-proxy|$dir/proxy|" benches/proxy-bench.toml >"$dir/proxy.toml"
    RUST_LOG=warn PROXY_LISTEN=127.0.0.1:18710 PROXY_STATUS_LISTEN=127.0.0.1:18720 \
        PROXY_BACKENDS=$(IFS=,; echo "${backends[*]}") "$bin" --config "$dir/proxy.toml" >"$dir/proxy.log" 2>&1 &
    proxy=$!
    pids+=($proxy)
    mkdir -p "$dir/nginx"
    for s in "${backends[@]}"; do servers+="server $s; "; done
    sed -e "s|@WORKERS@|2|" -e "s|@LISTEN@|127.0.0.1:18711|" -e "s|@PREFIX@|$dir/nginx|g" -e "s|@SERVERS@|$servers|" \
        benches/nginx.conf.in >"$dir/nginx/nginx.conf"
    nginx -c "$dir/nginx/nginx.conf" -p "$dir/nginx" >"$dir/nginx/stdout.log" 2>&1 </dev/null &
    nginx=$!
    pids+=($nginx)
    for port in 18701 18702 18703 18710 18711; do
        for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.1; done
    done
    for port in 18710 18711; do wrk -t2 -c64 -d2s "http://127.0.0.1:$port/" >/dev/null; done
}
