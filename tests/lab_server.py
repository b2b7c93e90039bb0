"""Helpers for the browser test: a throwaway JupyterLab server and a smoke-sized copy of a notebook.

The server runs from this interpreter's environment on a free localhost port, with its root, settings, workspaces,
runtime files and IPython profile in a temp dir, so a test leaves nothing in the user's home. Its kernels import
this checkout's ``v3kit`` (``PYTHONPATH`` = the repo root).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nbformat
from jupyter_core.paths import jupyter_data_dir

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
START_TIMEOUT_S = 60.0


def kernelspec() -> dict[str, str]:
    """The ``v3kit`` kernel when it is registered (``make setup`` does that), else ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    name = "v3kit" if "v3kit" in manager.find_kernel_specs() else "python3"
    return {"name": name, "display_name": manager.get_kernel_spec(name).display_name, "language": "python"}


def read_notebook(name: str) -> nbformat.NotebookNode:
    """``notebooks/<name>``: the jupytext ``.py`` source when there is one, else the ``.ipynb``."""
    script = NB_DIR / f"{name}.py"
    if script.exists():
        import jupytext

        return jupytext.read(str(script))
    return nbformat.read(str(NB_DIR / f"{name}.ipynb"), as_version=4)


def smoke_copy(name: str, dest_dir: Path, parameters: Mapping[str, Any]) -> Path:
    """Write ``dest_dir/<name>.ipynb`` with ``parameters`` injected after its ``parameters`` cell (as papermill does)
    and its kernel set to :func:`kernelspec`; return the path."""
    from papermill.parameterize import parameterize_notebook

    nb = read_notebook(name)
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        raise ValueError(f"notebooks/{name} has no cell tagged 'parameters'; tag the cell that sets smoke/run_dir")
    spec = kernelspec()
    nb.metadata["kernelspec"] = spec
    nb.metadata.pop("jupytext", None)  # a plain .ipynb: nothing for Lab's jupytext extension to pair or sync
    nb.metadata.setdefault("language_info", {"name": "python"})
    for cell in nb.cells:
        cell.metadata.setdefault("tags", [])  # papermill reads every cell's tags and its own metadata
    nb.metadata["papermill"] = {}
    nb = parameterize_notebook(nb, dict(parameters), kernel_name=spec["name"], language="python")
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
    path = dest_dir / f"{name}.ipynb"
    nbformat.write(nb, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    token: str
    root_dir: Path
    log: Path

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """Shut kernels down through the API (they run in their own sessions), then end the server's group."""
        if self.process.poll() is None:
            try:
                self.api("/api/shutdown", method="POST")
                self.process.wait(timeout=15)
            except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


def start_lab(base: Path, root_dir: Path) -> LabServer:
    """Start ``jupyter lab`` (no browser) serving ``root_dir``; its settings and runtime files live under ``base``.
    Returns once ``/api/status`` answers with the token."""
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(os.environ)
    for var in ("MPLBACKEND", "V3KIT_LIVE", "JUPYTER_TOKEN"):
        env.pop(var, None)  # the kernel keeps its inline backend and live plotting
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    dirs = {
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "IPYTHONDIR": "ipython",
        "JUPYTERLAB_SETTINGS_DIR": "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
    }
    # The user's own data dir stays on the search path: a `v3kit` kernel registered with --user must still be found.
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (jupyter_data_dir(), env.get("JUPYTER_PATH", "")) if p)
    for var, sub in dirs.items():
        (base / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(base / sub)
    # No news/update toasts over the notebook.
    notify = base / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notify.mkdir(parents=True, exist_ok=True)
    (notify / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = base / "jupyter-lab.log"
    for attempt in range(3):  # another process may grab the free port before the server binds it
        with open(log, "wb") as out:
            process = subprocess.Popen(
                cmd, env=env, cwd=str(root_dir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = LabServer(process, f"http://127.0.0.1:{port}", token, root_dir, log)
        if _wait_ready(server):
            return server
        server.stop()
        if "already in use" not in server.log_tail(20000) or attempt == 2:
            break
        port = free_port()
        cmd = [f"--ServerApp.port={port}" if a.startswith("--ServerApp.port=") else a for a in cmd]
    raise RuntimeError(f"jupyter lab did not start within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def _wait_ready(server: LabServer) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            server.api("/api/status")
            return True
        except (OSError, urllib.error.URLError):
            time.sleep(0.3)
    return False
