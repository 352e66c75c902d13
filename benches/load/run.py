#!/usr/bin/env python3
"""Load benchmark: the gateway against nginx against direct, in one run, on loopback.

    python3 benches/load/run.py [--duration 5] [--rounds 3] [--skip-build] [--instructions N]

Two backends are served by nginx (`return 200` with a canned chat completion), so the backend is
not ours. Then, one after the other, oha loads: the backend directly; nginx as a round-robin
upstream with proxy_next_upstream (the peer); and the aoai-tower gateway example (release build,
RetryNextBackend + Balance + AzureAuth with an api-key). Each at concurrency 1 and 32, in
rounds that alternate the targets (direct, nginx, gateway, then direct, gateway, nginx, ...), so
that a noisy neighbour on a shared machine hits all three alike and neither proxy is always
measured right after the other; each figure is the median over the rounds.

Reported per target: requests per second, p50 and p99 latency, CPU microseconds per request of
the proxy process(es), and their peak RSS; then the same comparisons within each round, and
nginx and the gateway with one worker each at concurrency 32. It checks that every answer was
200 and that the two backends split the proxied traffic about 50/50.

With `--instructions N`, it then counts each proxy's user-space instructions per request over N
requests under valgrind's callgrind (nginx as one process, the gateway on one core), and how many
of them are atomic read-modify-write instructions (found with objdump): figures that do not move
with the machine's other load, unlike the CPU times. It also counts, at concurrency 1, the
instructions on each proxy's two critical paths (from its wake-up to a request to the request's
send to the backend, and from its wake-up to the answer to the answer's send to the caller):
the proxy's own share of the latency it adds, which the measured p99 at concurrency 1 is too
noisy on a shared machine to compare.

Needs nginx (`apt-get install nginx-light`) and oha (`cargo install oha`), and valgrind for
`--instructions`; it says so if one is missing.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
BODY = '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'
CANNED = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1732500000,'
    '"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"Hello! How can I help you today?"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def nginx_conf(workdir, name, servers_block, single_process=False):
    path = os.path.join(workdir, f"{name}.conf")
    processes = "worker_processes 1;\nmaster_process off;" if single_process else "worker_processes auto;"
    with open(path, "w") as f:
        f.write(
            f"""daemon off;
{processes}
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    fastcgi_temp_path {workdir}/{name}-fastcgi;
    uwsgi_temp_path {workdir}/{name}-uwsgi;
    scgi_temp_path {workdir}/{name}-scgi;
    keepalive_requests 1000000;
{servers_block}
}}
"""
        )
    return path


def peer_block(port, b1, b2):
    """nginx as the peer: a round-robin upstream over the two backends, retrying on the next."""
    return f"""    access_log off;
    upstream azure_openai {{
        server 127.0.0.1:{b1} max_fails=1 fail_timeout=10s;
        server 127.0.0.1:{b2} max_fails=1 fail_timeout=10s;
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location /openai/ {{
            proxy_pass http://azure_openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "bench-key";
            proxy_next_upstream error timeout http_429 http_500 http_502 http_503 http_504 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_buffering off;
        }}
    }}
