"""A static OpenAI-shaped backend for the proxy benchmark: nginx answering every request at once.

    python bench/static_backend.py PORT        (a gpud `command` engine template: ... static_backend.py {port})

It writes a one-worker nginx config for PORT into a temp dir and execs nginx on it, so gpud supervises nginx
itself. Every path answers 200 with a small completion body (nginx reads and discards a request body), and
/health answers 200: a backend that costs next to nothing, so a proxy in front of it is measured, not it.
"""

from __future__ import annotations

import os
import sys
import tempfile

BODY = ('{"id":"cmpl-static","object":"text_completion","created":0,"model":"static","choices":'
        '[{"index":0,"text":" ok","logprobs":null,"finish_reason":"length"}],'
        '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')


def config(port: int, workdir: str) -> str:
    temp = "\n".join(f"    {kind}_temp_path {workdir}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            default_type application/json;
            return 200 '{BODY}';
        }}
    }}
}}
"""


def main() -> int:
    port = int(sys.argv[1])
    workdir = tempfile.mkdtemp(prefix=f"gpud-static-{port}-")
    path = os.path.join(workdir, "nginx.conf")
    with open(path, "w") as fh:
        fh.write(config(port, workdir))
    os.execvp("nginx", ["nginx", "-c", path, "-p", workdir])


if __name__ == "__main__":
    raise SystemExit(main())
