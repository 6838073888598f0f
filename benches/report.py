#!/usr/bin/env python3
"""Turns benches/run.sh's raw results (RAW: http.csv, ws-*.json, idle-*.json,
micro.csv, machine.json) into OUT/README.md (Markdown tables, targets met or
missed) and OUT/*.png plots (when matplotlib is installed).

Usage: benches/report.py RAW OUT
"""

import csv
import glob
import json
import os
import re
import sys


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def medians(rows):
    """One row per (mode, payload, concurrency, target): each figure the
    median of its rounds (run.sh's HTTP_ROUNDS), errors summed."""
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["payload"], int(r["concurrency"]), r["target"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        m = dict(rs[0])
        for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "cpu_s_per_100k"):
            v = sorted(float(r[k]) for r in rs)
            m[k] = str(v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)
        m["errors"] = str(sum(int(r["errors"]) for r in rs))
        m["rounds"] = len(rs)
        out[key] = m
    return out


def round_counts(rows):
    """'5 rounds' or '5 rounds (the cells at 1 connection 11)': the rounds
    each front ran per cell (run.sh's HTTP_ROUNDS and HTTP_C1_ROUNDS)."""
    by_c = {}
    for r in rows:
        if r["target"] != "direct":
            c = int(r["concurrency"])
            by_c[c] = max(by_c.get(c, 0), int(r.get("round") or 1))
    one = by_c.pop(1, None)
    rest = max(by_c.values(), default=None)
    if one is None or rest is None or one == rest:
        return f"{one or rest} rounds"
    return f"{rest} rounds (the cells at 1 connection {one})"


def steal_summary(rows, raw):
    """How much CPU time the hypervisor took during the HTTP rounds, per front
    (raw/http.csv's steal_s; runs before it was recorded have none)."""
    if not rows or "steal_s" not in rows[0]:
        return ""
    parts = []
    for target, name in (("proxy", "ours"), ("nginx", "nginx's")):
        steal = sorted(((float(r["steal_s"]), r) for r in rows if r["target"] == target), key=lambda x: x[0])
        if not steal:
            continue
        most, r = steal[-1]
        parts.append(f"{name} {sum(x for x, _ in steal):.2f} s in all, at most {most:.2f} s in one round "
                     f"({r['mode']} {r['payload']} c={r['concurrency']} round {r['round']}, p99 {float(r['p99_ms']):.2f} ms)")
    again = ""
    path = os.path.join(raw, "stolen", "http.csv")
    if os.path.exists(path):
        with open(path) as f:
            n = sum(1 for line in f if line.strip())
        again = (f" {n} HTTP measurement{'s' if n != 1 else ''} that lost more to it than `STEAL_MAX` "
                 f"{'were' if n != 1 else 'was'} taken again (set aside in `raw/stolen/`).")
    return ("The hypervisor took CPU time from the machine (`/proc/stat` steal, `steal_s` in `raw/http.csv`) "
            "during the rounds: " + "; ".join(parts) + "." + again)


def stolen_rounds(raw):
    """A sentence on the stream rounds measured again for steal, if any."""
    n = len(glob.glob(os.path.join(raw, "stolen", "*.json")))
    if not n:
        return ""
    return (f" {n} stream round{'s' if n != 1 else ''} that lost more than `STEAL_MAX` to the hypervisor "
            f"{'were' if n != 1 else 'was'} run again (set aside in `raw/stolen/`).")


