"""A researcher's first hour: no dead ends. A run that fails before its first result leaves no folder, so the
same command runs once the cause is fixed; a tiny preview (`debug=*`) never shares a folder with a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import dsl_in_process

# the paper's top-heads experiment with the weights in local folders (the prior's image encoder and the
# decoder pipeline), on the CPU, one photo, small pictures
PAPER = ["run", "experiment=paper_top_heads", "device=cpu", "images.limit=1", "decode.top_k=2", "decode.steps=2",
         "decode.height=64", "decode.width=64", "decode.batch_size=2", "lens.text=false"]


def compose_run(overrides: list[str]):
    """The config `dsl run OVERRIDES` composes, with Hydra's own part."""
    from hydra import compose, initialize_config_module

    from dsl_cli.config import register_configs

    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        return compose("run", overrides, return_hydra_config=True)


def save_tiny_weights(encoder: Path, decoder: Path) -> None:
    """Tiny stand-ins in the released layouts: a CLIPVisionModelWithProjection as the prior's `image_encoder/`
    (3 layers of 2 heads; 1280-wide embeddings, as bigG's) and a KandinskyV22Pipeline with diffusers' dummy
    UNet (taking 1280-wide embeddings) and MoVQ."""
    import torch
    import transformers
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    from dsl_cli.decoder import SCHEDULER, TINY_MOVQ, TINY_UNET

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=1280)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(encoder)
    KandinskyV22Pipeline(unet=UNet2DConditionModel(**dict(TINY_UNET, encoder_hid_dim=1280)),
                         movq=VQModel(**TINY_MOVQ), scheduler=DDPMScheduler(**SCHEDULER)).save_pretrained(decoder)