"""


def gateway_command(gateway_bin, port, b1, b2):
    return [gateway_bin, "--listen", f"127.0.0.1:{port}",
            "--backend", f"b1=http://127.0.0.1:{b1}", "--backend", f"b2=http://127.0.0.1:{b2}",
            "--auth", "api-key"]


def run_under_callgrind(name, command, port, env, concurrency, requests, options, begin, end):
    """Runs the proxy `name`'s `command` (listening on `port`) on one core under callgrind with
    `options`, warms it up with 2,000 requests at `concurrency`, and sends `requests` more
    between the `callgrind_control` commands `begin` and `end`; its process id."""
    proc = subprocess.Popen(
        ["taskset", "-c", "0", "valgrind", "--tool=callgrind"] + options + command,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=120)
        url = f"http://127.0.0.1:{port}{PATH}"
        load = ["oha", "--no-tui", "-c", str(concurrency), "-m", "POST", "-d", BODY,
                "-H", "content-type: application/json"]
        subprocess.run(load + ["-n", "2000", url], check=True, capture_output=True)
        subprocess.run(["callgrind_control"] + begin + [str(proc.pid)], check=True,
                       capture_output=True)
        subprocess.run(load + ["-n", str(requests), url], check=True, capture_output=True)
        subprocess.run(["callgrind_control"] + end + [str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        proc.send_signal(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.pid


def instructions_per_request(name, command, port, env, requests, workdir):
    """User-space instructions per proxied request at concurrency 32, counted by valgrind's
    callgrind, and how many of them are atomic read-modify-write instructions: the proxy runs on
    one core (one worker), is warmed up, then its counters are zeroed, `requests` are sent, and
    the counters dumped. Instruction counts do not depend on what else the machine is doing, so
    this compares the two proxies' own work without noise (it does not see cache misses or the
    kernel's work). An atomic instruction (`lock`-prefixed, or `xchg` with memory) costs about
    as much as a few dozen plain ones, uncontended: reference counts, locks, task wake-ups."""
    out = os.path.join(workdir, f"{name}.callgrind")
    pid = run_under_callgrind(name, command, port, env, 32, requests,
                              ["--dump-instr=yes", f"--callgrind-out-file={out}.%p"],
                              ["-z"], ["-d"])
    total, per_object = executed_instructions(f"{out}.{pid}.1")
    return total / requests, atomic_instructions(per_object) / requests


# Where a proxy's critical path at concurrency 1 begins and ends: it wakes up (its `epoll_wait`
# returns) to a request, or to the backend's answer, and the path ends where it sends that on
# (`send` for the gateway, `writev` for nginx; not `write`, which tokio also uses to wake its
# own event loop). An accepted connection tells where a request's pair of paths begins.
WAKE_UP_CALLS = ("epoll_wait", "recv", "recvfrom")
SEND_CALLS = ("send", "sendto", "writev")
ACCEPT_CALLS = ("accept", "accept4")


def critical_path_instructions(name, command, port, env, requests, workdir):
    """User-space instructions on each of the proxy's two critical paths at concurrency 1, as
    the medians over `requests` requests, counted by callgrind: from its wake-up to a caller's
    request to the request's send to the backend, and from its wake-up to the backend's answer
    to the answer's send to the caller. They are what a request waits on, where work after a
    send is done while the other side works: the proxy's own share of the latency it adds, which,
    unlike the measured p99, does not move with the machine's other load (it does not see cache
    misses or the kernel's work)."""
    out_dir = os.path.join(workdir, f"{name}-path")
    os.makedirs(out_dir, exist_ok=True)
    triggers = [f"--dump-after={call}" for call in WAKE_UP_CALLS + ACCEPT_CALLS]
    triggers += [f"--dump-before={call}" for call in SEND_CALLS]
    pid = run_under_callgrind(name, command, port, env, 1, requests,
                              ["--instr-atstart=no", f"--callgrind-out-file={out_dir}/out.%p"]
                              + triggers, ["-i", "on"], ["-i", "off"])
    # One dump per trigger, numbered in order: each holds what ran since the one before.
    dumps = []
    for entry in os.listdir(out_dir):
        prefix, _, number = entry.rpartition(".")
        if prefix == f"out.{pid}" and number.isdigit():
            dumps.append((int(number), os.path.join(out_dir, entry)))
    # At concurrency 1 the sends alternate: a request to the backend, then its answer to the
    # caller, from the connection's accept on. The connection's first request, which also
    # accepts it, is left out.
    to_backend, to_caller = [], []
    woke = None
    sends = None
    for _, path in sorted(dumps):
        trigger, count = dump_trigger_and_count(path)
        when, _, call = trigger.partition("=")
        if when == "--dump-before":
            # A send the proxy did not wake up for is no critical path, but is counted.
            if sends is not None:
                if woke is not None and sends >= 2:
                    (to_backend if sends % 2 == 0 else to_caller).append(woke + count)
                sends += 1
            woke = None
        elif call in ACCEPT_CALLS:
            sends = 0
        elif call == "epoll_wait":
            woke = 0
        elif woke is not None:
            woke += count
    shutil.rmtree(out_dir, ignore_errors=True)
    if len(to_caller) < requests // 2:
        raise SystemExit(f"{name}: {len(to_backend)} and {len(to_caller)} critical paths for "
                         f"{requests} requests")
    return median(to_backend), median(to_caller)


