"""Hung-instance soak (issue #21): the gateway example (attempt timeout 2 s) over an instance
that accepts and never answers and one that answers at once, sixteen callers in a loop for a
minute. Prints how many requests reached the hung instance, in bursts (one burst a
re-admission), and the callers' latency percentiles.

    cargo build --release --example gateway
    python3 benches/soak/hung_instance.py target/release/examples/gateway

About a minute; everything on loopback; not part of the test suite."""
import os, socket, subprocess, sys, threading, time, urllib.request, http.server

GATEWAY = sys.argv[1]
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
hung_port, ok_port, gw_port = free_port(), free_port(), free_port()
hung_requests = []
def hung():
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", hung_port)); ls.listen(1024)
    def serve(c):
        buf = b""
        while True:
            d = c.recv(65536)
            if not d: return
            buf += d
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                hung_requests.append(time.monotonic())
    while True:
        c, _ = ls.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=hung, daemon=True).start()
class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        b = b'{"choices":[]}'
        self.send_response(200); self.send_header("content-length", str(len(b))); self.end_headers(); self.wfile.write(b)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", ok_port), Ok); srv.daemon_threads = True
threading.Thread(target=srv.serve_forever, daemon=True).start()
gw = subprocess.Popen([GATEWAY, "--listen", f"127.0.0.1:{gw_port}", "--attempt-timeout", "2",
                       "--backend", f"hung=http://127.0.0.1:{hung_port}", "--backend", f"ok=http://127.0.0.1:{ok_port}"],
                      env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.5)
URL = f"http://127.0.0.1:{gw_port}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
lat, stop = [], {"s": False}
def caller():
    while not stop["s"]:
        t0 = time.monotonic()
        try:
            r = urllib.request.urlopen(urllib.request.Request(URL, data=b"{}", headers={"content-type": "application/json"}), timeout=30); r.read()
        except Exception: pass
        lat.append(time.monotonic() - t0)
threads = [threading.Thread(target=caller, daemon=True) for _ in range(16)]
for t in threads: t.start()
time.sleep(60); stop["s"] = True
for t in threads: t.join(35)
gw.terminate()
lat.sort()
q = lambda p: lat[min(len(lat)-1, int(p*len(lat)))]*1000
print(f"requests {len(lat)}, to the hung instance {len(hung_requests)}, p50 {q(.5):.1f} ms p99 {q(.99):.1f} ms p99.9 {q(.999):.1f} ms max {lat[-1]*1000:.0f} ms")
ts = hung_requests; bursts = []
for t in ts:
    if bursts and t - bursts[-1][-1] < 1.0: bursts[-1].append(t)
    else: bursts.append([t])
print("requests per re-admission:", [len(b) for b in bursts])
