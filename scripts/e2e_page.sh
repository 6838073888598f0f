#!/usr/bin/env bash
# Browser test of the chat page against a running cluster (scripts/cluster.sh
# or docker compose): headless Chromium loads the page through the proxy with
# ?autotest=..., the page sends one message over its WebSocket by itself, and
# the test checks that the whole streamed answer arrived, exactly once.
#
# Usage:
#   scripts/e2e_page.sh [URL]        # URL of the proxy, default http://127.0.0.1:8080
#
# Two runs:
#   plain  the answer streams in; the page ends "done:<n>" with every chunk
#   drop   the page drops its socket after the 3rd chunk, reconnects, sends
#          {"type":"resume","after_seq":3}; the answer must still be whole,
#          without a repeated chunk
# The expected answer comes from the same message sent over SSE (the synthetic
# engine answers a message with the same text every time).
#
# Installs with apt when missing: chromium, python3 and python3-websocket
# (a small Chrome DevTools Protocol driver below waits for the page to finish,
# then saves its DOM and a screenshot; a plain `chromium --dump-dom` cannot:
# its virtual time runs ahead of a WebSocket, so it dumps mid-stream).
#
# Environment: E2E_OUT=dir for DOM dumps and screenshots (default: a new temp
# dir, printed), E2E_TIMEOUT=seconds per run (default 30).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

