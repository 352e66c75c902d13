#!/usr/bin/env python3
"""Load benchmark: the gateway against nginx against direct, in one run, on loopback.

    python3 benches/load/run.py [--duration 5] [--rounds 3] [--skip-build]
                                [--tls] [--tls-only] [--tls-rounds 1] [--tls-duration 5]
                                [--tls-concurrency 2000]

Plain: two nginx backends answer a canned chat completion (`return 200`), so the backend is not
ours. oha posts a chat request to the backend directly; to nginx as a round-robin upstream with
`proxy_next_upstream` (the peer); and to the aoai-tower gateway example (release build,
RetryNextBackend + Balance + AzureAuth with an api-key). Each at concurrency 1 and 32, in rounds
that alternate the targets (direct, nginx, gateway, then direct, gateway, nginx, ...), so that a
noisy neighbour hits all three alike; each figure is the median over the rounds. Reported:
requests per second, p50 and p99 latency, the proxy's CPU microseconds per request (all its
processes, user + system), its peak RSS and how many TCP connections to the backends carried its
requests (distinct connections in the backends' access logs); then the gateway/nginx ratios at
concurrency 32 against the bars (CPU per request at most 1.3x nginx's, RPS at least 0.8x nginx's).

TLS (`--tls`): the two backends are nginx terminating TLS with HTTP/2 on, with a server
certificate for 127.0.0.1 and localhost from a CA made for the run (openssl, or Python's
`cryptography`). The gateway reaches them as `https://127.0.0.1:PORT` with `--ca-file` naming
the CA (HTTP/2 by ALPN, many streams on one connection); nginx with `proxy_pass https://...`,
`proxy_ssl_verify on` (HTTP/1.1 with keep-alive: one connection per stream in flight). oha keeps
`--tls-concurrency` (2,000) HTTP/1.1 callers on each proxy. Reported: RPS, p99, the proxy's CPU
per request, peak RSS and connections to the backends.

Every run checks that every answer was 200 and that the backends split the proxied traffic
about 50/50 (exit status 1 if not). Needs nginx and oha (and openssl or Python's
`cryptography` for `--tls`); it says how to install what is missing. Not part of the test suite.
"""

import argparse
import json
import os
import re
import resource
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
CPU_BAR, RPS_BAR = 1.3, 0.8


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


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    return tuple(int(n) for n in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out).groups())


def nginx_conf(workdir, name, servers_block):
    path = os.path.join(workdir, f"{name}.conf")
    with open(path, "w") as f:
        f.write(
            f"""daemon off;
worker_processes auto;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{ worker_connections 16384; }}
http {{
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    fastcgi_temp_path {workdir}/{name}-fastcgi;
    uwsgi_temp_path {workdir}/{name}-uwsgi;
    scgi_temp_path {workdir}/{name}-scgi;
    keepalive_requests 1000000;
    log_format connection '$pid $connection';
{servers_block}
}}
"""
        )
    return path


def backends_block(workdir, ports, tls):
    """The two backends: a canned completion, one access log line per request naming the
    connection (nginx's `$pid $connection`) that carried it."""
    if tls:
        # `http2 on` from nginx 1.25.1; before it, a parameter of `listen`.
        new = nginx_version() >= (1, 25, 1)
        listen = "ssl reuseport backlog=4096" + ("" if new else " http2")
        tls_lines = f"""        {'http2 on;' if new else ''}
        http2_max_concurrent_streams 4096;
        ssl_certificate {workdir}/server.pem;
        ssl_certificate_key {workdir}/server.key;
"""
    else:
        listen, tls_lines = "reuseport backlog=4096", ""
    return "".join(
        f"""    server {{
        listen 127.0.0.1:{port} {listen};
{tls_lines}        access_log {workdir}/backend-{port}.log connection;
        location / {{ default_type application/json; return 200 '{CANNED}'; }}
    }}
"""
        for port in ports
    )


