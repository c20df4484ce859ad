"""The README and the guides it links work as typed: the Python API examples run (on the tiny models instead of the real ones),
and so does every command of its shell blocks (those that need weights up to the weights preflight).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import docs_text

README = Path(__file__).parents[1] / "README.md"
API = "## The encoder and decoder, method by method"  # docs/python-api.md
TINY = {  # real models and sizes in the README -> tiny ones here (the calls stay as written)
    'EncoderConfig(source="kandinsky_prior")': 'EncoderConfig(source="tiny")',
    'DecoderConfig(source="pretrained")': 'DecoderConfig(source="tiny")',
    'device="cuda"': 'device="cpu"',
    "torch.bfloat16": "torch.float32",
    '"L30H05"': '"L3H01"',
    '"L30MLP"': '"L2MLP"',
    '"L31H02"': '"L1H02"',
    "[10, 20, 30]": "[0, 1, 2]",
    "height=512, width=512, steps=100": "height=64, width=64, steps=2",
}


def test_python_api_example_runs() -> None:
    block = re.search(API + r".*?```python\n(.*?)```", docs_text(), re.S).group(1)
    for real, tiny in TINY.items():
        assert real in block, f"README example changed: {real!r} not found"
        block = block.replace(real, tiny)
    block = block.replace('cache["blocks.30.', 'cache["blocks.3.')
    namespace = {"pil_images": [Image.new("RGB", (80, 60), "red"), Image.new("RGB", (64, 64), "blue")],
                 "v": torch.randn(5, 64), "embeds": torch.randn(3, 32)}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["cache"].embeds.shape == (2, 32)
    assert namespace["images"].shape == (3, 64, 64, 3)
    assert namespace["negative"].shape == (1, 32)


def test_reading_a_run_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """The README's second Python block, on a tiny run's folder."""
    from helpers import dsl_in_process

    folder = tmp_path / "run"
    args = ["run", "debug=tiny", "layer=1", "images.limit=1", "decode.top_k=1", f"hydra.run.dir={folder}"]
    assert dsl_in_process(args, tmp_path, monkeypatch, capsys)[0] == 0
    block = re.findall(API + r".*?```python\n.*?```.*?```python\n(.*?)```", docs_text(), re.S)[0]
    assert '"outputs/2026-11-26/10-00-00"' in block, "README example changed"
    namespace: dict = {}
    exec(compile(block.replace('"outputs/2026-11-26/10-00-00"', repr(str(folder))), str(README), "exec"), namespace)
    best = namespace["best"]
    assert isinstance(best["layer"], int) and isinstance(best["sim_embed"], float)
    assert best["sim_embed"] == max(r["sim_embed"] for r in namespace["rows"])
    assert namespace["run"].file(best["file"]).is_file()
    assert namespace["run"].figures("heatmaps")


# ---------------------------------------------------------------- the README's shell commands

WEIGHTS_MISSING = re.compile(r"of the weights this run needs (is|are) not in the Hugging Face cache")
NOT_RUN = {  # commands no test runs here, and why
    "pip": ".ci/run installs exactly as the README says",
    "pytest": "it is this test suite",
    "apt-get": ".ci/run installs SLURM and Chromium with these lines",
    "scripts/slurm_localhost.sh": ".ci/run starts SLURM with it; tests/test_slurm.py submits to it",
    "export": "it sets the launcher=slurm settings of the lines after it",
    "scripts/fetch_wheels.sh": "it downloads from the package registry, and tests never download",
    "scripts/device_check.sh": "tests/test_device_check.py runs its --dry-run; without it, it needs a GPU",
    "scripts/reproduce_paper.sh": "tests/test_paper.py runs it on tiny models; as typed it needs the weights",
    "nice": "mutation testing (docs/testing.md) takes hours; its scripts have tests of their own",
}
NEEDS_A_CLUSTER_SWEEP = {  # commands that continue a SLURM sweep of 48 real-size jobs, and the tests that do so
    "resume=outputs/bigg_layers": "tests/test_sweeps.py resumes a sweep, tests/test_slurm.py a requeued job",
}


def bash_commands() -> list[str]:
    """Every command line of the ```bash blocks of the README and its guides (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", docs_text(), re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


def split(line: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments before the command, the command's words), as bash splits them."""
    words = shlex.split(line, comments=True)
    env = {}
    while re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def commands_of(program: str) -> list[str]:
    return [line for line in bash_commands() if split(line)[1][0] == program]


def test_every_readme_command_is_run_or_says_why_not() -> None:
    programs = {split(line)[1][0] for line in bash_commands()}
    assert programs <= {"dsl", "hf", "python", *NOT_RUN}, programs
    assert len(commands_of("dsl")) >= 10 and len(commands_of("hf")) == 7


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    """A user with an empty, offline Hugging Face cache and photos in ~/photos, in this process."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DSL_CACHE", str(tmp_path / "dsl"))
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (80, 60), "red").save(tmp_path / "photos" / "red.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("line", commands_of("dsl"))
def test_dsl_commands_work_as_typed(line: str, offline_home: Path, monkeypatch, capsys) -> None:
    """Commands that need no weights run to the end; the others pass Hydra's grammar and the config schema
    as typed and stop at the weights preflight, before any model loads, with the list of what is missing."""
    from dsl_cli import cli

    env, words = split(line)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for needle, reason in NEEDS_A_CLUSTER_SWEEP.items():
        if needle in line:
            pytest.skip(reason)
    if words[1] in ("plot", "report"):  # they draw from the run the README names: make one there
        assert cli.main(["run", "debug=tiny", "decode.enabled=false", f"hydra.run.dir={words[2]}"]) == 0
    adapter = next((w.split("=", 1)[1] for w in words if w.startswith("adapter=")), None)
    if words[1] == "run" and adapter:  # it decodes through the adapter the README fits a line before: fit it
        assert cli.main(["adapter", "fit", "debug=tiny", "adapter.readout=resid", "adapter.layer=3",
                         "adapter.augment=4", "adapter.examples=0", f"adapter.out={adapter}"]) == 0
    if words[1] == "merge":  # it merges the sweep the README names: make one there
        assert cli.main(["run", "-m", "debug=tiny", "decode.enabled=false", "layer=0,1",
                         f"hydra.sweep.dir={words[2]}"]) == 0
    try:
        code = cli.main(words[1:])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if words[1] in ("plot", "report", "merge") or any(word.startswith("debug=tiny") for word in words):
        assert code == 0, err
    else:
        errors = [e for e in err.splitlines() if e.startswith("dsl: error:")]
        assert code == 2 and errors and all(WEIGHTS_MISSING.search(e) for e in errors), err


@pytest.mark.parametrize("line", commands_of("hf"))
def test_hf_download_commands_exist_and_match_the_preflight(line: str, tmp_path: Path) -> None:
    from dsl_cli.decoder import get_family
    from dsl_cli.weights import open_clip_weights, prior_encoder_weights

    known = {prior_encoder_weights("kandinsky-community/kandinsky-2-2-prior", "image_encoder").command,
             get_family("kandinsky22").hub_weights("kandinsky-community/kandinsky-2-2-decoder").command,
             get_family("kandinsky21").hub_weights("kandinsky-community/kandinsky-2-1").command,
             get_family("unclip_h14").hub_weights("stabilityai/stable-diffusion-2-1-unclip").command,
             open_clip_weights("text", "ViT-bigG-14", "laion2b_s39b_b160k").command,
             open_clip_weights("encoder", "ViT-L-14", "openai").command,
             open_clip_weights("encoder", "ViT-H-14", "laion2b_s32b_b79k").command}
    env, words = split(line)
    assert shlex.join(words) in {shlex.join(shlex.split(c)) for c in known}  # what a missing-weights error says
    env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([str(Path(sys.executable).parent / words[0]), *words[1:]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "offline mode is enabled" in result.stdout + result.stderr  # not a usage error


@pytest.mark.parametrize("line", [pytest.param(line, marks=[] if "--help" in split(line)[1] else [pytest.mark.slow])
                                  for line in commands_of("python")])  # a `--help` in a comment is not one
def test_benchmark_commands_run(line: str) -> None:
    """Random weights, no download; the encoder benchmark builds ViT-bigG-14 (slow)."""
    _, words = split(line)
    if words[1] == "scripts/mutation.py":
        pytest.skip("it reports the last mutation run's work folder, which only a mutation run (hours) makes")
    if "cuda" in words and not torch.cuda.is_available():
        pytest.skip("it measures on CUDA (without it the script refuses, as tests/test_first_hour.py checks)")
    result = subprocess.run([sys.executable, *words[1:]], cwd=README.parent, capture_output=True, text=True,
                            timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_every_relative_link_in_the_docs_leads_to_a_file() -> None:
    """Each link to a file of the repository, from the README and from docs/*.md, resolves from the page that
    holds it (guides once linked `docs/benchmarks.md` from inside docs/, which leads nowhere)."""
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    broken = [(page.name, target) for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists()]
    assert len(pages) > 8 and broken == []


def test_layout_names_every_module() -> None:
    layout = re.search(r"## Layout\n\n```\n(.*?)```", docs_text(), re.S).group(1)
    root = README.parent
    modules = [p for p in (root / "dsl_cli").rglob("*.py") if p.name != "__init__.py" and "configs" not in p.parts]
    missing = [str(p.relative_to(root)) for p in [*modules, *(root / "scripts").iterdir()]
               if str(p.relative_to(root)) not in layout]
    assert not missing, f"the Layout (docs/extending.md) does not list {missing}"


def test_the_config_table_names_every_option_of_every_group() -> None:
    """The user guide's table of config groups lists each option under dsl_cli/configs/GROUP/ (it left out
    `tiny_timm`, `tiny_dinov2`, `timm` and `hf`, which `dsl run --help` lists and the guide uses)."""
    guide = (README.parent / "docs" / "user-guide.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*?) \|", guide, re.M))
    configs = README.parent / "dsl_cli" / "configs"
    missing = {group: [p.stem for p in sorted((configs / group).glob("*.yaml")) if f"`{p.stem}`" not in rows[group]]
               for group in ("encoder", "decoder", "debug", "lens", "images", "launcher")}
    assert {group: names for group, names in missing.items() if names} == {}


def test_sections_named_in_the_docs_exist() -> None:
    """A section a guide sends the reader to by name, `see "Any ViT"` or `"Extending" below`, is a heading
    of that guide (the guide once said `see Set-up`, the cluster guide `the SLURM of "Tests"`)."""
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        text = page.read_text()
        headings = re.findall(r"^#+ (.*)$", text, re.M)
        named = re.findall(r'(?:see|of|[Ss]ee) "([^"]+)"|"([^"]+)" (?:below|above)', text)
        dangling = [n for pair in named for n in pair if n and not any(h.startswith(n) for h in headings)]
        assert dangling == [], f"{page.name} names sections it does not have: {dangling}"
