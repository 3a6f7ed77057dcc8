"""Screenshots of the MLflow UI pages a team reads after ``blinaprofile train``.

Simulates small cohorts, featurizes and trains them into a temporary SQLite tracking store
(the project's public API: :func:`~blinaprofile.simulate.flow.simulate_cohort`,
:func:`~blinaprofile.features.flow.featurize_manifest`,
:func:`~blinaprofile.models.train.train`), starts ``mlflow server`` on ``127.0.0.1`` with a
free port and takes headless-Chromium screenshots of the experiment's runs list, a run's
overview, the registered model, a model version and the run comparison::

    .venv/bin/python scripts/mlflow_screenshots.py --out test-artifacts/mlflow

``tests/test_mlflow_ui.py`` runs the same functions (``--quick`` settings). The server is
stopped (its whole process group) however the script ends.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "test-artifacts" / "mlflow"
EXPERIMENT = "blinaprofile-ui"
REGISTERED_MODEL = "blinaprofile-ui-responder"
#: The MLflow 3.17 UI picks its GenAI or classic ML layout from this URL parameter (else
#: from the browser's remembered switch, GenAI by default): see docs/models.md.
ML_VIEW = "workflowType=machine_learning"

CONFIG = """\
experiment: {experiment}
registered_model: {model}
outer_folds: {outer}
inner_folds: 2
repeats: 1
n_bootstrap: {bootstrap}
n_permutations: {permutations}
seed: 3
models:
  - family: logreg_l2
    params: {{C: 0.3}}
  - family: xgboost
    params: {{n_estimators: 40, max_depth: 2, learning_rate: 0.1}}