def peer_block(workdir, port, b1, b2, tls, keepalive):
    """nginx as the peer: a round-robin upstream over the two backends, retrying on the next."""
    scheme, tls_lines = "http", ""
    if tls:
        scheme = "https"
        tls_lines = f"""            proxy_ssl_trusted_certificate {workdir}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
"""
    return f"""    access_log off;
    upstream azure_openai {{
        server 127.0.0.1:{b1} max_fails=1 fail_timeout=10s;
        server 127.0.0.1:{b2} max_fails=1 fail_timeout=10s;
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location /openai/ {{
            proxy_pass {scheme}://azure_openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "bench-key";
            proxy_next_upstream error timeout http_429 http_500 http_502 http_503 http_504 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_buffering off;
{tls_lines}        }}
    }}
"""


def make_certificates(workdir):
    """A CA and a server certificate for 127.0.0.1 and localhost signed by it (P-256, one day),
    as ca.pem, server.pem and server.key in `workdir`; by the openssl CLI, or else by Python's
    `cryptography`."""
    if shutil.which("openssl"):
        def openssl(*args):
            subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
                "-subj", "/CN=aoai-tower bench CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
        with open(os.path.join(workdir, "server.ext"), "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", "server.ext", "-out", "server.pem")
        return "openssl"
    try:
        import datetime
        import ipaddress
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise SystemExit("--tls needs openssl (apt-get install -y openssl) or Python's "
                         "cryptography (pip install cryptography)")
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = dict.fromkeys(["content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "encipher_only", "decipher_only"], False)
    ca = certificate(name("aoai-tower bench CA"), name("aoai-tower bench CA"), ca_key, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage), True),
    ])
    server = certificate(name("localhost"), ca.subject, server_key, ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ])
    for file, data in (("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
                       ("server.pem", server.public_bytes(serialization.Encoding.PEM)),
                       ("server.key", server_key.private_bytes(
                           serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption()))):
        with open(os.path.join(workdir, file), "wb") as f:
            f.write(data)
    return "Python's cryptography"


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
    """User + system CPU seconds of `pids`, from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pids):
    """The sum of the peak resident set sizes (VmHWM) of `pids`."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except OSError:
            pass
    return total / 1024


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_lines(path, start):
    """The lines of `path` from byte `start` on."""
    try:
        with open(path) as f:
            f.seek(start)
            return f.read().splitlines()
    except OSError:
        return []


def oha(url, concurrency, duration):
    cmd = ["oha", "--no-tui", "--output-format", "json", "-z", f"{duration}s",
           "-c", str(concurrency), "-m", "POST", "-d", BODY,
           "-H", "content-type: application/json", url]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def measure(name, port, pid, concurrency, duration, logs):
    """One oha run against one target: its figures, the proxy's CPU and peak RSS, and how the
    backends saw the requests."""
    pids = process_tree(pid) if pid else []
    starts = [size(log) for log in logs]
    cpu_before = cpu_seconds(pids)
    result = oha(f"http://127.0.0.1:{port}{PATH}", concurrency, duration)
    cpu = cpu_seconds(pids) - cpu_before
    seen = [read_lines(log, start) for log, start in zip(logs, starts)]
    statuses = result.get("statusCodeDistribution", {})
    # oha ends a timed run by dropping the requests then in flight; nothing else may fail.
    errors = {e: n for e, n in result.get("errorDistribution", {}).items() if "deadline" not in e}
    total = sum(statuses.values())
    counts = [len(lines) for lines in seen]
    return {
        "rps": result["summary"]["requestsPerSec"],
        "p50_ms": result["latencyPercentiles"]["p50"] * 1000,
        "p99_ms": result["latencyPercentiles"]["p99"] * 1000,
        "cpu_us_per_req": cpu * 1e6 / total if pid and total else None,
        "peak_rss_mib": peak_rss_mib(process_tree(pid)) if pid else None,
        "all_200": total > 0 and set(statuses) == {"200"} and not errors,
        "errors": errors,
        "counts": counts,
        "balanced": name == "direct" or abs(counts[0] / max(1, sum(counts)) - 0.5) <= 0.02,
        # Distinct (worker, connection) pairs in the backends' logs: connections that carried
        # this run's requests.
        "connections": sum(len(set(lines)) for lines in seen),
    }


def measure_rounds(targets, concurrency, duration, rounds, logs):
    """Each target measured once a round, taking turns (the backend alone first, then the two
    proxies, which alternate going first): the samples by target name."""
    samples = {name: [] for name, _, _ in targets}
    direct = [t for t in targets if t[2] is None]
    proxies = [t for t in targets if t[2] is not None]
    for number in range(rounds):
        for name, port, pid in direct + (proxies if number % 2 == 0 else proxies[::-1]):
            samples[name].append(measure(name, port, pid, concurrency, duration, logs))
    return samples


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def median_row(name, concurrency, samples):
    """The median of each figure over the rounds; peak RSS is the highest seen."""
    rss = [s["peak_rss_mib"] for s in samples if s["peak_rss_mib"] is not None]
    return {
        "target": name,
        "concurrency": concurrency,
        **{key: median([s[key] for s in samples])
           for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "connections")},
        "peak_rss_mib": max(rss) if rss else None,
        "all_200": all(s["all_200"] for s in samples),
        "balanced": all(s["balanced"] for s in samples),
        "split": "/".join(str(sum(s["counts"][i] for s in samples)) for i in range(2)),
        "errors": [s["errors"] for s in samples if s["errors"]],
    }


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows):
    print("| target | concurrency | RPS | p50 ms | p99 ms | proxy CPU µs/req | proxy peak RSS MiB "
          "| connections to backends | all 200 | split |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['target']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {fmt(r['cpu_us_per_req'], '.1f')} | "
              f"{fmt(r['peak_rss_mib'], '.1f')} | {r['connections']:.0f} | "
              f"{'yes' if r['all_200'] else 'NO'} | {r['split']} |")
    for r in rows:
        for errors in r["errors"]:
            print(f"{r['target']} at c={r['concurrency']}: errors {errors}")


