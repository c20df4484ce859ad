"""The public API at the package top (`import dsl_cli as dsl`): docs/python-api.md's example runs as written on
the tiny models, every public name resolves, importing the package loads no model library, and a lens is made
from a plain dataclass or a name with keyword settings, checked against the schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsl_cli as dsl

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_documented_example_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    example, files = python_blocks(DOC.read_text())[:2]  # "A notebook's worth": the example, then a run's files
    namespace: dict = {}
    exec(compile(example, str(DOC), "exec"), namespace)  # its asserts are the checks: closed form, decomposition
    assert namespace["pictures"].shape == (4, 64, 64, 3) and namespace["steered"].shape == (3, 4, 32)
    assert namespace["stream"].shape == (3, 3, 32)

    from dsl_cli import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "debug=tiny", "layer=1", "images.limit=1", "decode.top_k=1", "hydra.run.dir=run"]) == 0
    capsys.readouterr()
    assert '"outputs/2026-11-26/10-00-00"' in files, "docs example changed"
    exec(compile(files.replace('"outputs/2026-11-26/10-00-00"', repr(str(tmp_path / "run"))), str(DOC), "exec"),
         namespace)
    assert namespace["rows"] and namespace["run"].file(namespace["best"]["file"]).is_file()
    # a folder given as a str, as RunFolder takes it (redraw called the run's CSV damaged, write_pages raised)
    assert dsl.redraw(str(tmp_path / "run")) and dsl.write_pages(str(tmp_path / "run"))


def test_every_public_name_resolves_and_the_package_imports_no_model_library() -> None:
    assert all(getattr(dsl, name) is not None for name in dsl.__all__)
    code = "import sys, dsl_cli; print(sorted({'torch', 'open_clip', 'diffusers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    with pytest.raises(AttributeError):
        dsl.no_such_thing  # noqa: B018


def test_a_lens_from_a_dataclass_a_name_or_keywords(tiny_encoder, tiny_pixels) -> None:
    cache = tiny_encoder.run_with_cache(tiny_pixels)
    from_dataclass = dsl.get_lens(dsl.LensConfig(name="steering", mode="add", alpha=4.0))
    from_keywords = dsl.get_lens("steering", mode="add", alpha=4.0)
    labels = ["L3H01", "L0MLP", "L2H03"]
    expected = tiny_encoder.steer(cache, labels, mode="add", alpha=4.0)
    for lens in (from_dataclass, from_keywords):
        got = dsl.lens_embeddings(lens, tiny_encoder, cache, labels)
        torch.testing.assert_close(got, expected)
    assert set(dsl.LENSES) >= {"steering", "direct", "diffusion", "logit", "attribution"}
    for bad in ({"alpah": 3}, {"mode": "nrom"}):
        with pytest.raises(dsl.UserError, match="lens settings"):
            dsl.get_lens("steering", **bad)
    with pytest.raises(dsl.UserError, match="choose one of"):
        dsl.get_lens("no_such_lens")


def test_the_encoders_outputs_train_a_probe(tiny_encoder, tiny_pixels) -> None:
    """What the encoder and the lenses hand back are plain tensors without grad (`torch.no_grad`): a probe
    trained on a head's writes, or the classifier's logits of the cache's embeddings, backpropagates. Under
    `torch.inference_mode` they were inference tensors: 'Inference tensors cannot be saved for backward'."""
    cache = tiny_encoder.run_with_cache(tiny_pixels)
    steered = dsl.lens_embeddings("steering", tiny_encoder, cache, ["L02H01", "L03MLP"])
    for features in (cache.head_writes[:, 3, 1], cache.embeds, steered[:, 0], tiny_encoder.embed(tiny_pixels)):
        assert not features.requires_grad and not features.is_inference()
        probe = torch.nn.Linear(features.shape[-1], 2)
        probe(features).sum().backward()
        assert probe.weight.grad is not None


def test_the_configs_dtype_and_scheduler_are_used_and_checked() -> None:
    """`EncoderConfig(dtype=...)` and `DecoderConfig(scheduler=...)` were ignored by `load_encoder` and
    `load_decoder` (float32 and DDPM whatever they said, `dtype="fp61"` accepted); an explicit argument wins."""
    from diffusers import DDIMScheduler

    from dsl_cli.errors import UserError

    assert dsl.load_encoder(dsl.EncoderConfig(source="tiny", dtype="bf16"))[0].dtype == torch.bfloat16
    assert dsl.load_encoder(dsl.EncoderConfig(source="tiny", dtype="bf16"), dtype=torch.float32)[0].dtype == torch.float32
    assert dsl.load_encoder(dsl.EncoderConfig(source="tiny"))[0].dtype == torch.float32
    with pytest.raises(UserError, match="dtype='fp61'"):
        dsl.load_encoder(dsl.EncoderConfig(source="tiny", dtype="fp61"))
    assert isinstance(dsl.load_decoder(dsl.DecoderConfig(source="tiny", scheduler="ddim")).pipe.scheduler, DDIMScheduler)
    with pytest.raises(UserError, match="euler"):
        dsl.load_decoder(dsl.DecoderConfig(source="tiny", scheduler="euler"))
