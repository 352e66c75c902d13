"""Token-endpoint outage soak (issue #21): the gateway example with managed identity against a
fake App Service identity endpoint handing out 40 s tokens, two emulated instances, eight
callers in a loop; the endpoint hangs, then answers 500, then refuses connections, then comes
back. Prints, per phase, the statuses and the worst caller latency, and how long after the
endpoint's return the first 200 came.

    cargo build --release --example gateway
    python3 benches/soak/token_outage.py target/release/examples/gateway

About two minutes; everything on loopback; not part of the test suite."""
import json, os, socket, subprocess, sys, threading, time, http.server, urllib.request

GATEWAY = sys.argv[1]
MODE = {"m": "ok"}
LIFETIME = 40

class Identity(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        mode = MODE["m"]
        if mode == "hang":
            time.sleep(3600); return
        if mode in ("500", "refuse"):
            self.send_response(500); self.send_header("content-length", "4"); self.end_headers(); self.wfile.write(b"down"); return
        body = json.dumps({"access_token": "tok-%d" % time.time(), "expires_on": str(int(time.time()) + LIFETIME),
                           "resource": "https://cognitiveservices.azure.com", "token_type": "Bearer"}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

id_port = free_port()
server = http.server.ThreadingHTTPServer(("127.0.0.1", id_port), Identity)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
gw_port = free_port()
env = dict(os.environ, IDENTITY_ENDPOINT=f"http://127.0.0.1:{id_port}/msi/token", IDENTITY_HEADER="secret", RUST_LOG="warn")
gw = subprocess.Popen([GATEWAY, "--listen", f"127.0.0.1:{gw_port}", "--auth", "managed-identity"], env=env,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
URL = f"http://127.0.0.1:{gw_port}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
BODY = b'{"messages":[{"role":"user","content":"Hello"}]}'
time.sleep(2)
records = []
stop = {"s": False}
def caller():
    while not stop["s"]:
        t0 = time.monotonic()
        try:
            r = urllib.request.urlopen(urllib.request.Request(URL, data=BODY, headers={"content-type": "application/json"}), timeout=120)
            status = r.status; r.read()
        except urllib.error.HTTPError as e:
            status = e.code; e.read()
        except Exception:
            status = 0
        records.append((t0, time.monotonic() - t0, status))
        time.sleep(0.05)
threads = [threading.Thread(target=caller, daemon=True) for _ in range(8)]
for t in threads: t.start()
phases = [("ok", 20), ("hang", 45), ("500", 20), ("refuse", 20), ("ok", 20)]
marks = []
for mode, secs in phases:
    if mode == "refuse":
        server.shutdown(); server.server_close()
    elif MODE["m"] == "refuse" or (mode == "ok" and marks and marks[-1][0] == "refuse"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", id_port), Identity); server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    MODE["m"] = mode
    marks.append((mode, time.monotonic()))
    time.sleep(secs)
stop["s"] = True
for t in threads: t.join(130)
gw.terminate()
ends = [m[1] for m in marks[1:]] + [time.monotonic()]
for (mode, start), end in zip(marks, ends):
    rs = [r for r in records if start <= r[0] < end]
    statuses = {}
    for r in rs: statuses[r[2]] = statuses.get(r[2], 0) + 1
    worst = max((r[1] for r in rs), default=0)
    print(f"{mode:7s} {end-start:5.1f}s requests {len(rs):5d} statuses {statuses} worst {worst*1000:.0f} ms")
back = marks[-1][1]
first_ok = min((r[0] + r[1] for r in records if r[0] >= back and r[2] == 200), default=None)
print("first 200 after the endpoint's return:", None if first_ok is None else f"{(first_ok-back)*1000:.0f} ms")
