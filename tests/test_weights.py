"""Weights preflight: every missing weight is found before any model loads and reported at once, with an
`hf download` command that the installed huggingface_hub runs and that fetches what the run looks for.

The Hugging Face caches here are empty temporary folders, or folders laid out by hand as huggingface_hub
lays out its cache (models--org--name/refs/main, snapshots/<commit>/<file>), holding the files the real
repositories hold. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from dsl_cli import weights
from dsl_cli.config import register_configs
from dsl_cli.errors import UserError
from dsl_cli.preflight import needed, preflight
from helpers import fake_cache

BIN = Path(sys.executable).parent
PRIOR, DECODER, TEXT = ("kandinsky-community/kandinsky-2-2-prior", "kandinsky-community/kandinsky-2-2-decoder",
                        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
REPO_FILES = {  # files of the real repositories (their file listings), as a download would put them in the cache
    PRIOR: ["model_index.json", "image_encoder/config.json", "image_encoder/model.safetensors"],
    DECODER: ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "movq/config.json",
              "unet/diffusion_pytorch_model.safetensors", "movq/diffusion_pytorch_model.safetensors"],
    TEXT: ["open_clip_pytorch_model.bin"],
}


def offline_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "hf").mkdir(exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DSL_CACHE": str(tmp_path / "dsl"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def config(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """In this process: HF_HUB_OFFLINE=1 and an empty cache (huggingface_hub reads both when imported)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("DSL_CACHE", str(tmp_path / "dsl"))
    return tmp_path / "hub"


