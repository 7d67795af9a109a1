"""Public pages under load: the grid's server-side cost and the production server's throughput.

    python bench/bench_pages.py [--photos 48] [--repeat 300] [--seconds 10] [--connections 32]

Merges key "pages" into bench/results.json:

- ``grid_ms_p50``: the grid view for a page of ``--photos`` photos whose serving sets have the
  full ladder ready (17 variant URLs each), called in-process on an open connection with the
  production settings (DEBUG off, so the cached template loader), median of ``--repeat``
  calls; ``grid_cpu_ms_p50`` the same in this process's CPU time (steadier on a shared
  machine). Beside them ``request_ms_p50`` (the same page through the whole middleware stack
  with the test client, including the new database connection every request makes), and the
  parts of the view: the query (``query_ms_p50``), the tiles with their ``<picture>`` sources
  (``tiles_ms_p50``) and the template (``template_ms_p50``).
- ``grid_rps``, ``static_rps``, ``grid_over_static``: ``wrk -t1 -c<connections> -d<seconds>s``
  pinned to CPU 0 with ``taskset`` against the production server command (the Dockerfile's
  ``CMD``, on a free loopback port) pinned to CPU 1, for ``/`` and for a static file
  WhiteNoise serves (``/static/gallery/site.css``). The embedded Postgres is not pinned.
  With them the CPU milliseconds per request of the server's processes and of Postgres
  (``grid_server_cpu_ms_per_req``, ``grid_db_cpu_ms_per_req``, ``static_server_cpu_ms_per_req``):
  on a shared machine other processes take wall time, not these.

Prerequisites: Debian's ``wrk`` (``apt-get install -y wrk``) and ``taskset`` (util-linux); without
them the load part is skipped with a line saying so (``available`` False for it), and the
in-process figures are still recorded. The machine's load average is recorded with the
figures: on a shared machine they move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from _common import REPO, bench_database, log, merge_result, temp_media, wait_for_quiet

GRID_PATH = "/"
STATIC_PATH = "/static/gallery/site.css"
# The production settings redirect plain http to https; a TLS-terminating proxy says https.
PROXY_HEADER = "X-Forwarded-Proto"


def production_env(static_root: Path) -> None:
    """Production settings (DEBUG off, DATABASE_URL, a real secret) before Django reads them.

    DATABASE_URL points at the embedded server (its unix socket); bench_database() rewrites
    its database name to the throwaway one, and the server subprocess inherits it.
    """
    if not os.environ.get("DATABASE_URL"):
        from picsite.embedded_pg import ensure_running

        cfg = ensure_running()
        os.environ["DATABASE_URL"] = f"postgres://{cfg['USER']}@{quote(cfg['HOST'], safe='')}:{cfg['PORT']}/postgres"
    os.environ.update(
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost,testserver",
        PICSITE_PROXY_SSL_HEADER=PROXY_HEADER,
        PICSITE_STATIC_ROOT=str(static_root),
        PICSITE_LOG_LEVEL="WARNING",
    )


def seed(*, photos: int) -> None:
    """``photos`` + 1 live photos (a next page exists), each serving a versioned set of the
    whole ladder, ready up to its largest tier."""
    from gallery.models import Image, VariantSet
    from gallery.services import variant_recipe_current

    recipe = variant_recipe_current()
    for n in range(photos + 1):
        width, height = (4000, 3000) if n % 3 else (2000, 3000)
        image = Image.objects.create(
            original=f"originals/bench/photo{n}.jpg",
            title=f"Bench photo {n}",
            image_key=f"variants/{secrets.token_hex(16)}",
            width=width,
            height=height,
            blurhash="LEHV6nWB2yk8pyo0adR*.7kCMdnj",
            ready_max_width=max(recipe.tier_widths(width)),
            variants_ready=True,
            variants_recipe=recipe.version,
        )
        widths = recipe.tier_widths(width)
        image.serving_set = VariantSet.objects.create(
            image=image, state="serving", recipe_version=recipe.version, key_version=secrets.token_hex(6),
            storage_kind="local", folder="gallery", widths=widths, formats=["avif", "webp"],
            ready_max_width=max(widths),
        )  # fmt: skip
        image.save(update_fields=["serving_set"])


def _p50(samples: list[float]) -> float:
    return round(statistics.median(samples), 2)


def in_process(*, photos: int, repeat: int) -> dict:
    """Server-side milliseconds of the grid (see the module docstring)."""
    from django.contrib.auth.models import AnonymousUser
    from django.db import connection
    from django.template.loader import render_to_string
    from django.test import Client, RequestFactory

    from gallery import views
    from gallery.selectors import gallery_page

    factory = RequestFactory()

    def view_call() -> bytes:
        request = factory.get(GRID_PATH, secure=True)
        request.user = AnonymousUser()
        response = views.grid(request)
        assert response.status_code == 200
        return response.content

    html = view_call().decode()
    pictures = html.count("<picture>")
    urls = len(re.findall(r"/media/v/\S+?\.(?:avif|webp)", html))
    assert pictures == photos, f"expected {photos} <picture>s, got {pictures}"

    def timed(fn, n: int, clock=time.perf_counter) -> list[float]:
        fn()
        samples = []
        for _ in range(n):
            start = clock()
            fn()
            samples.append((clock() - start) * 1000)
        return samples

    connection.ensure_connection()
    grid = timed(view_call, repeat)
    # This process's CPU time alone: steadier than wall time on a shared machine (it leaves
    # out Postgres' share and the waits for a busy CPU).
    grid_cpu = timed(view_call, repeat, clock=time.thread_time)

    page = gallery_page(before_id=None, page_size=views.GRID_PAGE_SIZE)
    tiles = views.grid_tiles(page.images)
    request = factory.get(GRID_PATH, secure=True)
    request.user = AnonymousUser()
    query_ms = timed(lambda: gallery_page(before_id=None, page_size=views.GRID_PAGE_SIZE), repeat)
    source_ms = timed(lambda: views.grid_tiles(page.images), repeat)
    template_ms = timed(
        lambda: render_to_string("gallery/grid.html", {"page": page, "tiles": tiles}, request=request), repeat
    )

    client = Client()
    request_ms = timed(lambda: client.get(GRID_PATH, secure=True), max(50, repeat // 3))
    return {
        "photos": photos,
        "variant_urls_per_page": urls,
        "grid_ms_p50": _p50(grid),
        "grid_ms_p95": round(statistics.quantiles(grid, n=20)[18], 2),
        "grid_cpu_ms_p50": _p50(grid_cpu),
        "query_ms_p50": _p50(query_ms),
        "tiles_ms_p50": _p50(source_ms),
        "template_ms_p50": _p50(template_ms),
        "request_ms_p50": _p50(request_ms),
        "repeat": repeat,
    }


# --- load: wrk against the production server command -----------------------------------------


def production_command(*, port: int) -> list[str]:
    """The Dockerfile's CMD (exec form), run from this venv on a loopback port."""
    text = (REPO / "Dockerfile").read_text()
    match = re.search(r"^CMD\s+(\[.*\])\s*$", text, flags=re.M)
    if not match:
        raise SystemExit("no exec-form CMD in the Dockerfile")
    cmd = json.loads(match.group(1))
    program = {"python": [sys.executable], "uvicorn": [sys.executable, "-m", "uvicorn"]}
    out = [*program.get(cmd[0], [cmd[0]]), *cmd[1:]]
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in out:
            out[out.index(flag) + 1] = value
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={PROXY_HEADER: "https"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not answering {url} after {timeout}s")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _tree_cpu_s(pid: int | None) -> float:
    """CPU seconds of a process, its live descendants and its reaped children."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _postmaster_pid() -> int | None:
    """The embedded Postgres' postmaster (its backends are its children), if it is the one in use."""
    from picsite.embedded_pg import pgdata_dir

    try:
        return int((pgdata_dir() / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wrk(url: str, *, connections: int, seconds: int, server_pid: int | None = None) -> dict:
    """One ``wrk`` run pinned to CPU 0: requests/s, latency percentiles (ms), errors, and the
    CPU milliseconds per request the server and Postgres spent (steadier than requests/s on
    a shared machine: other processes take wall time, not these CPU seconds)."""
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           "-H", f"{PROXY_HEADER}: https", url]  # fmt: skip
    postmaster = _postmaster_pid()
    server_cpu, db_cpu = _tree_cpu_s(server_pid), _tree_cpu_s(postmaster)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    server_cpu, db_cpu = _tree_cpu_s(server_pid) - server_cpu, _tree_cpu_s(postmaster) - db_cpu
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    result: dict = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    if server_pid is not None and requests:
        result["server_cpu_ms"] = round(1000 * server_cpu / requests, 2)
        result["db_cpu_ms"] = round(1000 * db_cpu / requests, 2) if postmaster else None
    for pct in ("50", "90", "99"):
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, flags=re.M)
        if found:
            result[f"p{pct}_ms"] = round(float(found.group(1)) * _UNITS[found.group(2)], 1)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return result


def _server_workers(proc: subprocess.Popen) -> int:
    """Processes serving requests: the server's children (uvicorn's workers), else itself."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    python_children = [c for c in children if "python" in c.name().lower() and "resource_tracker" not in " ".join(c.cmdline())]
    return len(python_children) or 1


def under_load(*, connections: int, seconds: int, photos: int) -> dict:
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        log(f"[pages] SKIPPED the load part: {', '.join(missing)} not installed (apt-get install -y wrk)")
        return {"load_available": False, "load_skipped_reason": f"{', '.join(missing)} not installed"}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = production_command(port=port)
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), PYTHONUNBUFFERED="1")
    log(f"[pages] server: taskset -c 1 {' '.join(cmd)}")
    with tempfile.TemporaryFile() as server_log:
        proc = subprocess.Popen(
            ["taskset", "-c", "1", *cmd], cwd=REPO, env=env, stdout=server_log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            _wait_up(base + "/healthz", proc)
            status, body = _get(base + GRID_PATH)
            assert status == 200 and body.count(b"<picture>") == photos, "the grid did not render its photos"
            assert _get(base + STATIC_PATH)[0] == 200
            time.sleep(1.0)  # every worker up
            workers = _server_workers(proc)
            wrk(base + GRID_PATH, connections=connections, seconds=2)  # warm-up
            grid = wrk(base + GRID_PATH, connections=connections, seconds=seconds, server_pid=proc.pid)
            wrk(base + STATIC_PATH, connections=connections, seconds=2)
            static = wrk(base + STATIC_PATH, connections=connections, seconds=seconds, server_pid=proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            if proc.returncode not in (0, -signal.SIGTERM):
                server_log.seek(0)
                log(server_log.read().decode(errors="replace")[-3000:])
    return {
        "load_available": True,
        "server_command": " ".join(["taskset", "-c", "1", *cmd]).replace(sys.executable, "python"),
        "server_workers": workers,
        "wrk": f"taskset -c 0 wrk -t1 -c{connections} -d{seconds}s",
        "grid_rps": round(grid["rps"], 1),
        "grid_p50_ms": grid.get("p50_ms"),
        "grid_p99_ms": grid.get("p99_ms"),
        "grid_errors": grid["errors"],
        "grid_server_cpu_ms_per_req": grid.get("server_cpu_ms"),
        "grid_db_cpu_ms_per_req": grid.get("db_cpu_ms"),
        "static_rps": round(static["rps"], 1),
        "static_p50_ms": static.get("p50_ms"),
        "static_errors": static["errors"],
        "static_server_cpu_ms_per_req": static.get("server_cpu_ms"),
        "grid_over_static": round(grid["rps"] / static["rps"], 3) if static["rps"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=48, help="photos on the page (the grid's page size is 48)")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-load", action="store_true", help="in-process figures only")
    args = parser.parse_args(argv)

    busy = wait_for_quiet()
    with tempfile.TemporaryDirectory(prefix="picsite-bench-static-") as static_root:
        production_env(Path(static_root))
        with temp_media(), bench_database(name=os.environ.get("PICSITE_BENCH_DB", "picsite_bench_pages")):
            from django.core.management import call_command

            call_command("collectstatic", interactive=False, verbosity=0)
            seed(photos=args.photos)
            load_before = os.getloadavg()[0]
            result = {"cpu_busy_before": busy, "cpus": os.cpu_count()}
            result.update(in_process(photos=args.photos, repeat=args.repeat))
            log(f"[pages] in-process: {json.dumps(result)}")
            if not args.no_load:
                result.update(under_load(connections=args.connections, seconds=args.seconds, photos=args.photos))
            result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    merge_result("pages", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