def http_tables(rows):
    """One table per (mode, payload): each concurrency with proxy, nginx, direct and ratios."""
    # Issue 10's targets: keep-alive req/s >= nginx and CPU/request <= nginx;
    # new connection per request req/s >= 0.9x and CPU <= 1.2x; p99 <= 1.2x.
    out, targets = [], {"rps_ka": [], "cpu_ka": [], "rps_new": [], "cpu_new": [], "p99": []}
    by = medians(rows)
    cells = sorted({(r["mode"], r["payload"]) for r in rows}, key=lambda k: (k[0] != "keepalive", k[1]))
    for mode, payload in cells:
        title = {"get": "small GET /", "post4k": "4 KB POST /echo"}.get(payload, payload)
        conn = "keep-alive" if mode == "keepalive" else "new connection per request"
        out.append(f"\n#### {title}, {conn}\n")
        out.append("| conc. | ours req/s | nginx req/s | direct req/s | **req/s ours/nginx** "
                   "| ours p50 / p99 / p99.9 ms | nginx p50 / p99 / p99.9 ms | **p99 ours/nginx** "
                   "| ours CPU s/100k | nginx CPU s/100k | **CPU ours/nginx** | errors (ours/nginx) |")
        out.append("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|")
        concs = sorted({c for (m, p, c, _) in by if m == mode and p == payload})
        for c in concs:
            o, n, d = (by.get((mode, payload, c, t)) for t in ("proxy", "nginx", "direct"))
            if not o or not n:
                continue
            f = lambda r, k: float(r[k]) if r else 0.0
            rr, pr, cr = (ratio(f(o, "rps"), f(n, "rps")), ratio(f(o, "p99_ms"), f(n, "p99_ms")),
                          ratio(f(o, "cpu_s_per_100k"), f(n, "cpu_s_per_100k")))
            ka = mode == "keepalive"
            name = f"{'GET' if payload == 'get' else '4 KB POST'}{'' if ka else ' new conn.'} c={c}"
            for key, k, bound, better in (("rps_ka" if ka else "rps_new", "rps", 1.0 if ka else 0.9, "higher"),
                                          ("cpu_ka" if ka else "cpu_new", "cpu_s_per_100k", 1.0 if ka else 1.2, "lower"),
                                          ("p99", "p99_ms", 1.2, "lower")):
                ok = within(f(o, k), f(n, k), bound, better)
                targets[key].append((ok, f"{name}: {ratio(f(o, k), f(n, k))}, "
                                         f"{rounds_within(rows, (mode, payload, c), k, bound, better)}"))
            lat = lambda r: f"{f(r, 'p50_ms'):.2f} / {f(r, 'p99_ms'):.2f} / {f(r, 'p999_ms'):.2f}"
            out.append(f"| {c} | {f(o, 'rps'):,.0f} | {f(n, 'rps'):,.0f} | {f(d, 'rps'):,.0f} | **{rr}** "
                       f"| {lat(o)} | {lat(n)} | **{pr}** | {f(o, 'cpu_s_per_100k'):.2f} "
                       f"| {f(n, 'cpu_s_per_100k'):.2f} | **{cr}** | {o['errors']} / {n['errors']} |")
    return out, targets


