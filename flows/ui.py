"""`llmpipe ui`: open the MLflow UI on the project's store and print the experiment's URL.

    llmpipe ui [--port 5000] [--workdir .] [--no-browser]

Starts the MLflow UI in the background on the workdir's store (the same service as
`llmpipe server start mlflow`; it keeps running, `llmpipe server stop mlflow` stops it), or re-uses
the one already running, then prints `http://127.0.0.1:<port>/#/experiments/<id>/runs` and opens it in a
browser when one is available. With MLFLOW_TRACKING_URI pointing at a tracking server it only prints
that server's experiment URL.

MLflow 3 opens experiments on its GenAI view unless the experiment says it is for model training:
llmpipe tags its experiment `mlflow.experimentKind = custom_model_development`, so the runs table
("Model training") is what opens.
"""
from __future__ import annotations

import os
import sys
import webbrowser
from pathlib import Path

from flows.server import start_service
from flows.tracking import get_tracker, is_remote

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def mark_training_experiment(tracker) -> None:
    """Tag the experiment as model training (once), so MLflow 3 opens its runs table."""
    try:
        exp = tracker.client.get_experiment(tracker.experiment_id)
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:
                tracker.client.set_experiment_tag(tracker.experiment_id, k, v)
    except Exception:  # a server that refuses experiment tags still shows the runs
        pass


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def cmd_ui(args) -> int:
    wd = Path(args.workdir)
    tracker = get_tracker(wd)
    mark_training_experiment(tracker)
    if is_remote(tracker.uri):
        url = experiment_url(tracker.uri, tracker.experiment_id)
    else:
        if "MLFLOW_TRACKING_URI" in os.environ and os.environ["MLFLOW_TRACKING_URI"]:
            print(f"llmpipe ui: MLFLOW_TRACKING_URI={tracker.uri} is not the project's default store; run "
                  f"`mlflow ui --backend-store-uri {tracker.uri}` for it", file=sys.stderr)
            return 2
        info = start_service("mlflow", wd, args.port, echo=lambda m: print(m, file=sys.stderr))
        url = experiment_url(info["url"], tracker.experiment_id)
    print(url, flush=True)
    if not args.no_browser and (os.environ.get("DISPLAY") or sys.platform == "darwin"):
        webbrowser.open(url)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ui", help="open the MLflow UI on this project's runs and print its URL")
    p.add_argument("--port", type=int, default=5000, help="port of the MLflow UI (default 5000)")
    p.add_argument("--workdir", default=".", help="where mlruns/ lives (default: current folder)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_ui)
