"""Jobs on Ray (workers/distributed.py) against a real local Ray cluster on 127.0.0.1 (2 CPUs, shared by the
tests of this module), on seeded tiny Llama models: the artifact of a Ray run is the local run's, byte for byte,
also when workers or the coordinator are killed in the middle."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.service.cli import commands as cli
from pbs2p.testing.artifacts import file_hashes
from pbs2p.testing.real import first_blocks
from pbs2p.testing.tiny import calib_ids, make_model, save_tokenizer, tiny_config, tiny_job_config, write_text
from pbs2p.workers.distributed import NAMESPACE, compress_model_ray, init_ray
from pbs2p.workers.local import compress_model
from pbs2p.workers.settings import WorkerSettings
from pbs2p.workers.text import calibration_for

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """One local Ray cluster for the session: 127.0.0.1, 2 CPUs, a small object store."""
    address = init_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
    assert ray.cluster_resources()["CPU"] == 2 and address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "src"
    make_model(path, layers=3)
    return path


def same_report(a: Any, b: Any) -> None:
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("seconds")
        for blk in d["blocks"]:
            blk.pop("seconds")
            blk.pop("phases")  # the Ray schedule's timings
    assert da == db


def run_ray(src: Path, out: Path, cfg: CompressionConfig, ckpt: Path, **kw: Any) -> Any:
    settings = WorkerSettings(cache_dir=ckpt.parent / "cache")
    return compress_model_ray(src, out, cfg, calib_ids(), settings=settings, checkpoint_url=str(ckpt), **kw)


# ------------------------------------------------------------------------------------ same artifact


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_job_config(),
        tiny_job_config(propagation="independent"),
        tiny_job_config(true_sequential=True, skip_modules=("*.1.mlp.down_proj",), method="prune-binarize"),
        tiny_job_config(block_tune_steps=6, block_tune_lr=1e-2),
        tiny_job_config(method="gptq", gptq_bits=3, gptq_group_size=32),
    ],
    ids=["sequential", "independent", "true-sequential", "block-tune", "gptq"],
)
def test_ray_run_equals_local_run(cluster: str, model: Path, tmp_path: Path, cfg: CompressionConfig) -> None:
    local = compress_model(model, tmp_path / "local", cfg, calib_ids())
    remote = run_ray(model, tmp_path / "ray", cfg, tmp_path / "ckpt", workers=2, job_id="same")
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")
    same_report(remote, local)
    assert not any((tmp_path / "ckpt").rglob("*.safetensors"))  # checkpoints removed once the artifact is done


@pytest.mark.parametrize(("workers", "tune"), [(1, 0), (3, 0), (4, 0), (3, 6)], ids=["1", "3", "4", "3-block-tune"])
def test_any_worker_count_gives_the_same_bytes(cluster: str, tmp_path: Path, workers: int, tune: int) -> None:
    """A model of 2 blocks with 5 calibration shards (the last one short): 1, 3 and 4 workers (half a CPU each on
    the 2-CPU cluster) hold different shards and solve different row chunks, and write the local run's bytes;
    with block tuning, worker 0 gathers every shard (the short one, held by another worker, included)."""
    make_model(tmp_path / "src", layers=2)
    cfg = tiny_job_config(batch_size=2, row_chunk=32, calib_samples=9, block_tune_steps=tune, block_tune_lr=1e-2)
    calib = calib_ids(n=9)
    compress_model(tmp_path / "src", tmp_path / "local", cfg, calib)
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    compress_model_ray(
        tmp_path / "src", tmp_path / "ray", cfg, calib, settings=settings, checkpoint_url=str(tmp_path / "ckpt"),
        workers=workers, cpus_per_worker=0.5, job_id=f"w{workers}t{tune}",
    )  # fmt: skip
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")


@pytest.mark.integration
def test_real_model_first_blocks_give_the_same_bytes_at_any_worker_count(
    cluster: str, real_model: Path, tmp_path: Path
) -> None:
    """The real SmolLM2 cut to its first 2 blocks, calibrated on real text in 4 shards: the local path, 2 workers
    and 3 workers (half a CPU each) write the same bytes (row chunks of 256: q/k/v and gate/up split in chunks)."""
    src = first_blocks(real_model, tmp_path / "src", 2)
    cfg = CompressionConfig.from_options({"calib_samples": 8, "seqlen": 128, "batch_size": 2})
    calib = calibration_for(src, cfg)
    compress_model(src, tmp_path / "local", cfg, calib)
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    for workers in (2, 3):
        compress_model_ray(
            src, tmp_path / f"ray{workers}", cfg, calib, settings=settings, checkpoint_url=str(tmp_path / "ckpt"),
            workers=workers, cpus_per_worker=0.5 if workers == 3 else 1.0, job_id=f"real{workers}",
        )  # fmt: skip
        assert file_hashes(tmp_path / f"ray{workers}") == file_hashes(tmp_path / "local"), workers


def test_worker_error_is_the_jobs_error(cluster: str, tmp_path: Path) -> None:
    make_model(tmp_path / "src", hidden=36)
    with pytest.raises(Pbs2pError, match=r"^in_features=36 is not divisible by M=8"):
        run_ray(tmp_path / "src", tmp_path / "out", tiny_job_config(allocation="uniform"), tmp_path / "ckpt", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "src"]  # no partial output


# ----------------------------------------------------------------------------------- resume, restart


def test_resume_and_fingerprint_mismatch(
    cluster: str, model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pbs2p.workers")
    cfg, other = tiny_job_config(), tiny_job_config(pattern="4:8")
    run_ray(model, tmp_path / "a", cfg, tmp_path / "ckpt", workers=1, job_id="j1", keep_checkpoint=True)
    assert (tmp_path / "ckpt" / "j1" / "block-00002.json").is_file()
    caplog.clear()
    # the same job again: every block is checkpointed, nothing is recomputed
    run_ray(model, tmp_path / "b", cfg, tmp_path / "ckpt", workers=1, job_id="j1", keep_checkpoint=True)
    assert "resuming job j1 after block 2" in caplog.text
    assert "block 0 checkpointed" not in caplog.text
    assert file_hashes(tmp_path / "b") == file_hashes(tmp_path / "a")
    caplog.clear()
    # another config under the same job id: the checkpoints are not used
    run_ray(model, tmp_path / "c", other, tmp_path / "ckpt", workers=1, job_id="j1")
    assert "job j1: the checkpoints in" in caplog.text and "different config; starting over" in caplog.text
    assert "resuming" not in caplog.text
    compress_model(model, tmp_path / "ref", other, calib_ids())
    assert file_hashes(tmp_path / "c") == file_hashes(tmp_path / "ref")
    assert not (tmp_path / "ckpt" / "j1").exists()


def test_two_jobs_at_once(cluster: str, model: Path, tmp_path: Path) -> None:
    cfgs = {"one": tiny_job_config(), "two": tiny_job_config(pattern="4:8", propagation="independent")}
    errors: list[BaseException] = []

    def job(name: str) -> None:
        try:
            run_ray(model, tmp_path / name, cfgs[name], tmp_path / "ckpt", workers=1, job_id=name)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(name,)) for name in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and not any(t.is_alive() for t in threads)
    for name, cfg in cfgs.items():
        compress_model(model, tmp_path / f"ref-{name}", cfg, calib_ids())
        assert file_hashes(tmp_path / name) == file_hashes(tmp_path / f"ref-{name}")


def worker_pids(job_id: str) -> dict[int, int]:
    """Worker index -> pid of this job's workers, asked from the workers themselves."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    mine = {int(n.split("/")[1].removeprefix("worker-")): n for n in names if n.startswith(f"{job_id}/")}
    return {k: ray.get(ray.get_actor(n, namespace=NAMESPACE).pid.remote()) for k, n in mine.items()}


