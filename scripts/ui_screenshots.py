"""Look at llmpipe's runs as a user does: headless-Chromium screenshots of the MLflow and Prefect UIs.

    python scripts/ui_screenshots.py [--out /tmp/llmpipe-screens] [--workdir DIR] [--keep-servers]

In a fresh workdir (the tests' tiny fixture: a 1-layer model, seconds per run) it starts this
workdir's Prefect server and MLflow UI (`llmpipe server start`), runs `llmpipe run evaluate spam` and
then the same with `--set spam.lr=1e-4`, and saves:

    1-runs-table.png        the experiment's runs table (Model training view)
    2-pretrain-chart.png    the pretrain child's model metrics (train_loss, val_loss curves)
    3-registered-model.png  the registered model llmpipe-tiny-spam (versions, aliases)
    4-prefect-flow-run.png  the Prefect flow run page (name, task graph with artifacts, logs)
    5-parent-overview.png   the second parent run's Overview (description, metrics, params)
    6-prefect-summary-artifact.png, 7-prefect-pretrain-artifact.png   the flow's table, pretrain's markdown

Needs Debian's chromium (`apt-get install -y chromium`). Not part of the test suite; the images are
not committed. The servers are stopped at the end unless --keep-servers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def llmpipe(wd: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMPIPE_PREFECT="server")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--workdir", str(wd)], capture_output=True,
                       text=True, env=env, cwd=wd)
    if p.returncode != 0:
        sys.exit(f"llmpipe {' '.join(args)} failed: {p.stderr[-3000:]}")
    sys.stderr.write(p.stderr[-1500:])
    return p.stdout


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found: apt-get install -y chromium")


def shot(url: str, out: Path, wait_ms: int = 20000, size: str = "1600,1000") -> None:
    profile = tempfile.mkdtemp(prefix="llmpipe-chromium-")
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--hide-scrollbars", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
           f"--screenshot={out}", url]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"{out}  <- {url}" if out.exists() else f"FAILED {url}")


def latest_artifact(api_url: str, key: str) -> str:
    """The id of the newest Prefect artifact with this key (its page shows the content)."""
    import urllib.request

    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api_url.rstrip('/')}/artifacts/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        found = json.loads(r.read())
    return found[0]["id"] if found else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/llmpipe-screens")
    ap.add_argument("--workdir", help="use this workdir (default: a fresh one with the tests' tiny fixture)")
    ap.add_argument("--keep-servers", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

    wd = Path(a.workdir) if a.workdir else write_fixture_workdir(Path(tempfile.mkdtemp(prefix="llmpipe-ui-")))
    import yaml

    config: dict = {}  # the fixture's small-model settings as a --config file: short run names
    for o in TEST_OVERRIDES:
        key, _, value = o.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    (wd / "fixture.yaml").write_text(yaml.safe_dump(config))
    sets = ["--config", str(wd / "fixture.yaml")]
    llmpipe(wd, "server", "start", "prefect", "mlflow", "--prefect-port", "0", "--mlflow-port", "0")
    try:
        state = {n: json.loads((wd / ".llmpipe" / f"{n}.json").read_text()) for n in ("prefect", "mlflow")}
        first = json.loads(llmpipe(wd, "run", "evaluate", "spam", *sets, "--json").strip().splitlines()[-1])
        second = json.loads(llmpipe(wd, "run", "evaluate", "spam", *sets, "--set", "spam.lr=1e-4",
                                    "--json").strip().splitlines()[-1])
        url = llmpipe(wd, "ui", "--no-browser").strip().splitlines()[-1]  # re-uses the running MLflow UI
        print(f"llmpipe ui: {url}")
        from flows.tracking import Tracker

        tr = Tracker(wd)
        eid = tr.experiment_id
        ml = state["mlflow"]["url"].rstrip("/")
        pf = state["prefect"]["url"].rstrip("/")
        pre = first["stages"]["pretrain"]["run_id"]
        shot(f"{ml}/#/experiments/{eid}/runs", out / "1-runs-table.png")
        shot(f"{ml}/#/experiments/{eid}/runs/{pre}/model-metrics", out / "2-pretrain-chart.png", size="1600,1400")  # taller: plots stay unrendered
        shot(f"{ml}/#/models/llmpipe-tiny-spam", out / "3-registered-model.png")
        shot(f"{pf}/runs/flow-run/{second['prefect_flow_run_id']}", out / "4-prefect-flow-run.png", size="1600,1400")
        shot(f"{ml}/#/experiments/{eid}/runs/{second['pipeline_run_id']}", out / "5-parent-overview.png",
             size="1600,2600")
        for name, key in (("6-prefect-summary-artifact.png", "llmpipe-summary"),
                          ("7-prefect-pretrain-artifact.png", "pretrain-summary")):
            shot(f"{pf}/artifacts/artifact/{latest_artifact(state['prefect']['api_url'], key)}", out / name)
        print(f"workdir {wd}; MLflow {ml}; Prefect {pf}")
    finally:
        if not a.keep_servers:
            llmpipe(wd, "server", "stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