URL=${1:-http://127.0.0.1:8080}
URL=${URL%/}
OUT=${E2E_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/chatproxy-e2e.XXXXXX")}
TIMEOUT=${E2E_TIMEOUT:-30}
mkdir -p "$OUT"

CHROMIUM=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$CHROMIUM" ]; then
  echo "== installing chromium"
  apt_install chromium
  CHROMIUM=$(command -v chromium)
fi
# Debian's python3, where apt puts python3-websocket (a pyenv python may shadow it).
PYTHON=/usr/bin/python3
if ! [ -x "$PYTHON" ] || ! "$PYTHON" -c 'import websocket' 2>/dev/null; then
  echo "== installing python3-websocket"
  apt_install python3 python3-websocket
fi
command -v curl >/dev/null || { echo "== installing curl"; apt_install curl; }

if ! curl -fsS -m 5 ${E2E_API_KEY:+-H "Authorization: Bearer $E2E_API_KEY"} "$URL/api/ai-health" >/dev/null; then
  echo "!! nothing answers $URL/api/ai-health: start the cluster first (scripts/cluster.sh)" >&2
  exit 1
fi

# sse_answer MESSAGE: prints the chunks of the answer to MESSAGE, one a line.
sse_answer() {
  local body
  body=$(printf '{"session_id":"e2e-sse-%s","message":"%s"}' "$RANDOM$RANDOM" "$1")
  curl -fsS -N -m 30 "$URL/api/chat" -H 'content-type: application/json' \
    -H 'accept: text/event-stream' -d "$body" |
    sed -n 's/^data: {"type":"chunk".*"delta":"\([^"]*\)".*/\1/p'
}

# browse URL DOM_FILE PNG_FILE: loads URL in headless Chromium, waits until the
# page's title is done:... or error:..., saves the DOM and a screenshot, prints the title.
browse() {
  "$PYTHON" - "$CHROMIUM" "$1" "$2" "$3" "$TIMEOUT" <<'PY'
import base64, json, os, shutil, subprocess, sys, tempfile, time, urllib.request
import websocket

chromium, url, dom_file, png_file, timeout = sys.argv[1:6]
profile = tempfile.mkdtemp(prefix="chatproxy-e2e-profile.")
browser = subprocess.Popen(
    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
     "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
     "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1100,800",
     f"--user-data-dir={profile}", "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.time() + 20
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        if time.time() > deadline or browser.poll() is not None:
            sys.exit("chromium did not start its DevTools endpoint")
        time.sleep(0.1)
    port = open(port_file).read().split()[0]
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
    page = next(t for t in targets if t.get("type") == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=10)
    ids = iter(range(1, 1 << 30))

    def call(method, **params):
        msg_id = next(ids)
        ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    sys.exit(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(expression):
        return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    call("Page.enable")
    key = os.environ.get("E2E_LOCAL_KEY")
    if key:
        # What a user typed into the key field earlier, kept by this browser.
        call("Page.addScriptToEvaluateOnNewDocument",
             source=f"localStorage.setItem('chatproxy.api_key', {json.dumps(key)});")
    call("Page.navigate", url=url)
    deadline = time.time() + float(timeout)
    title = ""
    while time.time() < deadline:
        title = js("document.title") or ""
        if title.startswith(("done:", "error:")) or "autotest" not in url:
            break
        time.sleep(0.2)
    if "autotest" not in url:
        time.sleep(2)  # the page's first health poll and socket
    time.sleep(0.3)  # let the last frame paint for the screenshot
    with open(dom_file, "w") as f:
        f.write(js("document.documentElement.outerHTML"))
    shot = call("Page.captureScreenshot", format="png")
    with open(png_file, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    print(title)
finally:
    browser.terminate()
    try:
        browser.wait(10)
    except subprocess.TimeoutExpired:
        browser.kill()
    shutil.rmtree(profile, ignore_errors=True)
PY
}

# With E2E_API_KEY set, the server wants API keys: only the key checks run.
if [ -n "${E2E_API_KEY:-}" ]; then
  failures=0
  echo "== keys: without a key the page asks for one"
  title=$(browse "$URL/?session_id=e2e-nokey-$RANDOM" "$OUT/nokey.html" "$OUT/nokey.png")
  grep -q '<div class="key" id="key-box">' "$OUT/nokey.html" || { echo "   FAIL: no key field shown" >&2; failures=1; }
  grep -q 'id="key"[^>]*aria-invalid="true"' "$OUT/nokey.html" || { echo "   FAIL: the key field is not marked missing" >&2; failures=1; }
  echo "== keys: with the key kept in the browser the answer streams"
  title=$(E2E_LOCAL_KEY="$E2E_API_KEY" browse "$URL/?autotest=1&session_id=e2e-key-$RANDOM" "$OUT/key.html" "$OUT/key.png")
  [[ "$title" == done:* ]] || { echo "   FAIL: title is '$title', want done:N" >&2; failures=1; }
  [ "$failures" -eq 0 ] || { echo "== e2e key test failed; DOM and screenshots in $OUT" >&2; exit 1; }
  echo "== e2e key test passed; DOM and screenshots in $OUT"
  exit 0
fi

failures=0
fail() {
  echo "   FAIL: $*" >&2
  failures=$((failures + 1))
}

for mode in plain drop; do
  message="e2e page check $mode $RANDOM$RANDOM"
  mapfile -t chunks < <(sse_answer "$message")
  expected=$(printf '%s' "${chunks[@]}")
  if [ "${#chunks[@]}" -eq 0 ]; then
    echo "!! no answer over SSE to '$message' from $URL/api/chat" >&2
    exit 1
  fi
  before=$failures
  autotest=1
  [ "$mode" = drop ] && autotest=drop
  page="$URL/?autotest=$autotest&session_id=e2e-page-$RANDOM$RANDOM&message=${message// /%20}"
  echo "== $mode: $page"
  title=$(browse "$page" "$OUT/$mode.html" "$OUT/$mode.png")
  dom="$OUT/$mode.html"
  echo "   title: $title; DOM $dom; screenshot $OUT/$mode.png"

  [ "$title" = "done:${#chunks[@]}" ] || fail "title is '$title', want 'done:${#chunks[@]}'"
  grep -q "<span id=\"status\">done:${#chunks[@]}</span>" "$dom" || fail "#status does not say done:${#chunks[@]}"
  # The answer element: finished, every chunk counted once, its backend and node named.
  answer=$(grep -o '<div class="answer"[^>]*>' "$dom" | tail -n 1)
  [[ "$answer" == *'data-state="done"'* ]] || fail "the answer is not done: $answer"
  [[ "$answer" == *"data-chunks=\"${#chunks[@]}\""* ]] || fail "the answer does not count ${#chunks[@]} chunks: $answer"
  [[ "$answer" =~ data-backend=\"[^\"]+\" ]] || fail "the answer does not name its backend: $answer"
  [[ "$answer" =~ data-node=\"[^\"]+\" ]] || fail "the answer does not name its AI node: $answer"
  grep -qF "<div class=\"answer-text\">$expected</div>" "$dom" || {
    fail "the answer text differs from the SSE answer"
    echo "   want: $expected" >&2
    echo "   got:  $(grep -o '<div class="answer-text">[^<]*' "$dom" | tail -n 1)" >&2
  }
  grep -q '<dd id="health-backend"[^>]*>backend-[^<]*</dd>' "$dom" || fail "the health panel does not name the backend (X-Backend-Id)"
  grep -q 'class="node" data-status="healthy"' "$dom" || fail "the health panel shows no healthy node"
  if [ "$mode" = drop ]; then
    grep -q 'resumed ×1' "$dom" || fail "the answer was not resumed after the drop"
    grep -q '<dd id="reconnects">1</dd>' "$dom" || fail "the page did not reconnect once"
  fi
  [ "$failures" -eq "$before" ] && echo "   ok: ${#chunks[@]} chunks, $(grep -o 'data-backend="[^"]*"' <<<"$answer"), $(grep -o 'data-node="[^"]*"' <<<"$answer")"
done

# Stop: the page cancels its answer after the 3rd chunk; the stored end says cancelled.
echo "== stop: the Stop button cancels the answer being written"
page="$URL/?autotest=stop&session_id=e2e-page-stop-$RANDOM$RANDOM&message=stop%20me"
title=$(browse "$page" "$OUT/stop.html" "$OUT/stop.png")
dom="$OUT/stop.html"
echo "   title: $title; DOM $dom; screenshot $OUT/stop.png"
[ "$title" = "error:cancelled" ] || fail "title is '$title', want 'error:cancelled'"
answer=$(grep -o '<div class="answer"[^>]*>' "$dom" | tail -n 1)
[[ "$answer" == *'data-state="error"'* ]] || fail "the stopped answer is not ended: $answer"
chunks_seen=$(sed -n 's/.*data-chunks="\([0-9]*\)".*/\1/p' <<<"$answer")
[ "${chunks_seen:-0}" -ge 3 ] || fail "the answer stopped before its 3rd chunk: $answer"
grep -q 'cancelled: ' "$dom" || fail "the answer does not say it was cancelled"
grep -q '<button id="stop"[^>]*disabled' "$dom" || fail "Stop is still live after the answer ended"

if [ "$failures" -gt 0 ]; then
  echo "== e2e page test: $failures check(s) failed; DOM and screenshots in $OUT" >&2
  exit 1
fi
echo "== e2e page test passed; DOM and screenshots in $OUT"
