"""The data stages on a Dask cluster (`--task-runner dask`) give byte-identical artifacts.

A real `distributed.LocalCluster` of two worker processes runs the per-file clean steps and the
tokenizer work units; the outputs are compared byte for byte with the default (threads) path,
for the llm/ functions and for the pipeline flow pointed at the cluster's scheduler address.
The threads runner, and a dask runner no stage asked for, start no process and open no port
(checked on this process's tree and sockets; a used dask runner is the control).

    python -m pytest -q tests/test_scaleout.py
"""
from __future__ import annotations

import json
import random
import time
from multiprocessing import resource_tracker
from pathlib import Path

import psutil
import pytest

from llm.clean import run_clean
from llm.config import CleanConfig, OrchestrationConfig, ShardConfig, load_config
from llm.shards import run_shard
from llm.tokenizer import EncoderPool, encode_documents


@pytest.fixture(scope="module")
def cluster():
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def executor(cluster):
    import distributed

    with distributed.Client(cluster, set_as_default=False) as client:
        yield client.get_executor()


def _prose(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone lantern quietly 42 don't it's ;".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(lines)) + "\n"


def _corpus(root: Path) -> list[Path]:
    """Files that exercise every drop reason across files: a duplicate in another file, short texts."""
    root.mkdir()
    (root / "a.txt").write_text("\ufeff" + _prose(1, 400) + "\n\n\n\n" + _prose(2, 50))
    (root / "b.txt").write_text(_prose(3, 300))
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                            [_prose(3, 300), "tiny", _prose(4, 80), _prose(4, 80), "", _prose(5, 20)]))
    (root / "d.txt").write_text("short")
    return sorted(root.iterdir())


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_clean_on_dask_is_byte_identical(tmp_path, executor):
    files = _corpus(tmp_path / "corpus")
    cfg = CleanConfig(corpus=[str(f) for f in files], min_chars=30)
    default = run_clean(cfg, {}, tmp_path / "threads", progress=False)
    dask = run_clean(cfg, {}, tmp_path / "dask", progress=False, executor=executor, executor_slots=2)
    assert _files(tmp_path / "threads") == _files(tmp_path / "dask")
    assert default.metrics == dask.metrics
    assert default.metrics["documents_in"] == 9
    assert default.metrics["dropped_duplicate"] == 2  # c.jsonl line 1 = b.txt; line 4 = line 3
    assert default.metrics["dropped_too_short"] == 3  # "tiny", "" and "short"
    assert default.metrics["documents_out"] == 4


def test_clean_error_from_a_worker_names_the_file_and_line(tmp_path, executor):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine enough text here"}\n{"txt": 1}\n')
    cfg = CleanConfig(corpus=[str(bad)], min_chars=1)
    with pytest.raises(ValueError, match=rf"^{bad}:2: missing field 'text'"):
        run_clean(cfg, {}, tmp_path / "out", progress=False, executor=executor, executor_slots=2)
    assert not list((tmp_path / "out").glob("*.parquet*"))


def test_shard_on_dask_is_byte_identical(tmp_path, executor):
    files = _corpus(tmp_path / "corpus")
    # one long document (cut into pieces: several work units) among short ones
    (tmp_path / "corpus" / "long.txt").write_text(_prose(9, 40_000))
    cfg = CleanConfig(corpus=[str(f) for f in [*files, tmp_path / "corpus" / "long.txt"]], min_chars=30)
    docs = run_clean(cfg, {}, tmp_path / "clean", progress=False).outputs["documents"]
    scfg = ShardConfig(max_shard_mb=0.2, val_fraction=0.1)
    default = run_shard(scfg, docs, tmp_path / "threads", progress=False)
    with EncoderPool(2, executor=executor) as pool:
        dask = run_shard(scfg, docs, tmp_path / "dask", progress=False, pool=pool)
    a, b = _files(tmp_path / "threads"), _files(tmp_path / "dask")
    assert a == b
    assert len([n for n in a if n.startswith("train-")]) > 1  # size-capped into several shards
    assert default.metrics == dask.metrics


def test_encoder_pool_on_dask_matches_tiktoken_ids(executor):
    from llm.tokenizer import get_encoding

    texts = [_prose(i, 3000) for i in range(3)] + ["", "one <|endoftext|> two"]
    with EncoderPool(2, executor=executor) as pool:
        got = pool.encode_documents(texts)
    enc = get_encoding()
    for text, ids in zip(texts, got):
        assert ids.tolist() == enc.encode(text, allowed_special="all") + [50256]
    assert [a.tolist() for a in got] == [a.tolist() for a in encode_documents(texts, workers=1)]


