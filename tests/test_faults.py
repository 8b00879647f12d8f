"""Faults a real disk and a real user produce, on real tiny runs: the cache must never use what changed.

- corrupted outputs (a raw download, documents.parquet, a shard, model weights; bytes flipped at the
  same size with the mtime put back, and truncated): rebuilt, never silently used;
- a workdir copied or moved keeps its cache valid and self-contained;
- code keys come from the real import closure (an edited module stales exactly the stages that run it);
- `kill -9` of `llmpipe run` leaves no process behind, and the next run marks its MLflow runs KILLED;
- an unwritable PREFECT_HOME or workdir is one line naming the path;
- `run spam` after `run download clean shard` fetches nothing.

    python -m pytest -q tests/test_faults.py
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

ROOT = Path(__file__).resolve().parent.parent
STAGES_TO_EVALUATE = ["download", "clean", "shard", "pretrain", "evaluate"]
SMALL = TEST_OVERRIDES + ["pretrain.threads=1"]


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def run(wd: Path, stages, *extra, force=()):
    from flows.pipeline import pipeline

    return pipeline(stages=list(stages), preset="tiny", overrides=SMALL + list(extra), force=list(force),
                    workdir=str(wd), progress=False)


def ran(summary) -> list[str]:
    return [s for s, info in summary["stages"].items() if not info["cached"]]


# the tests that use it are marked slow: a real download..evaluate run (about 30 s on 2 cores)
@pytest.fixture(scope="module")
def baseline(prefect_harness, tmp_path_factory):
    """A workdir with download..evaluate finished once; tests work on copies of it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    wd = write_fixture_workdir(tmp_path_factory.mktemp("baseline"))
    summary = run(wd, ["evaluate"])
    assert ran(summary) == STAGES_TO_EVALUATE
    return wd, summary


def copy_of(baseline, tmp_path) -> tuple[Path, dict]:
    wd, summary = baseline
    dst = tmp_path / "work"
    shutil.copytree(wd, dst, symlinks=True)
    shutil.copytree(wd.parent / "upstream", tmp_path / "upstream")  # sources.yaml points at absolute urls
    return dst, summary


def path_in(wd: Path, summary: dict, stage: str, rel: str) -> Path:
    """The same artifact in another workdir: the stage folder's path relative to the baseline's workdir."""
    base = Path(summary["stages"][stage]["artifact_dir"])
    root = base
    while root.name != "data":
        root = root.parent
    return wd / "data" / base.relative_to(root) / rel


def flip_bytes(p: Path, at: int | None = None, n: int = 4) -> None:
    """Change bytes in place at the same size and put the mtime back (only a full re-hash sees it)."""
    st = p.stat()
    data = bytearray(p.read_bytes())
    at = len(data) // 2 if at is None else at
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


# --- corruption -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_flipped_raw_download_is_fetched_again_before_clean_reads_it(baseline, tmp_path):
    wd, base = copy_of(baseline, tmp_path)
    raw = wd / "data" / "raw" / "a.txt"
    good = sha(raw)
    flip_bytes(raw)
    again = run(wd, ["shard"], force=["clean"])
    assert ran(again) == ["download", "clean"]  # rebuilt from the source; shard's input bytes are unchanged
    assert sha(raw) == good
    assert again["stages"]["clean"]["metrics"]["documents_out"] == base["stages"]["clean"]["metrics"]["documents_out"]


@pytest.mark.slow
def test_truncated_raw_download_makes_download_stale_and_refetches(baseline, tmp_path):
    wd, _ = copy_of(baseline, tmp_path)
    raw = wd / "data" / "raw" / "b.txt"
    good = sha(raw)
    truncate(raw)
    from flows.status import stage_table

    rows = {r["stage"]: r for r in stage_table(["shard"], "tiny", None, SMALL, None, [], wd)}
    assert rows["download"]["state"] == "stale"
    assert f"{raw}: size" in rows["download"]["reason"]
    again = run(wd, ["shard"])
    assert ran(again) == ["download"]
    assert sha(raw) == good


@pytest.mark.slow
def test_flipped_documents_are_rebuilt_before_shard_reads_them(baseline, tmp_path):
    wd, base = copy_of(baseline, tmp_path)
    docs = path_in(wd, base, "clean", "documents.parquet")
    good = sha(docs)
    flip_bytes(docs)
    from flows.status import stage_table

    assert {r["stage"]: r["state"] for r in stage_table(["shard"], "tiny", None, SMALL, None, [], wd)}["clean"] \
        == "cached"  # size and mtime unchanged: only a full re-hash can see it...
    verified = {r["stage"]: r for r in stage_table(["shard"], "tiny", None, SMALL, None, [], wd, verify=True)}
    assert verified["clean"]["state"] == "stale"  # ...which `llmpipe stages --verify` does
    assert f"{docs}: sha256" in verified["clean"]["reason"]
    again = run(wd, ["shard"], force=["shard"])
    assert ran(again) == ["clean", "shard"]
    assert sha(docs) == good


