"""The web console behind a real nginx (Debian's) configured with the README's own server block: a client's
forged X-Forwarded-For never becomes its address."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from s3_server import free_port
from web_rig import WebServer, web_settings

README = Path(__file__).resolve().parent.parent / "README.md"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (tests/system/packages.sh)")


def readme_server_block(listen: int, console: int) -> str:
    """The README's nginx block, over plain HTTP on a free port, with password logins (its auth_basic lines
    are for web.auth: proxy) and pointed at the console under test."""
    block = re.search(r"```nginx\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if "auth_basic" not in line and "X-Remote-User" not in line]
    block = "\n".join(lines).replace("listen 443 ssl http2;", f"listen 127.0.0.1:{listen};")
    assert "proxy_pass http://127.0.0.1:8470;" in block and "X-Forwarded-For $remote_addr" in block
    return block.replace("127.0.0.1:8470", f"127.0.0.1:{console}")


@pytest.fixture
def nginx(tmp_path):
    settings = {"base_dir": str(tmp_path), "logging": {"console": False},
                **web_settings(trusted_proxies=["127.0.0.1"], login_attempts=3, login_delay_seconds=60)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    web = WebServer(tmp_path / "config.yaml").start()
    port, run = free_port(), tmp_path / "nginx"
    run.mkdir()
    temps = "\n".join(f"{name}_temp_path {run / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                      "scgi"))
    (run / "nginx.conf").write_text(f"pid {run / 'nginx.pid'};\nerror_log {run / 'error.log'};\nevents {{}}\n"
                                    f"http {{\naccess_log off;\n{temps}\n{readme_server_block(port, web.port)}\n}}\n")
    proc = subprocess.Popen([NGINX, "-e", str(run / "error.log"), "-p", str(run), "-c", str(run / "nginx.conf"),
                             "-g", "daemon off; master_process off;"])
    deadline = time.monotonic() + 10
    while True:
        try:
            requests.get(f"http://127.0.0.1:{port}/favicon.ico", timeout=1)
            break
        except requests.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, (run / "error.log").read_text()
            time.sleep(0.05)
    yield web, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    web.stop()


def test_behind_the_readmes_nginx_a_forged_forwarded_for_is_overwritten_so_guessing_is_slowed(nginx):
    web, url = nginx
    alice = web.client(None, source="127.0.0.60")
    alice.url = url
    alice.get("/login")
    forged = {"X-Forwarded-For": "203.0.113.9"}
    logged_in = alice.http.post(url + "/login", headers=forged, timeout=30,
                                data={"user": "alice", "password": "alice-pass-1", "csrf": alice.csrf})
    assert logged_in.status_code == 200 and logged_in.url.endswith("/jobs")
    # nginx said who connected to it, and the console believed nginx (a trusted proxy) and no one else.
    assert [s.address for s in web.app.state.console.store.web.sessions()] == ["127.0.0.60"]
    guesser = web.client(None, source="127.0.0.61")
    guesser.url = url
    guesser.get("/login")
    answers = [guesser.http.post(url + "/login", headers={"X-Forwarded-For": f"198.51.100.{i}"}, timeout=30,
                                 data={"user": f"mallory{i}", "password": "guess", "csrf": guesser.csrf})
               for i in range(5)]
    assert [a.status_code for a in answers] == [401, 401, 401, 429, 429]