def dump_trigger_and_count(path):
    """What made callgrind write the dump at `path`, and the instructions it counts."""
    trigger, count = "", 0
    with open(path) as f:
        for line in f:
            if line.startswith("desc: Trigger:"):
                trigger = line.split(":", 2)[2].strip()
            elif line.startswith(("summary:", "totals:")):
                count = int(line.split()[1])
    return trigger, count


def executed_instructions(path):
    """The total instruction count of a callgrind profile made with --dump-instr=yes, and for
    each object file, how often each of its instruction addresses ran."""
    total = None
    per_object = {}
    names = {}
    counts = None
    address = 0
    call_cost = False
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
            elif line.startswith("ob="):
                number, _, name = line[3:].strip().partition(" ")
                if name:
                    names[number] = name
                counts = per_object.setdefault(names.get(number, number), {})
            elif line.startswith("cob="):
                number, _, name = line[4:].strip().partition(" ")
                if name:
                    names[number] = name
            elif line.startswith("calls="):
                call_cost = True  # the next cost line is a call's inclusive cost
            elif line[:1] in "0123456789+-*" and counts is not None:
                fields = line.split()
                if len(fields) < 3:
                    continue
                position = fields[0]
                if position.startswith("0x"):
                    address = int(position, 16)
                elif position[0] in "+-":
                    address += int(position)
                if call_cost:
                    call_cost = False
                    continue
                counts[address] = counts.get(address, 0) + int(fields[2])
    if total is None:
        raise SystemExit(f"no instruction count in {path}")
    return total, per_object


def atomic_instructions(per_object):
    """How many of the executed instructions were atomic read-modify-writes, found by
    disassembling each object file (callgrind reports addresses as the file has them)."""
    total = 0
    for path, counts in per_object.items():
        if not os.path.isfile(path):
            continue
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                                 capture_output=True, text=True).stdout
        for line in listing.splitlines():
            address, colon, instruction = line.partition(":")
            instruction = instruction.strip()
            if not colon or not (instruction.startswith("lock ")
                                 or (instruction.startswith("xchg") and "(" in instruction)):
                continue
            try:
                total += counts.get(int(address.strip(), 16), 0)
            except ValueError:
                pass
    return total


def process_tree(pid):
    """pid and its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        pids += children
        frontier += children
    return pids


def cpu_seconds(pids):
    """User and system CPU seconds of `pids`, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user / ticks, system / ticks