def test_killed_workers(cluster: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL to the job's workers while it runs: a linear worker (its calls are retried on the restarted
    process) and then the block lead (the block is redone from the previous block's checkpoint)."""
    caplog.set_level(logging.INFO, logger="pbs2p.workers")
    conf = tiny_config("llama", layers=6, hidden=256)
    conf.intermediate_size = 512
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "src")
    cfg = tiny_job_config()
    killed: dict[int, int] = {}
    after: dict[int, int] = {}
    timers: list[threading.Timer] = []

    def kill(k: int) -> None:
        pid = worker_pids("kill")[k]
        os.kill(pid, signal.SIGKILL)
        killed[k] = pid

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "compress" and done == 1:  # a moment into block 1: the linears are out on the workers
            timers.append(threading.Timer(0.15, kill, args=(1,)))
            timers[-1].start()
        if stage == "compress" and done == 3:
            kill(0)  # the lead, holding the activations of block 3
        if stage == "compress" and done == 5:
            after.update(worker_pids("kill"))

    report = run_ray(
        tmp_path / "src", tmp_path / "ray", cfg, tmp_path / "ckpt", workers=2, job_id="kill", progress=progress
    )
    for t in timers:
        t.join()
    assert set(killed) == {0, 1} and set(after) == {0, 1}
    assert all(after[k] != killed[k] for k in killed)  # both restarted by Ray
    assert "job kill: block 3: a worker died" in caplog.text  # the lead's block was redone
    assert len(report.blocks) == 6
    compress_model(tmp_path / "src", tmp_path / "local", cfg, calib_ids())
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")


def test_killed_coordinator_resumes(cluster: str, tmp_path: Path) -> None:
    """`pbs2p compress --ray ADDRESS --job-id X` SIGKILLed once a block is checkpointed; started again, it
    resumes after the last checkpointed block and writes the artifact of an uninterrupted run."""
    src = tmp_path / "model"
    conf = tiny_config("llama", layers=6, hidden=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).save_pretrained(src)
    save_tokenizer(src)
    text = write_text(tmp_path / "calib.txt", docs=8)
    args = ["compress", str(src), "-o", str(tmp_path / "ray"), "--calib", str(text)]
    args += ["--calib-samples", "8", "--seqlen", "32", "--batch-size", "4"]
    ray_args = ["--ray", cluster, "--workers", "2", "--job-id", "X", "--checkpoint", str(tmp_path / "ckpt")]
    cmd = [sys.executable, "-m", "pbs2p.service.cli", *args, *ray_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # kill as soon as block 1 is checkpointed
        seen.append(line)
        if "job X: block 1 checkpointed" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any("job X: block 1 checkpointed" in line for line in seen), "".join(seen)
    assert not (tmp_path / "ray").exists()

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"resuming job X after block (\d+)", again.stderr)
    assert resumed is not None, again.stderr
    k = int(resumed.group(1))
    assert 1 <= k < 5
    assert f"job X: block {k} checkpointed" not in again.stderr and "job X: block 5 checkpointed" in again.stderr

    assert cli.main([*args[:3], str(tmp_path / "local"), *args[4:]]) == 0
    assert file_hashes(tmp_path / "ray") == file_hashes(tmp_path / "local")


def test_cli_ray_options_need_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["compress", str(tmp_path / "m"), "-o", str(tmp_path / "o"), "--workers", "2"])
    assert rc == 2
    assert "--workers applies to Ray jobs; add --ray" in capsys.readouterr().err
