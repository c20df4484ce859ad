"""A real SLURM (one node: `scripts/slurm_localhost.sh`, started by .ci/run): a sweep by layer submitted as a
job array through `launcher=slurm` (first refused by sbatch, then resumed with the setting fixed), and a job
requeued mid-decoding that continues its own run folder."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

pytestmark = pytest.mark.slurm

DSL = str(Path(sys.executable).parent / "dsl")
ON_THIS_NODE = ["launcher=slurm", "hydra.launcher.gpus_per_node=0"]  # the localhost cluster has no GPU


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def pictures(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("images/*/*/*.png"))}


def slurm_ids(sweep: Path) -> list[str]:
    """The SLURM jobs of a sweep, from submitit's folders (`12` or `12_0` for a task of array 12)."""
    folders = (sweep / ".submitit").glob("*")  # also holds submitit's temporary files
    return sorted({p.name for p in folders if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)})


@pytest.fixture
def sweeps(tmp_path: Path):
    """Sweep folders of the test; their SLURM jobs are cancelled at the end, whatever happened."""
    made: list[Path] = []
    yield made
    for sweep in made:
        for job in slurm_ids(sweep):
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


def test_a_sweep_by_layer_refused_by_slurm_then_resumed_runs_as_jobs_and_merges_every_row_once(
        tmp_path: Path, sweeps) -> None:
    """First sbatch refuses the jobs' GPU (gres), which this cluster does not have: one line with sbatch's reason
    and the setting that asked for it, status 2, the sweep's manifest `failed`, no job submitted (was Hydra's
    traceback and status 1; then sbatch's own line above dsl's, printed by submitit). Then `resume=` with the
    setting changed launches the same sweep as SLURM jobs (a fresh launch: the requeue test below)."""
    sweeps.append(tmp_path / "sweep")
    sweep = tmp_path / "sweep"
    # two jobs, which the 2-CPU node runs at once (submitit looks at them 2, 4, 8, 16, 32 s after submitting);
    # 2 layers, 3 images and 4 heads, so that no two roles can be swapped unseen
    refused = zygote.run([DSL, "run", "debug=tiny", "images.limit=3", "launcher=slurm", "hydra.sweep.dir=sweep",
                          "--multirun", "layer=0,1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("dsl: error:"), refused.stderr[-3000:]
    assert "SLURM refused the sweep's jobs (sbatch: error: Invalid generic resource" in lines[0]
    assert "hydra.launcher.gpus_per_node=0" in lines[0] and "dsl run resume=sweep" in lines[0]
    assert json.loads((sweep / "manifest.json").read_text())["status"] == "failed" and slurm_ids(sweep) == []
    result = zygote.run([DSL, "run", "resume=sweep", "hydra.launcher.gpus_per_node=0"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    slurm_jobs = {json.loads((sweep / str(n) / "manifest.json").read_text())["slurm_job"] for n in range(2)}
    assert len(slurm_jobs) == 2 and None not in slurm_jobs  # two SLURM jobs ran them
    merged = read_rows(sweep / "similarity.csv")
    images = json.loads((sweep / "0" / "manifest.json").read_text())["images"]
    assert len(images) == 3
    expected = {(image, f"L{layer:02d}H{head:02d}") for image in images for layer in range(2) for head in range(4)}
    seen = [(row["image"], row["component"]) for row in merged]
    assert sorted(seen) == sorted(expected)  # every layer's rows, each once
    for num in range(2):
        job_rows = [{k: v for k, v in row.items() if k in read_rows(sweep / "0" / "similarity.csv")[0]}
                    for row in merged if row["job"] == str(num)]
        own = read_rows(sweep / str(num) / "similarity.csv")
        assert [dict(r, file=f"{num}/{r['file']}") for r in own] == job_rows
    assert json.loads((sweep / "manifest.json").read_text())["status"] == "complete"


def test_stopping_the_wait_for_slurm_jobs_says_they_go_on_and_how_to_finish(tmp_path: Path, sweeps) -> None:
    """Ctrl-C on a `dsl run` that waits for its SLURM jobs stops the waiting, not the jobs: its one line says
    so, with the commands that list, stop and finish them (was "run the command again", which would have
    submitted the sweep a second time beside the jobs still running)."""
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    slow = ["debug=tiny", "images.limit=2", "component=all", "layer=1", "decode.steps=10", "decode.batch_size=1"]
    launcher = zygote.popen([DSL, "run", *slow, *ON_THIS_NODE, "hydra.sweep.dir=sweep", "--multirun"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    try:
        while not slurm_ids(sweep) and time.monotonic() < deadline:
            time.sleep(0.1)
        (job,) = slurm_ids(sweep)
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    lines = [line for line in output.splitlines() if line.startswith("dsl:")]
    assert launcher.returncode == 130 and "Traceback" not in output, output[-3000:]
    assert len(lines) == 1 and "the sweep's SLURM jobs go on (`squeue --me`" in lines[0], lines
    assert "`dsl run resume=sweep` completes and merges" in lines[0] and "run the command again" not in lines[0]
    assert _job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")  # the job went on
    # resuming while the job is listed would submit it again beside itself: refused, naming the job (was a second
    # array, two jobs at once in the job's folder)
    resumed = zygote.run([DSL, "run", "resume=sweep"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    array = job.split("_")[0]
    if _job_state(job):  # still listed after the resume (else it ended while the resume looked: nothing to say)
        lines = [line for line in resumed.stderr.splitlines() if line.strip()]
        assert resumed.returncode == 2 and len(lines) == 1, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert f"SLURM job {array} is still queued or running" in lines[0] and f"scancel {array}" in lines[0]
        assert slurm_ids(sweep) == [job]  # nothing submitted


def _job_state(job: str) -> str:
    answer = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return answer.stdout.strip()


def _requeue_mid_decoding(run: Path, job: str, deadline: float) -> int:
    """Requeue `job` once it has written a picture; return the pictures on disk when it was requeued."""
    while not pictures(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    done = len(pictures(run))
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    # SLURM holds a requeued job back for two minutes; a busy cluster would start it whenever it can. Started
    # while its first attempt is still leaving the node, SLURM kills it ("Killing non-startable batch job: Job
    # credential revoked") and the launcher waited for a result that never came, until the test's deadline.
    while not (_job_state(job) == "PENDING" and _first_attempt_gone(job)) and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    return done


def _first_attempt_gone(job: str) -> bool:
    """No process of the job's steps is left on this node (`slurmstepd: [JOB.batch]`, ...), and no node is still
    completing a job."""
    title = f"slurmstepd: [{job}.".encode()
    steps = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            steps += [cmdline] if cmdline.read_bytes().startswith(title) else []
        except OSError:  # a process that ended while we looked
            pass
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    return not steps and "completing" not in nodes.lower()


def test_a_requeued_job_continues_its_run_folder_to_the_files_of_an_uninterrupted_run(tmp_path: Path,
                                                                                          sweeps) -> None:
    # 10 pictures of 10 denoising steps, one at a time: half a second each (the requeue, issued within 0.1 s of
    # the first picture, lands in 4 s of decoding)
    slow = ["debug=tiny", "images.limit=2", "component=all", "layer=1", "decode.steps=10", "decode.batch_size=1"]
    reference = zygote.run([DSL, "run", *slow, "hydra.run.dir=reference"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    launcher = zygote.popen([DSL, "run", *slow, *ON_THIS_NODE, f"hydra.sweep.dir={sweep}", "--multirun"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    try:
        while not slurm_ids(sweep) and time.monotonic() < deadline:
            time.sleep(0.1)
        (job,) = slurm_ids(sweep)
        done_at_requeue = _requeue_mid_decoding(sweep / "0", job, deadline)
        output, _ = launcher.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:  # a launcher left waiting for a cancelled job would wait forever
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, output[-3000:]

    run = sweep / "0"
    manifest = json.loads((run / "manifest.json").read_text())
    kept = manifest["resumed_rows"]  # pictures the first attempt finished, kept by the second
    assert 1 <= done_at_requeue <= kept < 10, f"the requeue did not land mid-decoding ({kept} of 10 kept)"
    assert manifest["decoded"] == 10 - kept and manifest["slurm_job"].endswith(f"/{job}")
    assert read_rows(run / "similarity.csv") == read_rows(tmp_path / "reference" / "similarity.csv")
    assert pictures(run) == pictures(tmp_path / "reference")  # byte for byte
    assert not list(run.rglob("*.tmp"))
    assert len(read_rows(sweep / "similarity.csv")) == 10