def peak_rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def oha(url, concurrency, duration, headers):
    cmd = [
        "oha", "--no-tui", "--output-format", "json", "-z", f"{duration}s",
        "-c", str(concurrency), "-m", "POST", "-d", BODY,
        "-H", "content-type: application/json",
    ]
    for header in headers:
        cmd += ["-H", header]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per target, alternated")
    parser.add_argument("--skip-build", action="store_true", help="use the existing release build")
    parser.add_argument("--instructions", type=int, default=0, metavar="N",
                        help="also count each proxy's instructions per request over N requests "
                             "under valgrind's callgrind (needs valgrind)")
    args = parser.parse_args()
    tools = [("nginx", "apt-get install nginx-light"), ("oha", "cargo install oha")]
    if args.instructions:
        tools.append(("valgrind", "apt-get install valgrind"))
    for tool, hint in tools:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: {hint}")
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--example", "gateway"], cwd=ROOT, check=True)
    gateway_bin = os.path.join(ROOT, "target", "release", "examples", "gateway")

    workdir = tempfile.mkdtemp(prefix="aoai-load-")
    procs = []
    try:
        b1, b2, peer, gw = free_port(), free_port(), free_port(), free_port()
        servers = "".join(
            f"""    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        access_log {workdir}/backend-{port}.log;
        location / {{ default_type application/json; return 200 '{CANNED}'; }}
    }}
"""
            for port in (b1, b2)
        )
        backends_conf = nginx_conf(workdir, "backends", servers)
        peer_conf = nginx_conf(workdir, "peer", peer_block(peer, b1, b2))
        procs.append(subprocess.Popen(["nginx", "-c", backends_conf, "-p", workdir]))
        wait_port(b1)
        wait_port(b2)
        peer_proc = subprocess.Popen(["nginx", "-c", peer_conf, "-p", workdir])
        procs.append(peer_proc)
        wait_port(peer)
        env = dict(os.environ, AOAI_KEY_B1="bench-key", AOAI_KEY_B2="bench-key", RUST_LOG="warn")
        gateway_proc = subprocess.Popen(
            gateway_command(gateway_bin, gw, b1, b2), env=env, stdout=subprocess.DEVNULL,
        )
        procs.append(gateway_proc)
        wait_port(gw)
        # Warm up keep-alive pools.
        for port in (peer, gw):
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}{PATH}", data=BODY.encode(),
                headers={"content-type": "application/json"})).read()

        targets = [
            ("direct", b1, None),
            ("nginx", peer, peer_proc.pid),
            ("gateway", gw, gateway_proc.pid),
        ]
        logs = [os.path.join(workdir, f"backend-{p}.log") for p in (b1, b2)]
        rows = []
        rounds = {}
        ok = True
        for concurrency in (1, 32):
            samples, all_ok = measure_rounds(targets, concurrency, args, logs)
            ok &= all_ok
            for name, _, _ in targets:
                rows.append(median_row(name, concurrency, samples[name]))
            rounds[concurrency] = samples
        print_table(rows)
        print_ratios(rows)
        print_round_spread(rounds)
        ok &= compare_one_worker(workdir, gateway_bin, env, b1, b2, args, logs, procs)
        if args.instructions:
            single_peer, single_gateway = free_port(), free_port()
            single_conf = nginx_conf(
                workdir, "peer-single", peer_block(single_peer, b1, b2), single_process=True
            )
            counted = {
                "nginx": instructions_per_request(
                    "nginx", ["nginx", "-c", single_conf, "-p", workdir], single_peer, None,
                    args.instructions, workdir),
                "gateway": instructions_per_request(
                    "gateway", gateway_command(gateway_bin, single_gateway, b1, b2),
                    single_gateway, env, args.instructions, workdir),
            }
            (nginx_all, nginx_atomic), (gateway_all, gateway_atomic) = (
                counted["nginx"], counted["gateway"])
            print(f"instructions per proxied request (callgrind, one worker, c=32, "
                  f"{args.instructions} requests): nginx {nginx_all:.0f}, gateway "
                  f"{gateway_all:.0f} ({gateway_all / nginx_all:.2f}x); of them atomic: "
                  f"nginx {nginx_atomic:.1f}, gateway {gateway_atomic:.1f}")
            path_requests = min(args.instructions, 500)
            on_path = {
                "nginx": critical_path_instructions(
                    "nginx", ["nginx", "-c", single_conf, "-p", workdir], single_peer, None,
                    path_requests, workdir),
                "gateway": critical_path_instructions(
                    "gateway", gateway_command(gateway_bin, single_gateway, b1, b2),
                    single_gateway, env, path_requests, workdir),
            }
            nginx_path, gateway_path = sum(on_path["nginx"]), sum(on_path["gateway"])
            print(f"instructions on the critical path at c=1 (callgrind, median of "
                  f"{path_requests} requests; wake-up to the request's send + wake-up to the "
                  f"answer's send): nginx {on_path['nginx'][0]:.0f} + {on_path['nginx'][1]:.0f}"
                  f" = {nginx_path:.0f}, gateway {on_path['gateway'][0]:.0f} + "
                  f"{on_path['gateway'][1]:.0f} = {gateway_path:.0f} "
                  f"({gateway_path / nginx_path:.2f}x)")
        if not ok:
            print("FAILED: some answers were not 200, or the split was not about 50/50")
            sys.exit(1)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM if proc.args[0] != "nginx" else signal.SIGQUIT)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def measure(name, port, pid, concurrency, duration, logs):
    """One oha run against one target: its figures, and the proxy's CPU and peak RSS."""
    pids = process_tree(pid) if pid else []
    before_user, before_system = cpu_seconds(pids)
    before_counts = [count_lines(log) for log in logs]
    result = oha(f"http://127.0.0.1:{port}{PATH}", concurrency, duration, [])
    after_user, after_system = cpu_seconds(pids)
    user, system = after_user - before_user, after_system - before_system
    counts = [count_lines(log) - c for log, c in zip(logs, before_counts)]
    summary = result["summary"]
    statuses = result.get("statusCodeDistribution", {})
    total = sum(statuses.values())
    split = counts[0] / max(1, sum(counts))
    latency = result["latencyPercentiles"]
    return {
        "rps": summary["requestsPerSec"],
        "p50_ms": latency["p50"] * 1000,
        "p99_ms": latency["p99"] * 1000,
        "cpu_us_per_req": (user + system) * 1e6 / total if pid and total else None,
        "user_us_per_req": user * 1e6 / total if pid and total else None,
        "sys_us_per_req": system * 1e6 / total if pid and total else None,
        "peak_rss_mib": peak_rss_kib(process_tree(pid)) / 1024 if pid else None,
        "all_200": total > 0 and set(statuses) == {"200"},
        "balanced": name == "direct" or abs(split - 0.5) <= 0.02,
        "counts": counts,
    }


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def median_row(name, concurrency, samples):
    """The median of each figure over the rounds; peak RSS is the highest seen."""
    counts = [sum(s["counts"][i] for s in samples) for i in range(2)]
    rss = [s["peak_rss_mib"] for s in samples if s["peak_rss_mib"] is not None]
    return {
        "target": name,
        "concurrency": concurrency,
        "rps": median([s["rps"] for s in samples]),
        "p50_ms": median([s["p50_ms"] for s in samples]),
        "p99_ms": median([s["p99_ms"] for s in samples]),
        "cpu_us_per_req": median([s["cpu_us_per_req"] for s in samples]),
        "user_us_per_req": median([s["user_us_per_req"] for s in samples]),
        "sys_us_per_req": median([s["sys_us_per_req"] for s in samples]),
        "peak_rss_mib": max(rss) if rss else None,
        "all_200": all(s["all_200"] for s in samples),
        "split": f"{counts[0]}/{counts[1]}",
    }


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def cpu_cell(row):
    if row["cpu_us_per_req"] is None:
        return "-"
    return (f"{row['cpu_us_per_req']:.1f} ({row['user_us_per_req']:.1f} + "
            f"{row['sys_us_per_req']:.1f})")


