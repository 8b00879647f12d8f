"""Behaviour check for refactors: run the tiny pipeline with every training stage on one thread and
print the sha256 of what each stage produced (final weights, responses, predictions, eval outputs).

    python benchmarks/same_weights.py --mirror ../shared/data --out before.json        # on the old code
    python benchmarks/same_weights.py --mirror ../shared/data --against before.json    # on the new code

With `--against`, every file is compared with the earlier run and the script exits 1 if any differs.
It runs the checkout it lives in (`python -m flows.cli` with this checkout first on PYTHONPATH), in a
fresh temporary workdir with a temporary Prefect server, so nothing cached is re-used. One thread per
stage makes float results reproducible run to run on one machine; hashes from another CPU (another
instruction set, another torch build) may differ and are not comparable.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's llm/, installed or not

from llm.procenv import child_env  # noqa: E402  (after the path: this checkout's copy)
STAGES = ("pretrain", "spam", "instruct", "dpo")
# what each stage's behaviour is judged by: paths relative to its artifact folder
PRODUCTS = {
    "pretrain": ["model/model.safetensors", "history.json"],
    "evaluate": ["val_by_source.json", "samples.json"],
    "spam": ["classifier/model.safetensors", "test_predictions.parquet"],
    "instruct": ["model/model.safetensors", "responses.json", "history.json"],
    "dpo": ["model/model.safetensors", "responses.json", "history.json"],
    "judge": ["scores.parquet"],
}


def sha256(path: Path) -> str:
    """The file's sha256; for a Parquet table, of its content without wall-clock columns (`seconds`)."""
    if path.suffix == ".parquet":
        import pandas as pd  # only for tables

        frame = pd.read_parquet(path)
        return hashlib.sha256(frame.drop(columns=["seconds"], errors="ignore").to_json().encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_pipeline(workdir: Path, mirror: str) -> float:
    env = child_env({"LLMPIPE_PREFECT": "ephemeral"})  # this checkout first on PYTHONPATH
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--mirror", mirror, "--no-progress",
           "--workdir", str(workdir)]
    for stage in STAGES:
        cmd += ["--set", f"{stage}.threads=1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def products(workdir: Path) -> dict[str, str]:
    out = {}
    for stage, names in PRODUCTS.items():
        folders = sorted(p for p in (workdir / "data" / "artifacts" / stage).glob("*")
                         if p.is_dir() and not p.name.endswith(".partial"))
        if len(folders) != 1:
            raise SystemExit(f"{workdir}/data/artifacts/{stage}: expected one finished folder, found {len(folders)}")
        for name in names:
            out[f"{stage}/{name}"] = sha256(folders[0] / name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mirror", required=True, help="folder with the datasets (e.g. ../shared/data)")
    p.add_argument("--out", type=Path, help="write the hashes as JSON here")
    p.add_argument("--against", type=Path, help="compare with hashes written earlier by --out")
    p.add_argument("--keep", type=Path, help="run in this workdir and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    mirror = str(Path(args.mirror).resolve())
    with tempfile.TemporaryDirectory(prefix="llmpipe-same-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        seconds = run_pipeline(workdir, mirror)
        got = products(workdir)
    print(f"tiny pipeline, threads=1: {seconds:.1f} s")
    if args.out:
        args.out.write_text(json.dumps(got, indent=1) + "\n")
    if not args.against:
        for name, digest in got.items():
            print(f"  {digest[:16]}  {name}")
        return 0
    want = json.loads(args.against.read_text())
    differ = 0
    for name in sorted(set(want) | set(got)):
        same = want.get(name) == got.get(name)
        differ += not same
        print(f"  {'same  ' if same else 'DIFFER'}  {name}")
    print(f"{len(got) - differ} of {len(got)} identical" if differ else f"all {len(got)} identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