def ratios(rows, concurrency, samples):
    """The gateway's RPS and CPU per request over nginx's at `concurrency`, from the medians and
    within each round (the two proxies measured one right after the other)."""
    by = {r["target"]: r for r in rows if r["concurrency"] == concurrency}
    out = {}
    for key in ("rps", "cpu_us_per_req"):
        rounds = sorted(g[key] / n[key] for g, n in zip(samples["gateway"], samples["nginx"]))
        out[key] = (by["gateway"][key] / by["nginx"][key], rounds)
    return out


def print_bars(rows, samples):
    found = ratios(rows, 32, samples)
    print()
    for key, label, bar, holds in (
        ("cpu_us_per_req", "CPU per request", f"<= {CPU_BAR}", lambda r: r <= CPU_BAR),
        ("rps", "RPS", f">= {RPS_BAR}", lambda r: r >= RPS_BAR),
    ):
        ratio, rounds = found[key]
        print(f"gateway/nginx {label} at c=32: {ratio:.2f} (bar {bar}: "
              f"{'holds' if holds(ratio) else 'DOES NOT HOLD'}); within the rounds "
              + ", ".join(f"{r:.2f}" for r in rounds))


class Procs:
    """The processes this run started; all stopped at the end."""

    def __init__(self):
        self.procs = []

    def start(self, command, env=None):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGQUIT if proc.args[0] == "nginx" else signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_proxies(procs, workdir, gateway_bin, b1, b2, tls, keepalive):
    """nginx and the gateway in front of the two backends: their ports and processes."""
    peer, gw = free_port(), free_port()
    name = "peer-tls" if tls else "peer"
    conf = nginx_conf(workdir, name, peer_block(workdir, peer, b1, b2, tls, keepalive))
    nginx = procs.start(["nginx", "-c", conf, "-p", workdir])
    scheme = "https" if tls else "http"
    command = [gateway_bin, "--listen", f"127.0.0.1:{gw}", "--auth", "api-key",
               "--backend", f"b1={scheme}://127.0.0.1:{b1}",
               "--backend", f"b2={scheme}://127.0.0.1:{b2}"]
    if tls:
        command += ["--ca-file", os.path.join(workdir, "ca.pem")]
    # More gateway flags, to compare settings (`--workers 1`, say).
    command += os.environ.get("AOAI_GATEWAY_ARGS", "").split()
    env = dict(os.environ, AOAI_KEY_B1="bench-key", AOAI_KEY_B2="bench-key", RUST_LOG="warn")
    gateway = procs.start(command, env=env)
    for port in (peer, gw):
        wait_port(port)
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}{PATH}", data=BODY.encode(),
            headers={"content-type": "application/json"}), timeout=10).read()
    return [("nginx", peer, nginx.pid), ("gateway", gw, gateway.pid)]