def test_unreachable_scheduler_is_one_clear_error():
    from flows import scaleout

    runner = scaleout.DataRunner(OrchestrationConfig(task_runner="dask", dask_address="tcp://127.0.0.1:9"))
    runner.connect_timeout = "2s"
    with pytest.raises(scaleout.DaskUnavailable, match=r"^orchestration.dask_address: cannot use the Dask "
                                                       r"scheduler at tcp://127.0.0.1:9 \("):
        runner.executor()
    runner.close()


def test_orchestration_is_not_part_of_the_results_hash():
    a = load_config("tiny")
    b = load_config("tiny", overrides=["orchestration.task_runner=dask", "orchestration.dask_workers=3"])
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != load_config("tiny", overrides=["shard.val_fraction=0.2"]).config_hash()


def test_pipeline_on_a_dask_scheduler_matches_threads(prefect_harness, tmp_path, monkeypatch, cluster):
    """The flow pointed at a running scheduler (as for a remote cluster): same keys, same bytes;
    the MLflow runs record the runner."""
    from flows.pipeline import pipeline
    from flows.tracking import Tracker
    from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wd_threads = write_fixture_workdir(tmp_path / "t")
    wd_dask = write_fixture_workdir(tmp_path / "d")
    plain = pipeline(stages=["shard"], preset="tiny", overrides=TEST_OVERRIDES, workdir=str(wd_threads),
                     progress=False)
    dask = pipeline(stages=["shard"], preset="tiny", workdir=str(wd_dask), progress=False,
                    overrides=TEST_OVERRIDES + ["orchestration.task_runner=dask",
                                                f"orchestration.dask_address={cluster.scheduler_address}"])
    for stage in ("clean", "shard"):
        assert not dask["stages"][stage]["cached"]
        assert dask["stages"][stage]["cache_key"] == plain["stages"][stage]["cache_key"]
    docs = [Path(r["stages"]["clean"]["artifact_dir"]) / "documents.parquet" for r in (plain, dask)]
    assert docs[0].read_bytes() == docs[1].read_bytes()
    shards = [_files(Path(r["stages"]["shard"]["artifact_dir"])) for r in (plain, dask)]
    assert shards[0] == shards[1] and "manifest.json" in shards[0]
    tr = Tracker(wd_dask)
    assert tr.client.get_run(dask["pipeline_run_id"]).data.params["task_runner"] == "dask"
    assert tr.client.get_run(dask["stages"]["shard"]["run_id"]).data.tags["task_runner"] == "dask"
    assert "task_runner" not in tr.client.get_run(dask["stages"]["download"]["run_id"]).data.tags


def _started_here() -> tuple[set, set]:
    """This process's descendant processes and listening sockets (what a started cluster adds)."""
    resource_tracker.ensure_running()  # multiprocessing's helper, started once per interpreter and kept: not a cluster
    me = psutil.Process()
    children = {(c.pid, c.create_time()) for c in me.children(recursive=True)}
    listening = {c.laddr for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    return children, listening


def _new_since(before: tuple[set, set]) -> tuple[set, set]:
    """Processes and listening sockets that were not there before (ones that ended meanwhile don't count)."""
    children, listening = _started_here()
    return children - before[0], listening - before[1]


def test_threads_runner_and_an_unused_dask_runner_start_nothing():
    from flows import scaleout

    before = _started_here()
    with scaleout.DataRunner(OrchestrationConfig()) as runner:
        assert runner.executor() == (None, 0)
        assert _new_since(before) == (set(), set())
    # with dask configured, nothing starts until a data stage asks for the executor (a cached run)
    with scaleout.DataRunner(OrchestrationConfig(task_runner="dask", dask_workers=1)):
        assert _new_since(before) == (set(), set())
    assert _new_since(before) == (set(), set())


def test_a_dask_runner_that_is_used_starts_a_cluster_and_stops_it():
    """The measurement above can fail: the first executor() call starts worker processes, close() ends them."""
    from flows import scaleout

    before = _started_here()
    with scaleout.DataRunner(OrchestrationConfig(task_runner="dask", dask_workers=1)) as runner:
        executor, slots = runner.executor()
        assert slots == 1 and executor is not None
        children, ports = _new_since(before)
        assert children and ports
    deadline = time.monotonic() + 60
    while _new_since(before)[0] and time.monotonic() < deadline:  # the worker process exits after close()
        time.sleep(0.5)
    assert _new_since(before) == (set(), set())