def stream_runs(raw, prefix):
    """loadgen ws reports named PREFIX-FRONT-N[-rR].json, keyed by (front,
    sessions): the round with the median publish→client p99, carrying the
    lost and duplicated chunks and completions summed over every round."""
    groups = {}
    for path in glob.glob(os.path.join(raw, f"{prefix}-*.json")):
        j = load_json(path)
        if j:
            r = re.search(r"-r(\d+)\.json$", path)
            j["round"] = int(r.group(1)) if r else 1
            groups.setdefault((j.get("front", "?"), j["sessions"]), []).append(j)
    runs = {}
    for key, js in groups.items():
        js.sort(key=lambda j: j["publish_to_client"]["p99_ms"])
        m = dict(js[len(js) // 2])
        m["rounds"] = len(js)
        m["p99_by_round"] = {j["round"]: j["publish_to_client"]["p99_ms"] for j in js}
        for k in ("lost_chunks", "duplicate_chunks", "complete", "chats"):
            m[k + "_all"] = sum(j.get(k, 0) for j in js)
        runs[key] = m
    return runs


def within(ours, nginx, bound, better):
    """Whether our figure meets `bound` × nginx's, `better` being "higher" or "lower"."""
    return ours >= nginx * bound if better == "higher" else ours <= nginx * bound


def rounds_within(rows, cell, key, bound, better):
    """'ours within it in K of N paired rounds': the HTTP rounds (same number, run back to
    back) where ours met the bound against nginx's figure of that round."""
    per = {}
    for r in rows:
        if (r["mode"], r["payload"], int(r["concurrency"])) == cell and r["target"] in ("proxy", "nginx"):
            per.setdefault(r["round"], {})[r["target"]] = float(r[key])
    pairs = [v for v in per.values() if len(v) == 2]
    met = sum(within(v["proxy"], v["nginx"], bound, better) for v in pairs)
    return f"ours within it in {met} of {len(pairs)} paired rounds"


def lower_rounds(ours, theirs):
    """'K of N paired rounds': the rounds (same number, run back to back)
    where our p99 was below nginx's."""
    a, b = ours["p99_by_round"], theirs["p99_by_round"]
    paired = sorted(set(a) & set(b))
    return f"{sum(a[r] < b[r] for r in paired)} of {len(paired)} paired rounds"


def ordered(runs):
    """(sessions, front's name, report, publish→client summary, errors), ours first for each size."""
    for (front, n) in sorted(runs, key=lambda k: (k[1], k[0] != "proxy")):
        j = runs[(front, n)]
        errors = j["error_events"] + j["unfinished"] + j["connect_errors"]
        yield n, "ours" if front == "proxy" else front, j, j["publish_to_client"], errors


def ws_table(raw):
    runs = stream_runs(raw, "ws")
    out = ["| streams | front | answers complete | lost chunks | dup. | errors | first chunk p50 / p99 ms "
           "| publish→client p50 / p99 / p99.9 / max ms | chunks/s | front CPU s |",
           "|---:|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for n, name, j, p, errors in ordered(runs):
        f = j["first_chunk"]
        out.append(f"| {n:,} | {name} | {j['complete']:,}/{j['chats']:,} | {j['lost_chunks']} | {j['duplicate_chunks']} "
                   f"| {errors} | {f['p50_ms']:.1f} / {f['p99_ms']:.1f} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} / "
                   f"{p['p999_ms']:.2f} / {p['max_ms']:.1f} | {j['chunks_per_sec']:,.0f} | {j.get('front_cpu_s', 0):.2f} |")
    ratios = ["", "| streams | publish→client p99 ours/nginx | first chunk p99 ours/nginx | front CPU ours/nginx |",
              "|---:|---:|---:|---:|"]
    for n in sorted({n for (_, n) in runs}):
        o, g = runs.get(("proxy", n)), runs.get(("nginx", n))
        if o and g:
            ratios.append(f"| {n:,} | {ratio(o['publish_to_client']['p99_ms'], g['publish_to_client']['p99_ms'])} "
                          f"| {ratio(o['first_chunk']['p99_ms'], g['first_chunk']['p99_ms'])} "
                          f"| {ratio(o.get('front_cpu_s', 0), g.get('front_cpu_s', 0))} |")
    return out + ratios, runs


def steady_table(raw):
    """The same streams with the first chats spread over one chunk interval."""
    runs = stream_runs(raw, "steady")
    out = ["| streams | front | spread ms | answers complete | lost chunks | dup. | errors "
           "| publish→client p50 / p99 / p99.9 / max ms | p99 ours/nginx |",
           "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for n, name, j, p, errors in ordered(runs):
        g = runs.get(("nginx", n))
        r = ratio(p["p99_ms"], g["publish_to_client"]["p99_ms"]) if name == "ours" and g else ""
        out.append(f"| {n:,} | {name} | {j.get('start_spread_ms', 0)} | {j['complete']:,}/{j['chats']:,} "
                   f"| {j['lost_chunks']} | {j['duplicate_chunks']} | {errors} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} / "
                   f"{p['p999_ms']:.2f} / {p['max_ms']:.1f} | {r} |")
    return out, runs


def idle_table(raw):
    out = ["| front | requested | opened | held | open time s | front KB/socket | backends+AI KB/socket |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    runs = {}
    for front in ("proxy", "nginx"):
        j = load_json(os.path.join(raw, f"idle-{front}.json"))
        if not j:
            continue
        runs[front] = j
        mem = j["memory"]
        fm = mem.get(front, {}).get("kb_per_socket", 0)
        bm = mem.get("backends+ai", {}).get("kb_per_socket", 0)
        name = "ours" if front == "proxy" else front
        out.append(f"| {name} | {j['requested']:,} | {j['opened']:,} | {j['held']:,} | {j['open_secs']:.1f} "
                   f"| {fm:.1f} | {bm:.1f} |")
    return out, runs


def micro_table(raw):
    path = os.path.join(raw, "micro.csv")
    if not os.path.exists(path):
        return []
    out = ["| benchmark | median | mean |", "|---|---:|---:|"]
    with open(path) as f:
        for r in csv.DictReader(f):
            out.append(f"| `{r['bench']}` | {float(r['median_ns']):.1f} ns | {float(r['mean_ns']):.1f} ns |")
    return out


def plots(rows, ws_runs, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    cells = sorted({(r["mode"], r["payload"]) for r in rows}, key=lambda k: (k[0] != "keepalive", k[1]))
    if cells:
        fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 7), squeeze=False)
        for i, (mode, payload) in enumerate(cells):
            for target, style in (("proxy", "o-"), ("nginx", "s--"), ("direct", "^:")):
                pts = sorted((int(r["concurrency"]), float(r["rps"]), float(r["p99_ms"])) for r in rows
                             if r["mode"] == mode and r["payload"] == payload and r["target"] == target)
                if not pts:
                    continue
                label = {"proxy": "ours", "nginx": "nginx", "direct": "direct (ceiling)"}[target]
                axes[0][i].plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
                if target != "direct":
                    axes[1][i].plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
            axes[0][i].set_title(f"{payload}, {mode}")
            for ax in (axes[0][i], axes[1][i]):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("concurrent connections")
                ax.grid(alpha=0.3)
            axes[0][i].set_ylabel("req/s")
            axes[1][i].set_ylabel("p99 latency (ms)")
            axes[0][i].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "http.png"), dpi=90)
        plt.close(fig)
        made.append("http.png")
    if ws_runs:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        for front, style in (("proxy", "o-"), ("nginx", "s--")):
            pts = sorted((n, j) for (f, n), j in ws_runs.items() if f == front)
            if not pts:
                continue
            label = "ours" if front == "proxy" else "nginx"
            ns = [n for n, _ in pts]
            ax[0].plot(ns, [j["publish_to_client"]["p50_ms"] for _, j in pts], style, label=f"{label} p50")
            ax[0].plot(ns, [j["publish_to_client"]["p99_ms"] for _, j in pts], style, alpha=0.6, label=f"{label} p99")
            ax[1].plot(ns, [j["first_chunk"]["p99_ms"] for _, j in pts], style, label=f"{label} p99")
        ax[0].axhline(10, color="red", lw=0.8, label="target p99 10 ms")
        ax[0].set_title("publish → client latency")
        ax[1].set_title("time to first chunk")
        for a in ax:
            a.set_xscale("log")
            a.set_xlabel("concurrent streams")
            a.set_ylabel("ms")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ws.png"), dpi=90)
        plt.close(fig)
        made.append("ws.png")
    return made


def main():
    raw, out_dir = sys.argv[1], sys.argv[2]
    machine = load_json(os.path.join(raw, "machine.json")) or {}
    rows = []
    if os.path.exists(os.path.join(raw, "http.csv")):
        with open(os.path.join(raw, "http.csv")) as f:
            rows = [r for r in csv.DictReader(f) if float(r["rps"]) > 0]
    http, targets = http_tables(rows)
    ws, ws_runs = ws_table(raw)
    idle, idle_runs = idle_table(raw)
    steady, steady_runs = steady_table(raw)
    micro = micro_table(raw)
    images = plots(list(medians(rows).values()), ws_runs, out_dir)

    def verdict(ok):
        return "met" if ok else "**missed**"

    goals = []
    if rows:
        for key, text in (("rps_ka", "keep-alive: req/s ours ≥ nginx"), ("cpu_ka", "keep-alive: CPU/request ours ≤ nginx"),
                          ("rps_new", "new connection: req/s ours ≥ 0.9 × nginx"),
                          ("cpu_new", "new connection: CPU/request ours ≤ 1.2 × nginx"),
                          ("p99", "p99 ours ≤ 1.2 × nginx")):
            v = targets[key]
            if v:
                missed = "; ".join(label for ok, label in v if not ok)
                goals.append(f"| {text} | {sum(ok for ok, _ in v)}/{len(v)} cells"
                             f"{f' (missed: {missed})' if missed else ''} | {verdict(all(ok for ok, _ in v))} |")
    for n in (100, 1000):
        ours, theirs = ws_runs.get(("proxy", n)), ws_runs.get(("nginx", n))
        if ours and theirs:
            p, q = ours["publish_to_client"]["p99_ms"], theirs["publish_to_client"]["p99_ms"]
            ok = (ours["lost_chunks_all"] == 0 and ours["duplicate_chunks_all"] == 0
                  and ours["complete_all"] == ours["chats_all"] and p <= q)
            goals.append(f"| {n:,} streams: 0 lost, 0 duplicated, p99 publish→client ≤ nginx's | lost "
                         f"{ours['lost_chunks_all']}, dup. {ours['duplicate_chunks_all']}, complete "
                         f"{ours['complete_all']}/{ours['chats_all']} over {ours['rounds']} rounds, median-round "
                         f"p99 {p:.2f} ms (nginx {q:.2f}), ours lower in {lower_rounds(ours, theirs)} | {verdict(ok)} |")
    s1000, t1000 = steady_runs.get(("proxy", 1000)), steady_runs.get(("nginx", 1000))
    if s1000 and t1000:
        p, q = s1000["publish_to_client"]["p99_ms"], t1000["publish_to_client"]["p99_ms"]
        ok = (s1000["lost_chunks_all"] == 0 and s1000["duplicate_chunks_all"] == 0
              and s1000["complete_all"] == s1000["chats_all"] and p <= q)
        goals.append(f"| the same, starts spread over {s1000.get('start_spread_ms', 0)} ms | lost {s1000['lost_chunks_all']}, "
                     f"dup. {s1000['duplicate_chunks_all']}, "
                     f"complete {s1000['complete_all']}/{s1000['chats_all']} over {s1000['rounds']} rounds, "
                     f"median-round p99 {p:.2f} ms (nginx {q:.2f}), ours lower in {lower_rounds(s1000, t1000)} | {verdict(ok)} |")
    if "proxy" in idle_runs:
        j = idle_runs["proxy"]
        goals.append(f"| 10,000 idle WebSockets held | {j['held']:,} of {j['requested']:,} | "
                     f"{verdict(j['held'] >= 10000)} |")
        mem = j.get("memory", {})
        for who, limit in (("proxy", 20), ("backends+ai", 10)):
            if who in mem:
                kb = mem[who]["kb_per_socket"]
                goals.append(f"| idle WebSocket ≤ {limit} KB in the {who.split('+')[0]} | {kb:.1f} KB | {verdict(kb <= limit)} |")

    m = machine
    md = [
        "# Benchmark results",
        "",
        f"Measured {m.get('date', '?')} on {m.get('nproc', '?')} × {m.get('cpu', '?')}, {m.get('mem_gb', '?')} GB, "
        f"Linux {m.get('kernel', '?')}; nginx {m.get('nginx', '?')}, wrk {m.get('wrk', '?')}; git {m.get('git', '?')}. "
        f"Load average before the run: {m.get('load_before', '?')}.",
        "",
        f"Proxy worker processes (one thread each) = nginx worker processes = {m.get('workers', '?')}; "
        + ("proxy/nginx pinned to CPU 1, everything else to CPU 0. " if m.get("pin") else "no CPU pinning (everything shares all cores). ")
        + "The machine is shared and noisy, so compare ratios measured in the same run, not absolute numbers "
        "across runs. Both fronts run without an access log (ours: `RUST_LOG=warn` drops the `access` "
        "target's info line; nginx: `access_log off`). Generated by `benches/run.sh`; raw data in `raw/`.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *goals,
        "",
        "## HTTP: 3 backends behind our proxy, nginx, or nothing",
        "",
        "wrk with 1-2 threads; one loopback client address, so both sticky policies (our per-IP ketama, "
        "nginx `ip_hash`) send everything to one backend, and *direct* (straight to that backend) is the ceiling. "
        "CPU is user+system time of the front process(es) from `/proc/PID/stat`. "
        + (f"Each cell ran {round_counts(rows)}, ours and nginx alternating "
           "(who goes first rotates); every figure below is the median of its rounds (raw rounds in `raw/http.csv`)."
           if rows and max(int(r.get('round') or 1) for r in rows) > 1 else "")
        + " wrk corrects its latencies for coordinated omission (every latency of at least two mean request intervals "
        "is recorded again at each interval below it), so one pause of a front worker of 100 ms in a 5 s round "
        "takes that round's p99 from about 1 ms to tens of ms (`benches/pause.sh`). " + steal_summary(rows, raw),
        *(["", "![HTTP](http.png)"] if "http.png" in images else []),
        *http,
        "",
        "## WebSocket streaming through the cluster",
        "",
        f"`cluster --conf benches/conf` (3 AI nodes + 3 backends in one process, bus: {m.get('bus', '?')}), "
        "our proxy or nginx in front of the same backends. Each session's socket connects, all wait for each other, "
        "then each sends 3 chats in turn (40 chunks each at 20 chunks/s after 20 ms, so N streams run at once). "
        "Publish→client is the AI node's `ts_us` stamp to the client's receipt, same clock; the load generator "
        "shares the machine." + stolen_rounds(raw),
        *(["", "![WebSocket](ws.png)"] if "ws.png" in images else []),
        "",
        *ws,
        *(["", "Steady load: the same streams, but the sessions' first chats start spread evenly over one "
           "chunk interval (50 ms), so answers are in random phase as real traffic is, instead of every "
           "answer's chunks being published in the same instants as above (a burst of N events every 50 ms).",
           "", *steady] if steady_runs else []),
        "",
        "## Idle WebSockets",
        "",
        "Sockets opened from 100 loopback source addresses, held 5 s; memory is the growth of resident memory "
        "(VmRSS) divided by sockets held. *backends+AI* is the cluster process (3 backends and 3 AI nodes); "
        "trust its figure from the first run only (ours): the second run reuses memory the allocator kept from "
        "the first. A proxied WebSocket takes two descriptors (client and backend) in the process that relays "
        "it: our relay worker takes tunnels up to its open-files limit less a reserve of 1,024 descriptors, "
        "and past that a worker relays its own (`websocket.relays`); each nginx worker relays its own.",
        "",
        *idle,
        "",
        "## Microbenchmarks (criterion)",
        "",
        *micro,
        "",
    ]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    main()