"""


@dataclass(frozen=True)
class CohortPlan:
    """One simulated cohort to train on.

    Attributes
    ----------
    name
        Cohort name (run names ``<family> on <name>``).
    n_patients, seed
        Size and seed of the simulation (default scenario).
    """

    name: str
    n_patients: int
    seed: int


#: The script's default: a 60-patient cohort that meets the promotion rule (@champion), then
#: a 30-patient one that does not (@candidate), so the registry shows both aliases.
FULL_PLAN = (CohortPlan("sim-60", 60, 2), CohortPlan("sim-30", 30, 1))
#: The test's: one small cohort, no permutations (fast; lands at @candidate).
QUICK_PLAN = (CohortPlan("sim-30", 30, 1),)


@dataclass
class Store:
    """A tracking store with trained runs.

    Attributes
    ----------
    root
        Folder holding ``mlflow.db``, ``artifacts/`` and the cohorts.
    uri
        The SQLite tracking URI.
    experiment_id
        The experiment the runs are in.
    runs
        ``{cohort: run_id}`` of the training (parent) runs, in training order.
    versions
        ``{cohort: registered version}``.
    aliases
        ``{cohort: alias the version took}``.
    promotion_lines
        ``{cohort: TrainResult.promotion_line()}``.
    """

    root: Path
    uri: str
    experiment_id: str = ""
    runs: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    promotion_lines: dict[str, str] = field(default_factory=dict)


def init_store(root: Path) -> Store:
    """Create ``root/mlflow.db`` with the experiment (artifacts in ``root/artifacts``).

    Artifacts go beside the database rather than to ``./mlruns`` of the current folder.
    """
    import mlflow

    root.mkdir(parents=True, exist_ok=True)
    store = Store(root=root, uri=f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient(store.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    store.experiment_id = str(
        exp.experiment_id
        if exp is not None
        else client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    )
    return store


def train_plan(
    store: Store, *, plan: Sequence[CohortPlan] = FULL_PLAN, n_permutations: int = 20
) -> Store:
    """Simulate, featurize and train each cohort of ``plan`` into the store.

    Parameters
    ----------
    store
        From :func:`init_store`; its ``runs``, ``versions``, ``aliases`` and
        ``promotion_lines`` are filled in.
    plan
        The cohorts, trained in order into one experiment and registered model.
    n_permutations
        Label permutations per training (20 is the least that can meet ``p < 0.05``; 0 is
        fastest and never promotes).

    Returns
    -------
    Store
        The same store.
    """
    import pandas as pd

    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.atomic import write_csv
    from blinaprofile.models.train import train
    from blinaprofile.settings import settings
    from blinaprofile.simulate.flow import simulate_cohort

    cfg = store.root / "train.yaml"
    cfg.write_text(
        CONFIG.format(
            experiment=EXPERIMENT,
            model=REGISTERED_MODEL,
            outer=3 if n_permutations else 4,
            bootstrap=300,
            permutations=n_permutations,
        )
    )
    scen = load_config(SimulationConfig, settings.default_simulation)
    panel = load_config(PanelConfig, settings.default_panel)
    for c in plan:
        folder = store.root / c.name
        cohort = simulate_cohort(scen, folder, panel=panel, n_patients=c.n_patients, seed=c.seed)
        feats = write_csv(featurize_manifest(cohort.manifest), folder / "features.csv")
        res = train(
            pd.read_csv(feats),
            config_path=cfg,
            tracking_uri=store.uri,
            trained_on=f"simulated cohort '{scen.name}' (seed {c.seed}); NOT patient data",
            cohort=c.name,
            simulated=True,
            source=feats,
            progress=False,
        )
        store.runs[c.name] = res.run_id
        store.versions[c.name] = str(res.version)
        store.aliases[c.name] = res.alias
        store.promotion_lines[c.name] = res.promotion_line()
    return store


def load_store(root: Path) -> Store:
    """The :class:`Store` of an existing ``root/mlflow.db`` (filled by :func:`train_plan`)."""
    import mlflow

    store = Store(root=root, uri=f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient(store.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise FileNotFoundError(f"no experiment {EXPERIMENT!r} in {store.uri}")
    store.experiment_id = str(exp.experiment_id)
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases or {}
    by_version = {str(v): str(a) for a, v in aliases.items()}
    runs = client.search_runs(
        [store.experiment_id],
        filter_string="tags.`blinaprofile.run_kind` = 'training'",
        order_by=["attributes.start_time ASC"],
    )
    for r in runs:
        cohort, version = r.data.tags["blinaprofile.cohort"], r.data.tags["registered_version"]
        store.runs[cohort] = r.info.run_id
        store.versions[cohort] = version
        store.aliases[cohort] = by_version.get(version, "")
        store.promotion_lines[cohort] = r.data.tags.get("blinaprofile.promotion_reason", "")
    return store


# --------------------------------------------------------------------------- server
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*, store: Store, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start ``mlflow server`` on ``127.0.0.1:port`` over the store, in its own process group.

    Stop it with :func:`stop_server` (the group: ``mlflow server`` runs uvicorn workers).
    """
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        store.uri,
        "--default-artifact-root",
        (store.root / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("wb") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_for_server(
    url: str, *, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0
) -> None:
    """Wait until ``url/health`` answers 200.

    Raises
    ------
    RuntimeError
        The server exited or did not answer within ``timeout`` seconds (the message ends
        with its log).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"mlflow server at {url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group (then kill it if it lingers)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- pages
def pages(base: str, *, store: Store) -> dict[str, Page]:
    """``{screenshot name: Page}`` of the pages to capture (hash routes of the MLflow UI).

    The last-trained cohort's run and version are the ones opened; the comparison holds
    the per-family candidate runs of every training. Every URL carries
    ``workflowType=machine_learning`` (the classic ML layout: see docs/models.md).
    """
    import mlflow

    from blinaprofile.models.tracking import HEADLINE_TAGS, HEADLINE_VIEW

    client = mlflow.tracking.MlflowClient(store.uri)
    eid = store.experiment_id
    cohort = next(reversed(store.runs))
    run_id, version = store.runs[cohort], store.versions[cohort]
    run_name = client.get_run(run_id).info.run_name
    family_runs = [
        r.info.run_id
        for r in client.search_runs(
            [eid], filter_string="tags.`blinaprofile.run_kind` = 'candidate'"
        )
    ]
    compare = quote(json.dumps(family_runs), safe="")
    model = quote(REGISTERED_MODEL, safe="")
    return {
        "01_runs_list": Page(
            f"{base}/#/experiments/{eid}/runs?viewStateShareKey={HEADLINE_VIEW[0]}&{ML_VIEW}",
            ready=("Headline metrics", run_name, HEADLINE_TAGS[0]),
            height=900,
        ),
        "02_run_overview": Page(
            f"{base}/#/experiments/{eid}/runs/{run_id}?{ML_VIEW}",
            ready=("About this run", "Show more", "Metrics ("),
            height=1300,
        ),
        "03_registered_model": Page(
            f"{base}/#/models/{model}?{ML_VIEW}",
            ready=("Serving alias", f"Version {version}", "Registered at"),
            height=1300,
        ),
        "04_model_version": Page(
            f"{base}/#/models/{model}/versions/{version}?{ML_VIEW}",
            ready=("Source Run", "decision at training"),
            height=1200,
        ),
        "05_compare_runs": Page(
            f"{base}/#/compare-runs?runs={compare}&experiments={quote(json.dumps([eid]))}"
            f"&{ML_VIEW}",
            ready=("Comparing", "Run Name", "Metrics"),
            selector=".js-plotly-plot .parcoords",
            height=1800,
        ),
    }


def find_chromium() -> str | None:
    """The Chromium binary (``/usr/bin/chromium`` or on ``PATH``), else ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass(frozen=True)
class Page:
    """One page to capture.

    Attributes
    ----------
    url
        Its address.
    ready
        Texts the rendered page shows once its data has loaded (waited for, all of them:
        pages are hash routes of one app, so one text could still be the previous page's).
    height
        Viewport height in pixels (tall pages get a tall viewport: MLflow scrolls inside
        its own panes, so a capture shows the viewport only).
    selector
        A CSS selector that must match too (e.g. a plot drawn after the text shows).
    """

    url: str
    ready: tuple[str, ...]
    height: int = 1000
    selector: str | None = None


#: Run before any page script: the MLflow Assistant side panel, which MLflow 3.17 opens on
#: a browser's first visit to a local server, stays closed (it would cover a third of
#: every capture). Nothing else of the UI's remembered state is preset.
_PRESET = (
    "try {"
    " localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    " localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "} catch (e) {}"
)


class _DevTools:
    """A minimal Chrome DevTools Protocol client over one WebSocket (standard library only).

    Enough of RFC 6455 for a local Chromium: a client handshake, masked text frames out,
    unmasked (possibly fragmented) frames in.
    """

    def __init__(self, ws_url: str, *, timeout: float) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(ws_url)
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RuntimeError("DevTools closed the connection during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"DevTools refused the WebSocket: {head[:200]!r}")
        self._buf = head.split(b"\r\n\r\n", 1)[1]
        self._id = 0

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("DevTools closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _message(self) -> dict[str, Any]:
        data = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else b""
            payload = self._read(n)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            data += payload
            if b0 & 0x80:  # final fragment
                result: dict[str, Any] = json.loads(data)
                return result

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its ``result`` (events in between are dropped)."""
        self._id += 1
        body = json.dumps({"id": self._id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(body)
        if n < 126:
            head = struct.pack(">BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x81, 0x80 | 127, n)
        self._sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(body)))
        while True:
            msg = self._message()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                out: dict[str, Any] = msg.get("result", {})
                return out

    def close(self) -> None:
        self._sock.close()


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], *, timeout: float) -> int:
    """The port Chromium chose for DevTools (it writes ``DevToolsActivePort``)."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before DevTools came up")
        if marker.is_file():
            first = marker.read_text().split("\n", 1)[0].strip()
            if first.isdigit():
                return int(first)
        time.sleep(0.1)
    raise RuntimeError(f"chromium's DevTools did not come up in {timeout:.0f} s")


def screenshots(
    pages: dict[str, Page],
    out: Path,
    *,
    chromium: str,
    width: int = 1600,
    timeout: float = 45.0,
    settle: float = 1.5,
) -> dict[str, Path]:
    """Capture each page with one headless Chromium driven over the DevTools protocol.

    Each page is loaded, waited for until its ``ready`` texts show (then ``settle`` seconds
    for the last renders) and captured at ``width`` x ``page.height``. Chromium runs in its
    own process group with a fresh profile and is killed afterwards.

    Returns
    -------
    dict
        ``{name: png path}``.

    Raises
    ------
    RuntimeError
        Chromium or a page failed (a page whose text never showed is still captured, as
        ``<name>.timeout.png``, for diagnosis).
    """
    out.mkdir(parents=True, exist_ok=True)
    shots: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="blinaprofile-chromium-") as tmp:
        profile = Path(tmp)
        cmd = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},1000",
            "about:blank",
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            port = _devtools_port(profile, proc, timeout=timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            tab = _DevTools(page_ws, timeout=timeout)
            try:
                tab.call("Page.enable")
                tab.call("Page.addScriptToEvaluateOnNewDocument", source=_PRESET)
                for name, page in pages.items():
                    shots[name] = _capture_page(
                        tab, page, out, name=name, width=width, timeout=timeout, settle=settle
                    )
            finally:
                tab.close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return shots


def _capture_page(
    tab: _DevTools, page: Page, out: Path, *, name: str, width: int, timeout: float, settle: float
) -> Path:
    tab.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=page.height,
        deviceScaleFactor=1,
        mobile=False,
    )
    tab.call("Page.navigate", url=page.url)
    route = "#" + page.url.split("#", 1)[1].split("?", 1)[0]
    probe = (
        f"location.hash.split('?')[0] === {json.dumps(route)} && !!document.body && "
        f"{json.dumps(list(page.ready))}.every(t => document.body.innerText.includes(t))"
    )
    if page.selector:
        probe += f" && !!document.querySelector({json.dumps(page.selector)})"
    deadline = time.monotonic() + timeout
    ready = False
    while time.monotonic() < deadline:
        res = tab.call("Runtime.evaluate", expression=probe, returnByValue=True)
        if res.get("result", {}).get("value") is True:
            ready = True
            break
        time.sleep(0.25)
    time.sleep(settle)
    shot = tab.call("Page.captureScreenshot", format="png")
    png = out / (f"{name}.png" if ready else f"{name}.timeout.png")
    png.write_bytes(base64.b64decode(shot["data"]))
    if not ready:
        raise RuntimeError(
            f"{page.url} did not show all of {page.ready} within {timeout:.0f} s (see {png})"
        )
    return png


