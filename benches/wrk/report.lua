-- wrk script for benches/run.sh: an optional POST body (WRK_BODY_BYTES > 0
-- posts that many bytes to the URL's path) and a one-line JSON summary
-- (prefixed "WRK_JSON ") with latency percentiles in microseconds.

local body_bytes = tonumber(os.getenv("WRK_BODY_BYTES") or "0")
if body_bytes > 0 then
   wrk.method = "POST"
   wrk.body = string.rep("x", body_bytes)
   wrk.headers["Content-Type"] = "application/octet-stream"
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
end
