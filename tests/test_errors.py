"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, no partial file.
Inputs a user expects to just work (odd image modes, sizes, EXIF rotation) are converted instead."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from dsl_cli import cli
from dsl_cli.errors import UserError
from dsl_cli.images import read_image
from dsl_cli.devices import resolve_device
from dsl_cli.outputs import TEMP_SUFFIX, RunFolder
from helpers import dsl_in_process


def assert_one_clean_line(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert len(lines) == 1 and fragment in lines[0], err


def assert_no_partial_files(root: Path) -> None:
    assert not list(root.rglob(f"*{TEMP_SUFFIX}")), "a temporary file was left behind"
    assert not list(root.rglob("similarity.csv")) and not list(root.rglob("images/*/*/*.png"))


# ------------------------------------------------------------------ files that make bad input


def write_text(folder: Path) -> Path:
    (folder / "notes.jpg").write_text("this is not a picture")
    return folder


def write_truncated(folder: Path) -> Path:
    Image.new("RGB", (64, 64), "red").save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return folder


def write_bomb(folder: Path) -> Path:
    # 1-bit, 12000 x 12000 = 144 M pixels, beyond Pillow's 89 M limit; a few hundred kB on disk
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")
    return folder


def write_empty(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def missing(folder: Path) -> Path:
    return folder / "no_such_folder"


def write_fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.png")  # opening it would wait for ever for a writer
    return folder / "pipe.png"


def device(folder: Path) -> Path:
    return Path("/dev/zero")  # reading it never ends


def write_strip(folder: Path) -> Path:
    # 30000 x 1: a few hundred bytes on disk, 0.4 GB once resized so that its short side is 64
    Image.new("L", (30000, 1), 128).save(folder / "strip.png")
    return folder


IMAGE_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing_path": (missing, "no such file or folder"),
    "empty_folder": (write_empty, "no images in this folder"),
    "not_an_image": (write_text, "not a readable image"),
    "truncated_image": (write_truncated, "not a readable image"),
    "decompression_bomb": (write_bomb, "); downscale it, or set images.skip_bad=true"),  # what a command line can do
    "fifo": (write_fifo, "not a regular file or a folder"),
    "device_file": (device, "not a regular file or a folder"),
    "extreme_aspect_ratio": (write_strip, "30000 x 1 pixels, longer than 20:1"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_images_are_refused(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    make, fragment = IMAGE_CASES[case]
    (tmp_path / "in").mkdir()
    path = make(tmp_path / "in")
    code, err = dsl_in_process(["run", "debug=tiny", "images=folder", f"images.path={path}"], tmp_path,
                               monkeypatch, capsys)
    assert_one_clean_line(code, err, fragment)
    assert_no_partial_files(tmp_path / "outputs")


CONFIG_CASES = {
    # debug=tiny clamps layers and heads to the tiny model; without clamp_to_model they are refused
    "layer_out_of_range": (["layer=7", "clamp_to_model=false"], "layers run from 0 to 3"),
    "head_out_of_range": (["layer=1", "head=9", "clamp_to_model=false"], "heads run from 0 to 3"),
    "unknown_component": (["component=[L1X3]"], "unknown component label"),
    "empty_images_path": (["images.path="], "images.path is empty (an unset shell variable?)"),
    "blank_images_path": (["images=folder", "images.path=' '"], "images.path is empty"),
    "component_out_of_range": (["component=[L9MLP]", "clamp_to_model=false"], "outside this model (0 to 3)"),
    "alpha_not_finite": (["lens.alpha=inf"], "lens.alpha=inf: must be a finite number"),
    "alpha_nan": (["lens.alpha=nan"], "must be a finite number"),
    "steps_below_1": (["decode.steps=0"], "decode.steps=0: must be at least 1"),
    "encoder_batch_below_1": (["encoder.batch_size=0"], "encoder.batch_size=0: must be at least 1"),
    "decode_batch_below_1": (["decode.batch_size=0"], "decode.batch_size=0: must be auto or a whole number, at least 1"),
    "decode_batch_not_a_number": (["decode.batch_size=some"], "decode.batch_size=some: must be auto or a whole"),
    "decode_batch_fraction": (["decode.batch_size=1.5"], "decode.batch_size=1.5: must be auto or a whole"),
    "height_not_positive": (["decode.height=-64"], "decode.height=-64: must be at least 1"),
    "width_not_positive": (["decode.width=0"], "decode.width=0: must be at least 1"),
    "size_not_a_multiple": (["decode.height=96"], "decode.height=96: must be a multiple of 64 for this decoder (e.g. 128)"),
    "unknown_decoder": (["decoder.source=mine"], "decoder.source='mine': choose one of"),
    "head_not_an_integer": (["head=1.5"], "head=1.5: use all, an int or a list of ints"),
    "head_a_bool": (["head=true"], "head=True: use all, an int or a list of ints"),
    "no_head": (["head=[]"], "head=[] names no head"),
    "no_component": (["component=[]"], "component=[] names no component"),
    "seed_beyond_64_bits": (["seed=18446744073709551616"], "must be between 0 and 18446744073709551615"),
    "more_labels_than_classes": (["lens=logit", "lens.top_labels=1001"], "there are only 1000 ImageNet labels"),
    "rank_by_a_score_not_computed": (["lens.rank_by=sim_decoded", "decode.enabled=false"],
                                     "decode.enabled=false decodes none"),
    "alpha_overflows": (["lens.alpha=1e20"], "not finite (NaN or inf) with lens.alpha=1e+20"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_values_are_refused(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    overrides, fragment = CONFIG_CASES[case]
    code, err = dsl_in_process(["run", "debug=tiny", *overrides], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, fragment)
    assert_no_partial_files(tmp_path)
    # refused before the run's first result (alpha_overflows: by the lens, once the input pictures were written):
    # no folder is left, and the same command runs once it is fixed
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused run left files"


@pytest.mark.parametrize(("override", "fragment"), [
    ("layer=foo", "layer='foo': use an int, a list [10,20], all, or a range 10-20"),
    ("layer=2-1", "layer='2-1' names no layer"),
    ("head=1.5", "head=1.5: use all, an int or a list of ints"),
    ("component=[foo]", "unknown component label 'foo'"),
])
@pytest.mark.parametrize("encoder", ["tiny", "timm"])  # layers clamped; and a shape known only from the model
def test_a_layer_head_or_component_of_the_wrong_form_is_refused_before_the_encoder_loads(
        override: str, fragment: str, encoder: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """debug=tiny clamps layers to the model, so they were checked only once it was built: `layer=foo` cost
    the encoder's load (ViT-bigG's minutes, for a typo). A random timm tower's shape is known only then."""
    import dsl_cli.run as run_module

    def no_load(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(run_module, "load_encoder", no_load)
    setting = [] if encoder == "tiny" else ["encoder=timm", "encoder.name=vit_small_patch16_224", "encoder.pretrained=null",
                                            "decode.enabled=false"]
    code, err = dsl_in_process(["run", "debug=tiny", *setting, override], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, fragment)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused run left files"


# Refused when the config is composed, before Hydra starts: nothing is written anywhere.
COMPOSE_CASES = {
    "unknown_mode": (["lens.mode=double"], "lens.mode=double: Invalid value 'double', expected one of [add, scale, norm]"),
    "unknown_scheduler": (["decode.scheduler=euler"], "expected one of [ddpm, ddim, dpm]"),
    "unknown_templates": (["lens.templates=bogus"], "expected one of [openai, simple]"),
    "unknown_device": (["device=gpu"], "device=gpu: Invalid value 'gpu', expected one of [auto, cuda, cpu]"),
    "unknown_ablation": (["study=head_importance", "study.ablation=half"], "expected one of [zero, mean, both]"),
    "unknown_lens": (["lens=bogus"], "lens=bogus: no such option of lens (the options: attribution, diffusion,"),
    "misspelt_lens": (["lens=steerin"], "lens=steerin: no such option of lens (did you mean lens=steering? the "
                                        "options: attribution, diffusion, direct, logit, steering)"),
    "misspelt_debug": (["debug=tyni"], "debug=tyni: no such option of debug (did you mean debug=tiny?"),
    "unknown_launcher": (["hydra/launcher=nope"], "hydra/launcher=nope: no such option of hydra/launcher (the "
                                                  "options: basic, submitit_local, submitit_slurm)"),
    # Hydra's own settings: were Hydra's several lines and exit status 1
    "hydra_new_key": (["hydra.job.env_set.FOO=bar"], "hydra.job.env_set.FOO: no such setting of Hydra's (misspelt? "
                                                     "`dsl run --cfg hydra` prints them; a new key in one of its "
                                                     "dicts takes a +: +hydra.job.env_set.FOO=...)"),
    "hydra_misspelt": (["hydra.verbos=true"], "hydra.verbos: no such setting of Hydra's (did you mean hydra.verbose?"),
    "launcher_setting": (["hydra.launcher.partition=gpu"], "hydra.launcher.partition: no such setting of this "
                                                           "launcher (misspelt? the default one has none: "
                                                           "launcher=slurm and launcher=local_gpus have theirs"),
    "launcher_dict_key": (["launcher=slurm", "hydra.launcher.additional_parameters.mail_type=END"],
                          "a new key in one of its dicts takes a +: +hydra.launcher.additional_parameters.mail_type"),
    "misspelt_key": (["lens.alpah=3"], "lens.alpah: no such setting (did you mean lens.alpha?"),
    "misspelt_decode_key": (["decode.stps=3"], "decode.stps: no such setting (did you mean decode.steps?"),
    "misspelt_top_key": (["seeed=3"], "seeed: no such setting (did you mean seed?"),
    "unknown_key": (["lens.zzzz=3"], "lens.zzzz: no such setting (misspelt? `dsl run --cfg job` prints every"),
    "wrong_type": (["seed=abc"], "seed=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    "moved_dtype": (["dtype=bf16"], "dtype: this setting moved to encoder.dtype; write encoder.dtype=... instead"),
    "moved_batch_size": (["batch_size=2"], "batch_size: this setting moved to encoder.batch_size"),
    "grammar": (["layer=[1,2"], "layer=[1,2: no viable alternative"),
    "one_sweep_value": (["--multirun", "lens.mode=add,nrom"], "lens.mode=nrom: Invalid value 'nrom'"),
}


@pytest.mark.parametrize("case", list(COMPOSE_CASES))
def test_config_refused_when_composed_is_one_line_and_writes_nothing(case: str, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    overrides, fragment = COMPOSE_CASES[case]
    code, err = dsl_in_process(["run", "debug=tiny", *overrides], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, fragment)
    assert len(err.strip().splitlines()) == 1, err  # nothing of Hydra's own report
    assert list(tmp_path.iterdir()) == [], "a refused config wrote files"


def assert_failed_manifest(root: Path, fragment: str) -> None:
    (manifest,) = root.rglob("manifest.json")
    record = json.loads(manifest.read_text())
    assert record["status"] == "failed" and fragment in record["error"], record


def test_a_decoded_picture_that_overflows_stops_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", "debug=tiny", "decode.guidance=1e30"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "the decoded picture is not finite (NaN or inf) with decode.guidance=1e+30")
    assert_failed_manifest(tmp_path, "lower decode.guidance")
    assert not list(tmp_path.rglob("images/*/*/*.png")), "a black picture was saved"


def test_a_bug_is_one_line_exit_1_and_recorded(tmp_path: Path, monkeypatch, capsys) -> None:
    from dsl_cli import run

    # a bug whose frame is in dsl's own file (code outside dsl, a plugin's, is named as such: test_plugins.py)
    planted: dict = {}
    exec(compile("def broken(*args, **kwargs):\n    return 1 / 0\n", run.__file__, "exec"), planted)
    monkeypatch.setattr(run, "score_images", planted["broken"])
    code, err = dsl_in_process(["run", "debug=tiny"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert "internal error (a bug in dsl), ZeroDivisionError: division by zero" in line
    assert_failed_manifest(tmp_path, "internal error: ZeroDivisionError")


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda text: text + "seed: [\n", "not a config this run can be resumed from"),
    (lambda text: text.replace("seed: 0", "seed: abc"), "could not be converted to Integer"),
])
def test_resume_refuses_a_broken_saved_config(edit, fragment: str, tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["run", "debug=tiny", "decode.enabled=false", "hydra.run.dir=run"]
    assert dsl_in_process(args, tmp_path, monkeypatch, capsys)[0] == 0
    saved = tmp_path / "run" / ".hydra" / "config.yaml"
    saved.write_text(edit(saved.read_text()))
    code, err = dsl_in_process(["run", "resume=run"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, fragment)
    assert_failed_manifest(tmp_path / "run", "config.yaml")


def test_globs_do_not_follow_link_loops_and_brackets_in_a_folder_name_are_literal(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    photos = tmp_path / "photos[1]"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(photos / "a.png")
    Image.new("RGB", (64, 64), "blue").save(photos / "sub" / "b.png")
    (photos / "sub" / "loop1").symlink_to("..")  # two links back up: a `**` that follows links never ends
    (photos / "sub" / "loop2").symlink_to("..")
    args = ["run", "debug=tiny", "decode.enabled=false", "images=folder"]
    code, err = dsl_in_process([*args, f"images.path='{photos}'", "hydra.run.dir=literal"], tmp_path, monkeypatch,
                               capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "literal" / "manifest.json").read_text())["images"] == ["a"]
    pattern = f"{tmp_path}/photos[[]1]/**/*.png"
    code, err = dsl_in_process([*args, f"images.path='{pattern}'", "hydra.run.dir=glob"], tmp_path, monkeypatch,
                               capsys)
    assert code == 0, err
    assert sorted(json.loads((tmp_path / "glob" / "manifest.json").read_text())["images"]) == ["a", "b"]


def test_launcher_slurm_without_slurm_is_one_line_recorded_in_the_sweep(tmp_path: Path, monkeypatch, capsys) -> None:
    """submitit refuses to launch where SLURM's commands are missing: one line naming what to do, status 2, the
    sweep's manifest `failed`, and HYDRA_FULL_ERROR (set by dsl for the launch) gone again. A user who set it
    gets Hydra's exception itself, and keeps the setting."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no srun, no sbatch
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    args = ["run", "debug=tiny", "decode.enabled=false", "launcher=slurm", "--multirun", "layer=0,1"]
    code, err = dsl_in_process([*args, "hydra.sweep.dir=sweep"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "launcher=slurm needs SLURM's commands here (Could not detect \"srun\"")
    assert "dsl run resume=sweep" in err and "HYDRA_FULL_ERROR" not in os.environ
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "needs SLURM's commands" in manifest["error"]
    assert not (tmp_path / "sweep" / "0").exists()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(RuntimeError, match="srun"):
        dsl_in_process([*args, "hydra.sweep.dir=verbose"], tmp_path, monkeypatch, capsys)
    assert os.environ["HYDRA_FULL_ERROR"] == "1"


def test_only_a_refused_submission_is_called_one() -> None:
    """submitit raises the same FailedJobError for a job that failed on its node (its results) as for sbatch's
    refusal: only the one raised while submitting is worded as a refusal; others keep Hydra's traceback."""
    from submitit.core.utils import CommandFunction, FailedJobError

    from dsl_cli.sweeps import cluster_refusal

    with pytest.raises(FailedJobError) as failed:
        CommandFunction(["false"])()  # the command failed, not within a submission
    assert cluster_refusal(failed.value) is None
    with pytest.raises(RuntimeError) as ours:
        raise RuntimeError('Could not detect "srun"')  # not submitit's
    assert cluster_refusal(ours.value) is None


def test_a_job_lost_on_the_cluster_ends_the_wait_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """A SLURM job that ended without a result (here killed for its memory, as `sacct` reports it) makes
    submitit's own `results()` raise UncompletedJobError while the launcher waits: one line (status 2) names
    the job, its state, its error stream and the resume that finishes the sweep, which is marked failed (was
    Hydra's traceback, status 1). A job's failure of another kind keeps its traceback."""
    import submitit
    from submitit.core.utils import CommandFunction, FailedJobError

    from dsl_cli import sweeps
    from dsl_cli.outputs import RunFolder, read_manifest

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sacct = bin_dir / "sacct"  # a cluster that keeps accounting: the job's state, as sacct prints it
    sacct.write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n45_0|OUT_OF_MEMORY|node7\\n'\n")
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "my sweep"
    folder = RunFolder(sweep)
    folder.claim(kind="sweep")
    folder.release()
    (sweep / ".submitit" / "45_0").mkdir(parents=True)  # as the submission left it, with the job's log
    (sweep / ".submitit" / "45_0" / "45_0_0_log.err").write_text("slurmstepd: error: Detected 1 oom_kill event\n")
    job = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id="45_0")
    job._results_timeout_s = 0  # its result file would never come: no need to wait for it
    with pytest.raises(UserError) as raised:
        with sweeps.cluster_refusals_reported():
            sweeps._launch.sweep = sweep  # as SweepResults.on_multirun_start sets it
            job.results()
    line = str(raised.value)
    assert "SLURM job 45_0 of the sweep ended without a result (OUT_OF_MEMORY)" in line, line
    assert f"its error stream is {sweep}/.submitit/45_0/45_0_0_log.err" in line
    assert f"`dsl run resume={sweep}` runs the unfinished jobs again" in line and "\n" not in line
    assert read_manifest(sweep)["status"] == "failed"
    with pytest.raises(FailedJobError) as failed:
        CommandFunction(["false"])()
    assert sweeps.lost_job(failed.value, sweep) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", "debug=tiny", "device=cuda"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "no CUDA device is available; use device=cpu or device=auto")
    assert_no_partial_files(tmp_path)


def test_auto_device_falls_back_to_cpu_with_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert "running on the CPU" in caplog.text


def test_unwritable_output_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = dsl_in_process(["run", "debug=tiny", f"hydra.run.dir={blocker}/run"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "cannot write the output folder")
    assert "choose another with hydra.run.dir=" in err
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(UserError) as given:  # resume=, plot, report, merge: no setting moves the folder given
        RunFolder(blocker / "run").claim(resume=True)
    assert "make sure it can be written (free space, permissions)" in str(given.value)
    assert "hydra." not in str(given.value)


@pytest.mark.parametrize(("overrides", "repo"), [
    (["encoder=kandinsky_prior", "decoder=kandinsky22_random", "lens.text=false"], "kandinsky-community/kandinsky-2-2-prior"),
    (["encoder=bigg14", "decoder=kandinsky22_random"], "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
    (["encoder=bigg14_random", "decoder=kandinsky22", "decode.height=64", "decode.width=64"],
     "kandinsky-community/kandinsky-2-2-decoder"),
])
def test_weights_missing_while_offline(overrides: list[str], repo: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """In this process: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into `constants` when it is
    imported, and the preflight reads them from there when it runs, so they are set there (as
    `HF_HUB_OFFLINE=1 HF_HUB_CACHE=... dsl run` sets them)."""
    import huggingface_hub.constants as constants

    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(tmp_path / "hf"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["run", "debug=tiny", *overrides])
    except SystemExit as exit_:
        code = exit_.code
    printed = capsys.readouterr()
    assert code == 2 and printed.out == "" and "Traceback" not in printed.err, printed
    assert printed.err.startswith("dsl: error: 1 of the weights this run needs is not in the Hugging Face cache")
    assert f"hf download {repo} " in printed.err and printed.err.count("hf download") == 1
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))
    # refused before any model loaded and before any result: no folder is left (the same command runs once
    # the weights are there)
    assert not [p for p in tmp_path.glob("outputs/**/*") if p.is_file()]


# ------------------------------------------------------------------ converted, not refused


def _exif_rotated(path: Path) -> None:
    """Stored 40 wide x 20 high, red left half; EXIF orientation 6 says 'rotate 90 degrees clockwise'."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


CONVERTED = {
    "grey.png": lambda p: Image.new("L", (80, 60), 128).save(p),
    "palette.png": lambda p: Image.new("RGB", (80, 60), "green").convert("P").save(p),
    "rgba.png": lambda p: Image.new("RGBA", (80, 60), (255, 0, 0, 0)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(p),
    "sixteen.png": lambda p: Image.fromarray(np.linspace(0, 65535, 80 * 60).reshape(60, 80).astype(np.uint16)).save(p),
    "tiny.png": lambda p: Image.new("RGB", (3, 2), "blue").save(p),
    "large.jpg": lambda p: Image.new("RGB", (6000, 4000), "white").save(p),
    "rotated.jpg": _exif_rotated,
}


@pytest.fixture
def odd_images(tmp_path: Path) -> Path:
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, make in CONVERTED.items():
        make(folder / name)
    return folder


def test_odd_formats_become_rgb(odd_images: Path) -> None:
    for name in CONVERTED:
        image = read_image(odd_images / name)
        assert image.mode == "RGB", name
    assert read_image(odd_images / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert read_image(odd_images / "cmyk.jpg").getpixel((5, 5))[0] > 200  # cyan-free, magenta+yellow: red
    sixteen = np.asarray(read_image(odd_images / "sixteen.png"))
    assert sixteen.min() == 0 and sixteen.max() == 255  # rescaled, not clipped to white


def test_exif_rotation_is_applied(odd_images: Path) -> None:
    upright = read_image(odd_images / "rotated.jpg")
    assert upright.size == (20, 40)  # turned: 20 wide, 40 high
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red half is on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_odd_images_run_end_to_end(odd_images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", "debug=tiny", "images=folder", f"images.path={odd_images}",
                                "images.limit=null", "decode.enabled=false", "hydra.run.dir=run"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    with open(tmp_path / "run" / "similarity.csv") as handle:
        images = {row["image"] for row in csv.DictReader(handle)}
    assert images == {Path(name).stem for name in CONVERTED}


def test_skip_bad_goes_on_and_lists_what_it_skipped(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "good.png")
    write_text(folder)
    args = ["run", "debug=tiny", "images=folder", f"images.path={folder}", "decode.enabled=false"]
    code, err = dsl_in_process([*args, "hydra.run.dir=strict"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "notes.jpg")
    monkeypatch.chdir(tmp_path)
    code = cli.main([*args, "images.skip_bad=true", "hydra.run.dir=lenient"])
    terminal = capsys.readouterr().out  # Hydra's console handler writes dsl's messages to stdout
    assert code == 0, terminal
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["images"] == ["good"]
    assert [Path(s["path"]).name for s in manifest["skipped"]] == ["notes.jpg"]
    assert "not a readable image" in manifest["skipped"][0]["reason"]
    assert "set images.skip_bad=true" not in manifest["skipped"][0]["reason"]  # advice for a run it stops: taken
    # said on the terminal and in dsl.log: one line for the file, and the count at the end
    log = (tmp_path / "lenient" / "dsl.log").read_text()
    for text in (terminal, log):
        assert sum("skipped" in line and "notes.jpg" in line for line in text.splitlines()) == 1, text
        assert "1 image(s) skipped" in text


def test_read_image_names_the_file(tmp_path: Path) -> None:
    write_text(tmp_path)
    with pytest.raises(UserError, match="notes.jpg"):
        read_image(tmp_path / "notes.jpg")


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", f"resume={tmp_path}"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "not a dsl run folder")


@pytest.mark.parametrize("value", ["", " "])
def test_resume_without_a_folder_is_refused_not_taken_as_here(value: str, tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    code, err = dsl_in_process(["run", f"resume={value}"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "resume= needs the folder of the run or sweep to complete")


def test_resume_refuses_new_overrides(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    code, err = dsl_in_process(["run", "resume=run", "layer=2"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "drop the other overrides ['layer=2']")


def test_hydra_verbose_shows_the_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["run", "debug=tiny", "layer=7", "clamp_to_model=false", "hydra.verbose=true"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code != 0 and "Traceback" in err and "UserError" in err


def test_a_bad_job_in_a_sweep_does_not_stop_the_others(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", "debug=tiny", "clamp_to_model=false", "decode.enabled=false", "-m",
                                "layer=1,9,2"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert len(errors) == 1 and "job 1" in errors[0] and "layer=9 is outside this model" in errors[0]
    statuses = {}
    for manifest in tmp_path.glob("outputs/debug/multirun/*/*/*/manifest.json"):
        statuses[manifest.parent.name] = json.loads(manifest.read_text())["status"]
    assert statuses == {"0": "complete", "1": "failed", "2": "complete"}


def test_a_fresh_run_never_writes_into_an_earlier_run(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["run", "debug=tiny", "decode.enabled=false", "hydra.run.dir=run"]
    assert dsl_in_process(args, tmp_path, monkeypatch, capsys)[0] == 0
    before = (tmp_path / "run" / "similarity.csv").read_bytes()
    code, err = dsl_in_process([*args, "lens=direct"], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, "run already holds a run, complete: to run it again, choose another hydra.run.dir")
    assert "resume" not in err  # nothing to complete
    assert (tmp_path / "run" / "similarity.csv").read_bytes() == before
    assert "direct" not in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()  # config kept


def test_run_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    """The same guard inside the job, for two runs that start in the same second (one default folder)."""
    from hydra import compose, initialize_config_module

    from dsl_cli.config import register_configs
    from dsl_cli.run import run

    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=["debug=tiny"])
    manifest = '{"made_by": "dsl", "status": "interrupted", "started": "2026-12-07T03:00:00"}'
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(UserError, match="already holds a run"):
        run(cfg, tmp_path)
    assert (tmp_path / "manifest.json").read_text() == manifest


CUT_RUN = ("similarity.csv", "image,lens,component,kind,layer,head\ncat,direct,L01H01,head,1,1\n")
CUT_STUDY = ("study_overlay_removal.csv", "image,background\ncat,dog\n")


@pytest.mark.parametrize("command, cut", [("plot", CUT_RUN), ("plot", CUT_STUDY), ("report", CUT_STUDY)])
def test_figures_and_pages_of_a_csv_cut_short_are_refused_in_one_line(command: str, cut: tuple[str, str],
                                                                       tmp_path: Path, monkeypatch, capsys) -> None:
    """A run's or study's CSV whose number columns were cut off (a file edited by hand, a copy cut short):
    `dsl plot` (and `dsl report` of a study, whose page is made of those numbers) says which folder holds a
    value dsl did not write, exits 2, no traceback. A run's page shows such cells empty."""
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "manifest.json").write_text('{"made_by": "dsl"}')  # dsl's folder: its files are read
    (tmp_path / "cut" / cut[0]).write_text(cut[1])
    code, err = dsl_in_process([command, str(tmp_path / "cut")], tmp_path, monkeypatch, capsys)
    assert_one_clean_line(code, err, f"{tmp_path / 'cut'}: a CSV value is not what dsl writes (")


STOP_IN_A_FORK = """
import os, signal
os.register_at_fork(after_in_parent=lambda: signal.raise_signal(signal.SIGINT))  # before dsl's: inside its window
from dsl_cli.errors import Interrupted, raise_if_stopped, stop, stop_handler
with stop_handler([signal.SIGINT], lambda signum, frame: stop(signum)):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        raise_if_stopped()
    except Interrupted:
        print("stopped")
"""


def test_a_stop_that_comes_while_a_process_forks_is_raised_after_the_fork_without_a_traceback() -> None:
    """A Ctrl-C inside the at-fork hooks (logging's lock, while a drawing pool starts its processes) raised
    there was printed as "Exception ignored in ..." with a traceback, and lost; it is raised after the fork."""
    result = subprocess.run([sys.executable, "-c", STOP_IN_A_FORK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "stopped\n" and result.stderr == "", result.stderr


@pytest.mark.parametrize("how", ["in_parallel", "EarlyFigures"])
def test_a_stop_recorded_while_the_drawing_pool_forks_is_raised_once_it_has_started(how: str, monkeypatch,
                                                                                     tmp_path: Path) -> None:
    """A stop that came while a drawing process forked is recorded, not raised (see above): the figures'
    callers raise it as soon as the pool has its work, not when every drawing has ended."""
    import signal

    from dsl_cli import errors, figures

    class Pool:  # records a stop as `errors.stop` does inside the fork's window, and draws nothing
        def _stopped(self, *args, **kwargs):
            errors._stops.append(signal.SIGINT)

        map = submit = _stopped

        def shutdown(self, **kwargs) -> None:
            pass

    monkeypatch.setattr(figures, "_drawing_pool", lambda workers: Pool())
    monkeypatch.setattr(figures, "tables_by_image", lambda folder: {})
    monkeypatch.setattr(sys, "platform", "linux")
    try:
        with pytest.raises(errors.Interrupted):
            if how == "in_parallel":
                figures.in_parallel(print, [(1,), (2,)], workers=2)
            else:
                figures.EarlyFigures(tmp_path).draw("cat", [])
    finally:
        errors.clear_stops()