def print_table(rows):
    print("| target | concurrency | RPS | p50 ms | p99 ms | proxy CPU µs/req (user + sys) "
          "| proxy peak RSS MiB | all 200 | split |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(
            f"| {r['target']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {cpu_cell(r)} | "
            f"{fmt(r['peak_rss_mib'], '.1f')} | {'yes' if r['all_200'] else 'NO'} | {r['split']} |"
        )


def print_ratios(rows):
    by = {(r["target"], r["concurrency"]): r for r in rows}
    g32, n32 = by[("gateway", 32)], by[("nginx", 32)]
    g1, n1, d1 = by[("gateway", 1)], by[("nginx", 1)], by[("direct", 1)]
    print()
    print(f"gateway/nginx RPS at c=32: {g32['rps'] / n32['rps']:.2f} (target >= 1)")
    print(f"gateway/nginx CPU per request at c=32: "
          f"{g32['cpu_us_per_req'] / n32['cpu_us_per_req']:.2f} (target <= 1)")
    added_g = g1["p99_ms"] - d1["p99_ms"]
    added_n = n1["p99_ms"] - d1["p99_ms"]
    print(f"added p99 at c=1: gateway {added_g:.3f} ms, nginx {added_n:.3f} ms (target: gateway <= nginx)")
    print(f"gateway peak RSS at c=32: {g32['peak_rss_mib']:.1f} MiB (target < 32)")