@pytest.mark.slow
def test_truncated_shard_is_rebuilt(baseline, tmp_path):
    wd, base = copy_of(baseline, tmp_path)
    shard_dir = path_in(wd, base, "shard", "")
    victim = sorted(shard_dir.rglob("*.parquet"))[0]
    good = sha(victim)
    truncate(victim)
    again = run(wd, ["evaluate"])
    assert ran(again) == ["shard"]  # same bytes again, so pretrain and evaluate stay cached
    assert sha(victim) == good


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
@pytest.mark.slow
def test_damaged_weights_are_never_evaluated(baseline, tmp_path, damage):
    wd, base = copy_of(baseline, tmp_path)
    weights = path_in(wd, base, "pretrain", "model/model.safetensors")
    assert weights.exists(), sorted(p.name for p in weights.parent.parent.iterdir())
    damage(weights)
    again = run(wd, ["evaluate"], force=["evaluate"])
    assert "pretrain" in ran(again)  # rebuilt first, not loaded
    assert again["stages"]["evaluate"]["metrics"]["val_loss"] == pytest.approx(
        base["stages"]["evaluate"]["metrics"]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_generate_refuses_damaged_weights_with_one_line(baseline, tmp_path):
    wd, base = copy_of(baseline, tmp_path)
    model = path_in(wd, base, "pretrain", "model")
    flip_bytes(model / "model.safetensors")
    p = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--prompt", "the", "--checkpoint", str(model),
                        "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"llmpipe: error: {model / 'model.safetensors'}: sha256"), lines


@pytest.mark.slow
def test_partial_folders_do_not_pile_up(baseline, tmp_path):
    """A finished stage removes its other keys' .partial folders; a failed non-resumable stage leaves none."""
    wd, base = copy_of(baseline, tmp_path)
    root = path_in(wd, base, "evaluate", "").parent
    (root / "0123456789abcdef.partial").mkdir()
    (root / "0123456789abcdef.partial" / "half-written.json").write_text("{")
    again = run(wd, ["evaluate"], force=["evaluate"])
    assert ran(again) == ["evaluate"]
    assert not list(root.glob("*.partial"))
    with pytest.raises(Exception, match="evaluate.prompts"):
        run(wd, ["evaluate"], "evaluate.prompts=['']")
    assert not list(root.glob("*.partial"))


# --- copy and move ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_copied_then_moved_workdir_keeps_its_cache(baseline, tmp_path):
    wd, base = copy_of(baseline, tmp_path)
    again = run(wd, ["evaluate"])
    assert ran(again) == []
    for stage, info in again["stages"].items():
        assert info["artifact_dir"].startswith(str(wd)), (stage, info["artifact_dir"])
        assert info["cache_key"] == base["stages"][stage]["cache_key"]
    moved = tmp_path / "moved"
    wd.rename(moved)
    after_move = run(moved, ["evaluate"])
    assert ran(after_move) == []
    assert all(info["artifact_dir"].startswith(str(moved)) for info in after_move["stages"].values())
    records = list((moved / "data").rglob(".llmpipe*.json"))
    assert records and not any(str(wd) in r.read_text() or str(baseline[0]) in r.read_text() for r in records)


# --- code keys -------------------------------------------------------------------------------------------------

def test_code_keys_follow_the_real_import_closure(tmp_path):
    from flows.cache import LLM_ROOT, code_version, stage_closure

    stages = ["download", "clean", "shard", "pretrain", "evaluate", "spam", "instruct", "dpo", "judge"]
    copy = tmp_path / "llm"
    shutil.copytree(LLM_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert {s: code_version(s, copy) for s in stages} == {s: code_version(s) for s in stages}
    # evaluate reaches llm.weights only through its imports: the old hand-kept list missed it
    assert "llm.weights" in stage_closure("evaluate") and "llm.weights" not in stage_closure("shard")

    def changed_after_editing(module: str) -> set[str]:
        before = {s: code_version(s, copy) for s in stages}
        f = copy / module
        f.write_text(f.read_text() + f"\n# edited by {module}\n")
        code_version.cache_clear()
        stage_closure.cache_clear()
        return {s for s in stages if code_version(s, copy) != before[s]}

    assert changed_after_editing("evaluate.py") == {"evaluate"}
    assert changed_after_editing("weights.py") == {"pretrain", "evaluate", "spam", "instruct", "dpo"}
    assert changed_after_editing("tokenizer.py") == {"shard", "pretrain", "evaluate", "spam", "instruct", "dpo"}
    assert changed_after_editing("prompts.py") == {"instruct", "dpo", "judge"}  # shared by these, imported by no other
    assert changed_after_editing("dpo.py") == {"dpo"}  # a new stage's module is keyed by its own import closure
    assert changed_after_editing("judge/remote.py") == {"judge"}  # a subpackage's module, loaded lazily


def test_thread_counts_are_in_every_training_stage_key():
    # threads: 0 means this process's CPU affinity (llm.procenv.allowed_cores), never the load, so one
    # count reproduces its bits; two counts differ in the last bits, so a count set by hand is part of the
    # key of every training stage (as written: 0 stays 0), and data stages' worker counts are not
    from flows.cache import section_for_key
    from llm.config import load_config

    one, two = load_config("tiny", overrides=["pretrain.threads=1"]), load_config("tiny", overrides=["pretrain.threads=2"])
    assert section_for_key("pretrain", one, [])["threads"] == 1
    assert section_for_key("pretrain", two, [])["threads"] == 2
    for stage in ("spam", "instruct", "dpo"):
        assert section_for_key(stage, one, [])["threads"] == 0
    assert "workers" not in section_for_key("shard", load_config("tiny", overrides=["shard.workers=3"]), [])


@pytest.mark.slow
def test_edited_module_stales_evaluate_but_not_shard_end_to_end(baseline, tmp_path):
    """`llmpipe stages` run from a copy of the code, before and after editing llm/evaluate.py there."""
    wd, _ = copy_of(baseline, tmp_path)
    proj = tmp_path / "proj"
    for pkg in ("llm", "flows"):
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(proj))

    def states() -> dict[str, str]:
        p = subprocess.run([sys.executable, "-m", "flows.cli", "stages", "evaluate", "--workdir", str(wd), "--json",
                            *[a for o in SMALL for a in ("--set", o)]],
                           capture_output=True, text=True, cwd=proj, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        return {r["stage"]: r["state"] for r in json.loads(p.stdout.splitlines()[-1])}

    assert states() == dict.fromkeys(STAGES_TO_EVALUATE, "cached")
    f = proj / "llm" / "evaluate.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    assert states() == {**dict.fromkeys(STAGES_TO_EVALUATE, "cached"), "evaluate": "stale"}


# --- per-source downloads ----------------------------------------------------------------------------------------

def test_run_spam_after_download_clean_shard_fetches_nothing(prefect_harness, tmp_path):
    wd = write_fixture_workdir(tmp_path)
    first = run(wd, ["download", "clean", "shard"])
    assert first["stages"]["download"]["metrics"]["files_downloaded"] == 5  # every source the preset uses
    spam = run(wd, ["spam"])
    assert spam["stages"]["download"]["cached"] is True
    assert spam["stages"]["download"]["metrics"]["files_downloaded"] == 0
    assert ran(spam) == ["pretrain", "spam"]


# --- kill -9 -------------------------------------------------------------------------------------------------------

def _session_members(sid: int) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{d.name} {cmd[:120]}")
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.mark.slow
def test_kill_9_leaves_no_process_and_marks_the_runs_killed(tmp_path):
    from flows.tracking import Tracker

    wd = write_fixture_workdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["LLMPIPE_PREFECT"] = "ephemeral"  # a temporary Prefect server that must die with the run
    args = [a for o in TEST_OVERRIDES for a in ("--set", o)] + ["--set", "pretrain.max_steps=100000",
                                                                "--set", "pretrain.checkpoint_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "pretrain", "--workdir", str(wd),
                             "--no-progress", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = wd / "data" / "artifacts" / "pretrain"
    deadline = time.monotonic() + 240
    while not list(partial.glob("*.partial")):
        assert proc.poll() is None, "the run ended before pretrain started"
        assert time.monotonic() < deadline, "pretrain did not start"
        time.sleep(0.5)
    time.sleep(1.0)
    assert len(_session_members(proc.pid)) >= 2  # the run and its temporary Prefect server
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], left

    tr = Tracker(wd)
    running = tr.client.search_runs([tr.experiment_id], "attributes.status = 'RUNNING'")
    assert {r.data.tags["stage"] for r in running} == {"pipeline", "pretrain"}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", "download", "--workdir", str(wd), "--no-progress",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for r in running:
        assert tr.client.get_run(r.info.run_id).info.status == "KILLED"


# --- unwritable places ------------------------------------------------------------------------------------------

def _one_error_line(args, cwd, env) -> str:
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_unwritable_prefect_home_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = dict(os.environ, PREFECT_HOME=str(blocker / "prefect"))
    line = _one_error_line(["run", "download", "--workdir", str(tmp_path / "wd")], ROOT, env)
    assert line.startswith(f"llmpipe: error: PREFECT_HOME: {blocker / 'prefect'}: not writable ("), line


def test_unwritable_mlflow_store_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{blocker}/mlflow.db")
    line = _one_error_line(["run", "download", "--workdir", str(tmp_path / "wd")], ROOT, env)
    assert line.startswith(f"llmpipe: error: MLFLOW_TRACKING_URI: folder {blocker}: not writable ("), line


def test_read_only_workdir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        line = _one_error_line(["run", "download", "--workdir", str(ro)], ROOT, dict(os.environ))
        assert line.startswith(f"llmpipe: error: workdir: data folder {ro / 'data'}: not writable (Read-only file "
                               "system)"), line
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_stages_generate_classify_ask_import_no_prefect_or_mlflow():
    """The cache lives in flows/cache.py, so the light commands never pay for Prefect or MLflow."""
    code = ("import sys, flows.cli, flows.status, flows.models, flows.cache; flows.cli.build_parser(); "
            "print(sorted(m for m in ('prefect', 'mlflow', 'torch') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