def test_empty_offline_cache_names_all_three_weights_in_one_message(tmp_path: Path) -> None:
    result = subprocess.run([str(BIN / "dsl"), "run", "lens=logit", "layer=30"], cwd=tmp_path,
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("dsl: error: 3 of the weights this run needs are not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in lines[0]
    commands = [line.split(": ", 1)[1] for line in lines[1:] if "hf download" in line]
    assert [shlex.split(c)[:3] for c in commands] == [["hf", "download", repo] for repo in (PRIOR, DECODER, TEXT)]
    assert len(lines) == 5 and lines[4].lstrip().startswith("or load local copies")  # and nothing else
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file()], "something was downloaded"


def test_a_sweep_refused_for_its_weights_leaves_no_folder(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = subprocess.run([str(BIN / "dsl"), "run", "--multirun", "lens=steering,direct", "layer=30",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "of the weights this run needs are not in the" in result.stderr
    assert not sweep.exists(), sorted(str(p) for p in sweep.rglob("*"))


def test_the_commands_run_and_fetch_what_the_preflight_looks_for(tmp_path: Path, offline_hub: Path) -> None:
    with pytest.raises(UserError) as refused:
        preflight(config("lens=logit", "layer=30"))
    commands = [line.split(": ", 1)[1] for line in str(refused.value).splitlines() if "hf download" in line]
    assert len(commands) == 3
    env = offline_env(tmp_path)
    for command in commands:  # the installed hf knows the command; offline and uncached it fails to fetch
        result = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "offline mode is enabled" in result.stdout + result.stderr, command
    hub = tmp_path / "hf" / "hub"
    for repo, files in REPO_FILES.items():
        fake_cache(hub, repo, files)
    for command in commands:  # with the repositories' files cached, each command finds what it names
        result = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    for repo, files in REPO_FILES.items():
        fake_cache(offline_hub, repo, files)
    preflight(config("lens=logit", "layer=30"))  # nothing missing now


def test_only_what_is_missing_is_listed(offline_hub: Path) -> None:
    fake_cache(offline_hub, PRIOR, REPO_FILES[PRIOR])
    fake_cache(offline_hub, DECODER, REPO_FILES[DECODER][:-1])  # the MoVQ's weights are missing
    with pytest.raises(UserError) as refused:
        preflight(config("lens=logit", "layer=30"))
    message = str(refused.value)
    assert message.startswith("2 of the weights") and DECODER in message and TEXT in message
    assert PRIOR not in message


def test_what_a_run_needs_follows_the_config(offline_hub: Path, tmp_path: Path) -> None:
    def repos(*overrides: str) -> list[str]:
        return [weights.repo for weights in needed(config(*overrides))[0]]

    assert repos() == [PRIOR, DECODER]
    assert repos("lens.text=true") == [PRIOR, DECODER, TEXT]  # every component's labels come from the text tower
    assert repos("decode.enabled=false") == [PRIOR]
    assert repos("study=head_importance") == [PRIOR]  # head importance decodes nothing and names nothing
    assert repos("study=overlay_removal") == [PRIOR, DECODER]  # it decodes its ablated composites
    assert repos("study=overlay_removal", "study.decode_steps=[]") == [PRIOR]
    assert repos("debug=tiny") == [] and repos("debug=tiny", "lens=logit") == []
    assert repos("encoder=bigg14", "lens=logit", "decode.enabled=false") == [TEXT]  # one file for both
    classifier = needed(config("lens=logit"))[0]
    assert [w.repo for w in classifier] == [PRIOR, DECODER, TEXT]
    from dsl_cli.lenses import classifier_file

    saved = classifier_file(config("lens=logit").encoder, "openai")
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")  # a classifier on disk: the text tower is not needed
    assert repos("lens=logit") == [PRIOR, DECODER] and repos("lens.text=true") == [PRIOR, DECODER]
    assert repos("lens=attribution", "lens.target=a dog") == [PRIOR, DECODER, TEXT]  # a text to encode
    assert repos("lens.text=true", f"lens.text_pool={tmp_path}") == [PRIOR, DECODER, TEXT]


def test_local_paths_are_checked_with_the_hub_weights(offline_hub: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as refused:
        preflight(config(f"encoder.checkpoint={tmp_path / 'none'}", f"decoder.path={tmp_path}", "lens.text=false"))
    lines = str(refused.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"encoder.checkpoint={tmp_path / 'none'}: not a folder with config.json")
    assert lines[1].startswith(f"decoder.path={tmp_path}: not the folder of a saved KandinskyV22Pipeline")


def test_online_the_missing_weights_are_fetched_by_their_libraries(offline_hub: Path, monkeypatch) -> None:
    import diffusers
    import huggingface_hub
    import huggingface_hub.constants as constants
    import open_clip

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "hub_unreachable", lambda: None)  # the hub answers; the downloads then fail
    fetched = []

    def no_network(*args, **kwargs):
        fetched.append(args[0])
        raise OSError("network unreachable")

    def download_decoder(repo, **kwargs):
        fetched.append(repo)
        fake_cache(offline_hub, repo, REPO_FILES[repo])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(diffusers.KandinskyV22Pipeline, "download", download_decoder)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: no_network(cfg["hf_hub"]))
    with pytest.raises(UserError) as refused:
        preflight(config("lens=logit", "layer=30"))
    assert fetched == [PRIOR, DECODER, TEXT + "/"]
    message = str(refused.value)
    assert message.startswith("2 of the weights") and "they could not be downloaded" in message
    assert PRIOR in message and TEXT in message and DECODER not in message


def test_an_unreachable_hub_is_found_in_seconds_and_nothing_is_tried(offline_hub: Path, monkeypatch) -> None:
    """Online but cut off: one short probe decides (a refused port answers at once), no library download is
    tried (each would spend most of a minute retrying), and the message says why."""
    import time

    import huggingface_hub.constants as constants
    import open_clip

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    tried = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: tried.append(cfg))
    start = time.perf_counter()
    with pytest.raises(UserError) as refused:
        preflight(config("lens=logit", "layer=30", "decode.enabled=false"))
    assert time.perf_counter() - start < weights.HUB_PROBE_SECONDS + 5  # loose: not the minute of retries
    message = str(refused.value)
    assert tried == [] and "did not answer within 5 s" in message and "127.0.0.1:9" in message
    assert message.startswith("2 of the weights this run needs are not")


def test_one_missing_weight_is_one_weight() -> None:
    from dsl_cli.weights import HubWeights, _message

    one = _message([HubWeights("decoder", "org/repo", (("model.safetensors",),))], [], "why")
    assert one.startswith("1 of the weights this run needs is not in the Hugging Face cache")


def test_transformers_weight_names_are_transformers_own() -> None:
    from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    from dsl_cli.decoder import TRANSFORMERS_WEIGHTS

    assert TRANSFORMERS_WEIGHTS == (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