def compare_one_worker(workdir, gateway_bin, env, b1, b2, args, logs, procs):
    """nginx with one worker process against the gateway with one worker thread, at
    concurrency 32, in rounds that alternate them: each proxy as one event loop, so that what
    is compared is the work per request rather than how the kernel spreads two workers of each
    over the two cores they share with the load and the backends. Returns whether every answer
    was 200 and split about 50/50."""
    nginx_port, gateway_port = free_port(), free_port()
    conf = nginx_conf(workdir, "peer-one", peer_block(nginx_port, b1, b2), single_process=True)
    nginx_proc = subprocess.Popen(["nginx", "-c", conf, "-p", workdir])
    procs.append(nginx_proc)
    gateway_proc = subprocess.Popen(
        gateway_command(gateway_bin, gateway_port, b1, b2) + ["--workers", "1"],
        env=env, stdout=subprocess.DEVNULL,
    )
    procs.append(gateway_proc)
    wait_port(nginx_port)
    wait_port(gateway_port)
    targets = [("nginx", nginx_port, nginx_proc.pid), ("gateway", gateway_port, gateway_proc.pid)]
    samples, ok = measure_rounds(targets, 32, args, logs)
    rows = [median_row(name, 32, samples[name]) for name, _, _ in targets]
    print()
    print("one worker each (nginx `worker_processes 1`, gateway `--workers 1`):")
    print()
    print_table(rows)
    print()
    for label, key in (("RPS", "rps"), ("CPU per request", "cpu_us_per_req")):
        print(f"gateway/nginx {label} at c=32, one worker each: "
              f"{rows[1][key] / rows[0][key]:.2f}; within each round "
              + spread(round_ratios(samples, key), ".2f"))
    return ok


def measure_rounds(targets, concurrency, args, logs):
    """Each of `targets` measured once a round, taking turns, for `args.rounds` rounds: the
    samples by target name, and whether every answer was 200 and split about 50/50."""
    samples = {name: [] for name, _, _ in targets}
    ok = True
    for number in range(args.rounds):
        for name, port, pid in round_order(targets, number):
            sample = measure(name, port, pid, concurrency, args.duration, logs)
            ok &= sample["all_200"] and sample["balanced"]
            samples[name].append(sample)
    return samples, ok


def round_order(targets, number):
    """The order of `targets` in round `number`: the backend alone first, then the proxies,
    which take turns going first."""
    direct = [target for target in targets if target[2] is None]
    proxies = [target for target in targets if target[2] is not None]
    return direct + (proxies if number % 2 == 0 else proxies[::-1])


def round_ratios(samples, key):
    """The gateway's figure `key` over nginx's, round by round."""
    return [g[key] / n[key] for g, n in zip(samples["gateway"], samples["nginx"])]


def spread(values, spec):
    """The median of `values` and their range, formatted with `spec`."""
    values = sorted(values)
    return (f"median {format(median(values), spec)}, rounds {format(values[0], spec)} to "
            f"{format(values[-1], spec)}")


def print_round_spread(rounds):
    """The same comparisons within each round (the two proxies measured one right after the
    other), as the median and the range over the rounds: how far one run's verdict can be
    trusted on this machine."""
    g1, n1 = rounds[1]["gateway"], rounds[1]["nginx"]
    print()
    print("within each round:")
    print("  gateway/nginx RPS at c=32: " + spread(round_ratios(rounds[32], "rps"), ".2f"))
    print("  gateway/nginx CPU per request at c=32: "
          + spread(round_ratios(rounds[32], "cpu_us_per_req"), ".2f"))
    print("  gateway p99 minus nginx p99 at c=1, µs: "
          + spread([(g["p99_ms"] - n["p99_ms"]) * 1000 for g, n in zip(g1, n1)], "+.0f"))


if __name__ == "__main__":
    main()