def test_a_paper_run_refused_for_its_weights_runs_once_they_are_there(tmp_path: Path, monkeypatch, capsys) -> None:
    encoder, decoder = tmp_path / "encoder", tmp_path / "decoder"
    command = [*PAPER, f"encoder.checkpoint={encoder}", f"decoder.path={decoder}"]
    code, err = dsl_in_process(command, tmp_path, monkeypatch, capsys)
    assert code == 2 and str(encoder) in err and str(decoder) in err and "resume=" not in err, err
    assert not (tmp_path / "outputs" / "paper" / "paper_top_heads").exists(), "a failed attempt left its folder"

    save_tiny_weights(encoder, decoder)
    code, err = dsl_in_process(command, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "outputs" / "paper" / "paper_top_heads" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["components"] == 6  # 3 layers x 2 heads, all ranked


def test_a_failed_run_in_a_dated_folder_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """Nor the dated folders above it that its claim made (`outputs/debug/2026-12-07` stayed, empty); a folder
    above that was there before stays."""
    args = ["run", "debug=tiny", "images=folder", f"images.path={tmp_path / 'none'}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert not (tmp_path / "outputs").exists(), sorted((tmp_path / "outputs").rglob("*"))
    (tmp_path / "outputs" / "debug").mkdir(parents=True)
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and sorted((tmp_path / "outputs").rglob("*")) == [tmp_path / "outputs" / "debug"], err


def test_a_run_refused_after_its_input_pictures_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run refused once its images were read (here every score is infinite) had written their input pictures
    and stayed, `failed`, in the way of the corrected command; they are dsl's copies, not results."""
    args = ["run", "debug=tiny", "decode.enabled=false", "images.limit=2", "lens.alpha=1e300", "hydra.run.dir=run"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and "not finite" in err, err
    assert not (tmp_path / "run").exists()
    args[4] = "lens.alpha=2"
    assert dsl_in_process(args, tmp_path, monkeypatch, capsys)[0] == 0


def test_a_failed_run_leaves_no_log_handler_on_its_deleted_folder(tmp_path: Path, monkeypatch) -> None:
    """In a process that goes on (a notebook, the next test), what is logged after a run whose folder was
    removed must not go to, or fail on, that folder's dsl.log."""
    import logging

    from dsl_cli import cli

    before = logging.root.handlers[:]
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main(["run", "debug=tiny", "images=folder", f"images.path={tmp_path / 'none'}"])
        assert ended.value.code == 2
        logging.getLogger("dsl_cli").warning("a line after the run")
        stale = [h.baseFilename for h in logging.root.handlers if isinstance(h, logging.FileHandler)
                 and str(tmp_path) in h.baseFilename]
        assert not stale and not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()], stale
    finally:
        for handler in set(logging.root.handlers) - set(before):
            logging.root.removeHandler(handler)
            handler.close()


def test_a_failed_run_keeps_a_folder_that_holds_anything_else(tmp_path: Path, monkeypatch, capsys) -> None:
    """Only dsl's own bookkeeping is removed: a file of the user's keeps the folder and the file."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, err = dsl_in_process(["run", "debug=tiny", "images=folder", f"images.path={tmp_path / 'none'}",
                                f"hydra.run.dir={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert (folder / "notes.txt").read_text() == "mine"


DEBUG_PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "dsl_cli" / "configs" / "debug").glob("*.yaml"))


@pytest.mark.parametrize("preset", DEBUG_PRESETS)
def test_a_tiny_preview_never_shares_a_folder_with_the_real_run(preset: str) -> None:
    """`debug=* experiment=paper_*` goes below outputs/debug; the real experiment to outputs/paper/<name>. Every
    preset (tiny_dinov2 and tiny_timm once wrote among the real runs, in outputs/DATE/TIME)."""
    assert len(DEBUG_PRESETS) >= 5
    real, preview, plain = (compose_run(overrides) for overrides in (
        ["experiment=paper_top_heads"], [f"debug={preset}", "experiment=paper_top_heads"], [f"debug={preset}"]))
    assert real.hydra.run.dir == "outputs/paper/paper_top_heads"
    assert preview.hydra.run.dir == "outputs/debug/paper/paper_top_heads"
    assert plain.hydra.run.dir.startswith("outputs/debug/") and plain.hydra.sweep.dir.startswith("outputs/debug/")


@pytest.fixture
def empty_offline_hub(tmp_path: Path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 with an empty cache (huggingface_hub reads both at import: its constants too)."""
    import huggingface_hub.constants as hub

    home = tmp_path / "hf"
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(home)), ("HF_HUB_CACHE", str(home / "hub"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.mark.parametrize(("encoder", "setting", "says"), [
    ("encoder=bigg14", "layer=60", "layers run from 0 to 47"),
    ("encoder=kandinsky_prior", "layer=60", "layers run from 0 to 47"),
    ("experiment=vitl14_top_heads", "head=16", "heads run from 0 to 15"),
    ("experiment=vith14_resid", "component=[L32MLP]", "outside this model (0 to 31)"),
])
def test_an_impossible_layer_is_refused_before_the_weights_are_looked_up(
        encoder: str, setting: str, says: str, empty_offline_hub: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", encoder, setting, "device=cpu"], tmp_path, monkeypatch, capsys)
    assert code == 2 and says in err and "hf download" not in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.glob("outputs/**/*") if p.is_file()]


def test_the_page_says_what_the_run_read_and_folds_failed_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """A tiny run keeps layer=30 and reads the tiny model's last layer: its page says both, and names the
    models in words. The overview of the folder shows a failed run apart, folded."""
    from dsl_cli.report import collection_page, layer_ranges

    code, err = dsl_in_process(["run", "debug=tiny", "decode.enabled=false", "hydra.run.dir=runs/good"], tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err
    html = (tmp_path / "runs" / "good" / "index.html").read_text()
    assert "layer=30" in html and "layers read 3" in html
    assert "tiny encoder" in html and "tiny tiny" not in html
    assert layer_ranges([0, 1, 2, 3, 7, 9, 10]) == "0-3, 7, 9-10"

    failed = tmp_path / "runs" / "broken"
    failed.mkdir()
    (failed / "manifest.json").write_text(json.dumps({"made_by": "dsl", "status": "failed", "error": "bad"}))
    overview = collection_page(tmp_path / "runs", [tmp_path / "runs" / "good", failed])
    shown, folded = overview.split("<details>")
    assert "good/index.html" in shown and "broken" not in shown
    assert "1 failed or unfinished" in folded and "broken/index.html" in folded


def test_a_sweeps_own_lines_name_who_says_them_and_a_library_warning_comes_once() -> None:
    """Outside its jobs a sweep logs through Hydra's logging: dsl's lines are labelled dsl's (not `[HYDRA]`),
    submitit's sacct warning (once per status poll) reaches the terminal once, other library lines not."""
    import logging

    from dsl_cli.logs import SourceFormatter, SweepTerminalFilter

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    shown = SweepTerminalFilter()
    polls = [record("submitit", logging.WARNING, f"Call #{n} - Bypassing sacct error 1, status may be inaccurate.")
             for n in range(1, 8)]
    assert [shown.filter(r) for r in polls] == [True] + [False] * 6
    assert shown.filter(record("dsl_cli.sweeps", logging.INFO, "merged 40 rows"))
    assert shown.filter(record("hydra.core.utils", logging.INFO, "Launching 2 jobs locally"))
    assert not shown.filter(record("diffusers.models", logging.INFO, "loading"))

    formatter = SourceFormatter(format="[%(asctime)s][HYDRA] %(message)s")
    assert "][dsl_cli.sweeps] merged" in formatter.format(record("dsl_cli.sweeps", logging.INFO, "merged"))
    assert "][HYDRA] Launching" in formatter.format(record("hydra.launcher", logging.INFO, "Launching"))

    logging_cfg = compose_run(["debug=tiny"]).hydra.hydra_logging
    assert logging_cfg.formatters.simple["()"] == "dsl_cli.logs.SourceFormatter"
    assert logging_cfg.filters.own["()"] == "dsl_cli.logs.SweepTerminalFilter"
    assert list(logging_cfg.handlers.console.filters) == ["own"]


def test_the_scripts_leave_no_folder_behind_and_refuse_cuda_without_it(tmp_path: Path, monkeypatch) -> None:
    """`scripts/device_check.sh --dry-run OUT` works in a temporary folder it removes at the end; bench_memory.py
    --device cuda on a machine without CUDA is one usage line and status 2, not a CPU measurement labelled cuda."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(repo / "scripts"))
    import device_check

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(device_check.tempfile, "tempdir", None)  # TMPDIR is read again
    works = []
    monkeypatch.setattr(device_check, "run_steps", lambda check, only: works.append(check.work) or
                        (check.work / "bench.json").write_text("{}"))
    monkeypatch.setattr(device_check, "markdown", lambda data: "")
    assert device_check.main(["--dry-run", str(tmp_path / "out")]) == 0
    assert len(works) == 1 and works[0].parent == tmp_path / "tmp"
    assert not list((tmp_path / "tmp").iterdir()), "the working folder was left behind"

    import torch

    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(repo / "scripts" / "bench_memory.py"), "--device", "cuda",
                                 "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "CUDA is not available" in result.stderr
        assert not (tmp_path / "m.json").exists()
