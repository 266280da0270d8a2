"""A local stand-in for the Hugging Face Hub's HTTP API: the calls huggingface_hub makes for
create_repo and upload_folder (preupload, commit), served on 127.0.0.1; it records what arrives."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self, token: str = "hf_standin_token"):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str, dict]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials"})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    hub.repos.setdefault(repo, {"private": private, "files": {}})
                    return self._send(200, {"url": f"http://{self.headers['Host']}/{repo}"})
                if self.path == "/api/validate-yaml":  # the Hub checks a README's front matter before a commit
                    import yaml

                    content = json.loads(body).get("content", "")
                    try:
                        yaml.safe_load(content.split("---")[1] if content.startswith("---") else "")
                    except yaml.YAMLError as exc:
                        return self._send(400, {"error": f"invalid front matter: {exc}"})
                    return self._send(200, {"errors": [], "warnings": []})
                parts = self.path.split("/")
                if self.path.startswith("/api/models/") and "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if self.path.startswith("/api/models/") and "/commit/" in self.path:
                    repo = "/".join(parts[3:5])
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            v = item["value"]
                            hub.repos[repo]["files"][v["path"]] = base64.b64decode(v["content"])
                    return self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/1",
                                            "commitOid": "1" * 40, "success": True})
                return self._send(404, {"error": f"not in the stand-in: {self.path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                return self._send(404, {"error": f"not in the stand-in: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
