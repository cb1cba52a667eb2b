"""A stand-in for ``python -m sglang.launch_server``: serves /health on --port, spawns a child.

GET /get_server_info answers ``{"weight_version": ...}`` from ``--weight-version``, as SGLang.
Environment: FAKE_STATE_DIR (where it writes its argv and the pids of itself and its child),
FAKE_FAIL=1 (exit at once with an error), FAKE_DELAY (seconds before /health answers),
FAKE_WEIGHT_VERSION (report this version instead: another server answering on the port).
"""

import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
version = argv[argv.index("--weight-version") + 1] if "--weight-version" in argv else "default"
version = os.environ.get("FAKE_WEIGHT_VERSION", version)
state = os.environ["FAKE_STATE_DIR"]
if os.environ.get("FAKE_FAIL"):
    print("fake launcher: CUDA out of memory (simulated)", flush=True)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(state, f"server-{port}.json"), "w") as handle:
    json.dump({"argv": argv, "pids": [os.getpid(), child.pid]}, handle)
time.sleep(float(os.environ.get("FAKE_DELAY", "0")))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b""
        if self.path == "/get_server_info":
            body = json.dumps({"weight_version": version}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