@contextmanager
def running_server(store: Store) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``mlflow server`` over the store on a free port; stop it on leaving.

    Yields its base URL and process right after starting it (it takes seconds to import:
    train meanwhile, then :func:`wait_for_server`).
    """
    port = free_port()
    proc = start_server(store=store, port=port, log=store.root / "mlflow-server.log")
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_server(proc)


def run(
    root: Path,
    out: Path,
    *,
    chromium: str,
    plan: Sequence[CohortPlan] = FULL_PLAN,
    n_permutations: int = 20,
) -> tuple[Store, dict[str, Path]]:
    """Train ``plan`` into ``root`` (or reuse the store there), serve it, capture the pages.

    The server starts while the cohorts train. Returns the store and ``{name: png}``.
    """
    reuse = (root / "mlflow.db").is_file()
    store = load_store(root) if reuse else init_store(root)
    with running_server(store) as (base, proc):
        if not reuse:
            train_plan(store, plan=plan, n_permutations=n_permutations)
        wait_for_server(base, proc=proc, log=store.root / "mlflow-server.log")
        return store, screenshots(pages(base, store=store), out, chromium=chromium)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, serve, screenshot; print where the PNGs are."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the tracking store here and reuse it when it exists (default: a "
        "temporary folder, deleted)",
    )
    ap.add_argument("--quick", action="store_true", help="one 30-patient cohort, no permutations")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    chromium = find_chromium()
    if chromium is None:
        print("error: no chromium on PATH", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        root = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="blinaprofile-ui-"))
        )
        t0 = time.perf_counter()
        store, shots = run(
            root,
            args.out,
            chromium=chromium,
            plan=QUICK_PLAN if args.quick else FULL_PLAN,
            n_permutations=0 if args.quick else 20,
        )
        for cohort, line in store.promotion_lines.items():
            print(f"trained {cohort}: v{store.versions[cohort]} @{store.aliases[cohort]}; {line}")
        print(f"{store.uri}: {len(shots)} pages captured in {time.perf_counter() - t0:.0f} s")
        for name, png in shots.items():
            print(f"{name:<22} {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