def start_backends(procs, workdir, tls):
    b1, b2 = free_port(), free_port()
    name = "backends-tls" if tls else "backends"
    conf = nginx_conf(workdir, name, backends_block(workdir, (b1, b2), tls))
    procs.start(["nginx", "-c", conf, "-p", workdir])
    wait_port(b1)
    wait_port(b2)
    return b1, b2, [os.path.join(workdir, f"backend-{p}.log") for p in (b1, b2)]


def run_plain(workdir, gateway_bin, args):
    procs = Procs()
    try:
        b1, b2, logs = start_backends(procs, workdir, tls=False)
        targets = [("direct", b1, None)] + start_proxies(
            procs, workdir, gateway_bin, b1, b2, tls=False, keepalive=64)
        rows, samples = [], {}
        for concurrency in (1, 32):
            samples[concurrency] = measure_rounds(targets, concurrency, args.duration,
                                                  args.rounds, logs)
            rows += [median_row(name, concurrency, samples[concurrency][name])
                     for name, _, _ in targets]
        ok = all(r["all_200"] and r["balanced"] for r in rows)
        print(f"plain HTTP/1.1, {args.rounds} rounds of {args.duration} s, medians:")
        print()
        print_table(rows)
        print_bars(rows, samples[32])
        return ok
    finally:
        procs.stop()


def run_tls(workdir, gateway_bin, args):
    made_by = make_certificates(workdir)
    procs = Procs()
    try:
        b1, b2, logs = start_backends(procs, workdir, tls=True)
        # nginx keeps up to `keepalive` idle connections to the upstream per worker: as many as
        # there are callers, so that no request of the run waits for a new TLS handshake.
        targets = start_proxies(procs, workdir, gateway_bin, b1, b2, tls=True,
                                keepalive=args.tls_concurrency)
        # Fill the proxies' connection pools (nginx's connections, the gateway's handshakes).
        measure_rounds(targets, args.tls_concurrency, 2, 1, logs)
        samples = measure_rounds(targets, args.tls_concurrency, args.tls_duration,
                                 args.tls_rounds, logs)
        rows = [median_row(name, args.tls_concurrency, samples[name]) for name, _, _ in targets]
        print()
        print(f"TLS backends (nginx, HTTP/2 on; CA by {made_by}), {args.tls_concurrency} "
              f"HTTP/1.1 callers, {args.tls_rounds} round(s) of {args.tls_duration} s after a "
              f"2 s warm-up, medians:")
        print()
        print_table(rows)
        found = ratios(rows, args.tls_concurrency, samples)
        print()
        print(f"gateway/nginx with TLS backends: RPS {found['rps'][0]:.2f}, CPU per request "
              f"{found['cpu_us_per_req'][0]:.2f}; connections to the backends: gateway "
              f"{rows[1]['connections']:.0f}, nginx {rows[0]['connections']:.0f}")
        return all(r["all_200"] and r["balanced"] for r in rows)
    finally:
        procs.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per target, alternated")
    parser.add_argument("--skip-build", action="store_true", help="use the existing release build")
    parser.add_argument("--tls", action="store_true", help="also run the TLS scenario")
    parser.add_argument("--tls-only", action="store_true", help="run only the TLS scenario")
    parser.add_argument("--tls-rounds", type=int, default=1)
    parser.add_argument("--tls-duration", type=int, default=5)
    parser.add_argument("--tls-concurrency", type=int, default=2000)
    args = parser.parse_args()
    missing = [f"{tool} ({hint})" for tool, hint in (
        ("nginx", "apt-get install -y nginx-light"),
        ("oha", "cargo install oha --locked"),
    ) if not shutil.which(tool)]
    if missing:
        raise SystemExit("missing: " + ", ".join(missing))
    # oha, nginx and the gateway each hold thousands of sockets with --tls.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--example", "gateway"], cwd=ROOT, check=True)
    gateway_bin = os.path.join(ROOT, "target", "release", "examples", "gateway")

    workdir = tempfile.mkdtemp(prefix="aoai-load-")
    try:
        ok = True
        if not args.tls_only:
            ok &= run_plain(workdir, gateway_bin, args)
        if args.tls or args.tls_only:
            ok &= run_tls(workdir, gateway_bin, args)
        if not ok:
            print("FAILED: some answers were not 200, or the split was not about 50/50")
            sys.exit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
