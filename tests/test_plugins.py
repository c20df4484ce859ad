"""Extension points: a lens, a study and a decoder family, each defined here alone by one class and one config
file (written into a config folder added to Hydra's search path), registered, and run end to end through
`dsl run`: adding one needs no change to dsl_cli/. Then contracts that every registered lens, study and
decoder family keeps (README "Extending").

Oracles: the negated direct lens gives cos(-v, e) = -cos(v, e), its Spearman correlation with importance the
direct lens's negated; a study comparing it with the direct lens writes each score in its column; a decoder
family that differs from Kandinsky 2.2 in name only decodes the same pictures, byte for byte, through the
embeddings the run hands it.
"""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path
from typing import TypedDict

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from dsl_cli import config, decoder, figures, lenses, study_registry
from dsl_cli.config import StudyConfig, register_configs
from dsl_cli.errors import UserError
from dsl_cli.outputs import CORRELATIONS, IMPORTANCE, SIMILARITY, RunFolder, Table
from helpers import dsl_in_process

CONFIGS = Path(lenses.__file__).parent / "configs"
TINY = ["debug=tiny", "images.limit=2"]


# ---------------------------------------------------------------- the plugins


class NegatedDirect(lenses.DirectLens):
    """The direct lens, negated: every embedding points the other way."""

    name = "negated_direct"
    columns = ("mode",)

    def embeddings(self, encoder, cache, components):
        return -super().embeddings(encoder, cache, components)

    def row(self) -> dict:
        return {"mode": "negated"}


class ScaledDirect(lenses.DirectLens):
    """The direct lens times `lens.scale`, a setting of its own."""

    name = "scaled_direct"
    new_settings = {"scale": 1.0}

    def embeddings(self, encoder, cache, components):
        return float(self.cfg.scale) * super().embeddings(encoder, cache, components)


class AgreementRow(TypedDict, total=False):
    image: str
    component: str
    lens: str
    score: float | None


class LensAgreement(study_registry.Study):
    """Each lens's score, cos(its embedding of the head, e), per image and head: nothing ablated."""

    name = "lens_agreement"
    settings = ("lenses",)
    new_settings = {"heads_kept": None}  # the first this many heads alone (None: all)
    tables = (Table("study_lens_agreement.csv", AgreementRow),)
    figures = ("plots/lens_agreement.png",)

    def run(self, cfg, run_dir, encoder, preprocess, images, heads) -> dict:
        from dsl_cli.studies import _pixels, lens_scores, study_lenses

        heads = heads if cfg.study.heads_kept is None else heads[:cfg.study.heads_kept]
        cache = encoder.run_with_cache(_pixels(preprocess, images))
        scores = lens_scores(study_lenses(cfg), encoder, cache, heads, cache.embeds.float().cpu().unsqueeze(1))
        rows = [{"image": image.name, "component": head.label, "lens": lens, "score": value[b, k].item()}
                for lens, value in scores.items() for b, image in enumerate(images) for k, head in enumerate(heads)]
        RunFolder(run_dir).write(self.tables[0], rows)
        return {"study": self.name, "rows": len(rows), "files": [self.tables[0].name]}

    def draw(self, run_dir, config) -> list[Path]:
        rows = RunFolder(run_dir).read(self.tables[0])
        fig = figures.pyplot().figure()
        for lens in dict.fromkeys(r["lens"] for r in rows):
            fig.gca().plot([r["score"] for r in rows if r["lens"] == lens], label=lens)
        path = RunFolder(run_dir).figure("plots", self.name)
        figures.save_figure(fig, path)
        return [path]


class NamedKandinsky(decoder.KandinskyDecoder):
    """Kandinsky 2.2 under another name, keeping what each pipeline call is given."""

    name = "named_kandinsky"
    calls: list = []

    def _inputs(self, embeds, negative):
        self.calls.append(embeds.detach().cpu().clone())
        return super()._inputs(embeds, negative)


@pytest.fixture
def registries():
    """Whatever a test registers is gone afterwards: the lens, study and decoder-family registries as before."""
    registries = (lenses.LENSES, study_registry.STUDIES, decoder.FAMILIES, *config.DECLARED.values(),
                  *config.DECLARED_BY.values())
    saved = [dict(registry) for registry in registries]
    yield
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)


@pytest.fixture
def plugin_configs(tmp_path: Path) -> tuple[Path, str]:
    """A config folder of the plugins' configs, and the override that adds it to Hydra's search path."""
    folder = tmp_path / "configs"
    for group, name, text in [
        ("lens", "negated_direct", "name: negated_direct\n"),
        ("lens", "scaled_direct", "name: scaled_direct\nscale: 1.0\n"),
        ("study", "lens_agreement", "name: lens_agreement\nlenses: [negated_direct, direct]\n"),
        ("decoder", "named_kandinsky_tiny", "defaults:\n  - tiny\n  - _self_\nfamily: named_kandinsky\n"),
    ]:
        (folder / group).mkdir(parents=True, exist_ok=True)
        (folder / group / f"{name}.yaml").write_text(text)
    return folder, f"hydra.searchpath=[file://{folder}]"


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_lens_from_outside_runs_end_to_end(registries, plugin_configs, tmp_path, monkeypatch, capsys) -> None:
    lenses.register(NegatedDirect)
    common = [*TINY, "layer=1", "component=all", plugin_configs[1]]
    for lens in ("direct", "negated_direct"):
        code, err = dsl_in_process(["run", *common, f"lens={lens}", f"hydra.run.dir={tmp_path / lens}"], tmp_path,
                                   monkeypatch, capsys)
        assert code == 0, err[-3000:]
    direct, negated = (rows_of(tmp_path / lens / "similarity.csv") for lens in ("direct", "negated_direct"))
    assert [(r["image"], r["component"]) for r in negated] == [(r["image"], r["component"]) for r in direct]
    assert len(negated) == 2 * 5  # two images, four heads and the MLP of layer 1
    for mine, theirs in zip(negated, direct):
        assert mine["lens"] == "negated_direct" and mine["mode"] == "negated"
        assert float(mine["sim_embed"]) == pytest.approx(-float(theirs["sim_embed"]), abs=1e-6)
        assert float(mine["norm"]) == pytest.approx(float(theirs["norm"]), rel=1e-6)
        assert (tmp_path / "negated_direct" / mine["file"]).is_file()
    assert sorted((tmp_path / "negated_direct" / "heatmaps").iterdir())[0].name.endswith("_negated_direct.png")


def test_a_lens_and_a_study_from_outside_declare_settings_of_their_own(registries, plugin_configs, tmp_path,
                                                                      monkeypatch, capsys) -> None:
    """`new_settings` on the class makes `lens.scale` and `study.heads_kept` settings like dsl's own, with no field
    added to dsl_cli/config.py: set on the command line or in the config file, checked when the config is
    composed (a wrong type, a misspelling: one line, status 2), recorded in the manifest, read by the plugin; a
    study that does not read one refuses it. dsl's own settings cannot be declared again, nor one setting with
    two defaults."""
    lenses.register(ScaledDirect)
    lenses.register(NegatedDirect)  # compared by the study's config
    lenses.register(type("Windowed", (lenses.DirectLens,), {"name": "windowed", "new_settings": {"window": 3}}))
    study_registry.register_study(LensAgreement)

    def run(name: str, *args: str) -> tuple[int, str]:
        return dsl_in_process(["run", *TINY, "layer=1", plugin_configs[1], *args, f"hydra.run.dir={tmp_path / name}"],
                              tmp_path, monkeypatch, capsys)

    for name, args in (("direct", ["lens=direct"]), ("scaled", ["lens=scaled_direct", "lens.scale=-2.5"]),
                       ("unscaled", ["lens=scaled_direct"])):
        code, err = run(name, *args)
        assert code == 0, err[-3000:]
    direct, scaled, unscaled = (rows_of(tmp_path / name / "similarity.csv") for name in ("direct", "scaled", "unscaled"))
    assert len(scaled) == len(direct) == 2 * 4
    for mine, default, theirs in zip(scaled, unscaled, direct):
        assert float(mine["sim_embed"]) == pytest.approx(-float(theirs["sim_embed"]), abs=1e-6)
        assert float(default["sim_embed"]) == pytest.approx(float(theirs["sim_embed"]), abs=1e-6)  # its config's 1.0
    assert json.loads((tmp_path / "scaled" / "manifest.json").read_text())["config"]["lens"]["scale"] == -2.5
    # its page names its own setting, not another plugin's (`window`), and a run of dsl's own lens names none
    assert "<td>scaled_direct, scale -2.5</td>" in (tmp_path / "scaled" / "index.html").read_text()
    assert "<td>direct</td>" in (tmp_path / "direct" / "index.html").read_text()
    for name, bad, says in (("bad_type", "lens.scale=abc", "lens.scale"), ("misspelt", "lens.scael=2", "lens.scael")):
        code, err = run(name, "lens=scaled_direct", bad)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and says in lines[0], err[-3000:]
        assert not (tmp_path / name).exists()

    code, err = run("agreement", "study=lens_agreement", "study.heads_kept=2")
    assert code == 0, err[-3000:]
    rows = rows_of(tmp_path / "agreement" / "study_lens_agreement.csv")
    assert sorted({r["component"] for r in rows}) == ["L01H00", "L01H01"] and len(rows) == 2 * 2 * 2
    assert "heads_kept 2" in (tmp_path / "agreement" / "index.html").read_text()
    code, err = run("importance", "study=head_importance", "study.heads_kept=2")
    assert code == 2 and "study.heads_kept=2: study=head_importance does not read it" in err, err[-3000:]

    # the Python API: a name or dsl's own LensConfig (made without the setting) with it, typed by the schema
    assert lenses.get_lens(config.LensConfig(name="scaled_direct"), scale=-2).cfg.scale == -2.0
    assert lenses.get_lens("scaled_direct").cfg.scale == 1.0
    with pytest.raises(UserError, match="scale"):
        lenses.get_lens("scaled_direct", scale="abc")

    # another lens's setting changed from its default is refused, as a study refuses one it does not read
    code, err = run("unread", "lens=direct", "lens.scale=2")
    assert code == 2 and "lens.scale=2.0: no lens of this run reads it (direct; it is a setting of lens " \
                         "scaled_direct)" in err, err
    # in a study, the lenses it compares read it (whatever lens.name says): taken where one of them declared it
    code, err = run("compared", "study=head_importance", "study.bootstrap=5", "lens.scale=-1",
                    "study.lenses=[direct,scaled_direct]")
    assert code == 0, err[-3000:]
    rows = rows_of(tmp_path / "compared" / "study_head_importance.csv")
    assert all(float(r["scaled_direct"]) == pytest.approx(-float(r["direct"]), abs=2e-6) for r in rows)
    code, err = run("uncompared", "study=head_importance", "lens.name=scaled_direct", "lens.scale=-1")
    assert code == 2 and "lens.scale=-1.0: no lens of this run reads it (steering, direct;" in err, err

    for setting in ({"alpha": 3.0}, {"scale": 2.0}, {"scale": 1}, {"Bad-Name": 1}, {"window": {"a": 1}},
                    {"values": 1}, {"good_one": 1, "Bad": 2}):
        clashing = type("Clashing", (lenses.DirectLens,), {"name": "clashing", "new_settings": setting})
        with pytest.raises(ValueError, match="new setting lens"):
            lenses.register(clashing)
        assert "clashing" not in lenses.LENSES and "good_one" not in config.DECLARED["lens"]  # all or nothing
    with pytest.raises(ValueError, match="lens 'clashing': new setting lens.scale: lens scaled_direct declares it"):
        lenses.register(type("Clashing", (lenses.DirectLens,), {"name": "clashing", "new_settings": {"scale": 2.0}}))
    lenses.register(type("ScaledDirect", (ScaledDirect,), {"new_settings": {"scale": 3.0}}))  # a module reloaded
    assert config.DECLARED["lens"]["scale"] == 3.0
    lenses.register(ScaledDirect)
    with pytest.raises(ValueError, match="study name 'head_importance' is one of dsl's own studies"):
        study_registry.register_study(type("Mine", (LensAgreement,), {"name": "head_importance", "tables": (
            Table("study_head_importance.csv", AgreementRow),)}))

    # plain `dsl` (no plugin imported) resumes a run of dsl's own lens made from the plugin's script, whose config
    # holds the plugin's setting (was refused as a damaged file); a run of the plugin's lens it refuses, saying why
    for name in ("scaled_direct", "negated_direct", "windowed"):
        del lenses.LENSES[name]
    for declared in config.DECLARED.values():
        declared.clear()
    for name in ("direct", "scaled"):
        manifest = tmp_path / name / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "interrupted"}))
    code, err = dsl_in_process(["run", f"resume={tmp_path / 'direct'}"], tmp_path, monkeypatch, capsys)
    assert code == 0 and rows_of(tmp_path / "direct" / "similarity.csv") == direct, err[-3000:]
    code, err = dsl_in_process(["run", f"resume={tmp_path / 'scaled'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "a run of lens=scaled_direct, which is not registered here: import the module" in err, err
    code, err = run("unimported", "lens=scaled_direct")  # was Hydra's "Key 'scale' not in 'LensConfig'"
    assert code == 2 and "lens=scaled_direct: its config file sets lens.scale, which is none of dsl's settings: a " \
                         "setting that a lens of your own declares is known once its module is imported" in err, err


def test_a_study_from_outside_compares_a_lens_from_outside_end_to_end(registries, plugin_configs, tmp_path,
                                                                     monkeypatch, capsys) -> None:
    lenses.register(NegatedDirect)
    study_registry.register_study(LensAgreement)
    folder = tmp_path / "agreement"
    code, err = dsl_in_process(["run", *TINY, "layer=2", "study=lens_agreement", plugin_configs[1],
                                f"hydra.run.dir={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    rows = rows_of(folder / "study_lens_agreement.csv")
    negated, direct = ([r for r in rows if r["lens"] == lens] for lens in ("negated_direct", "direct"))
    assert len(negated) == len(direct) == 2 * 4  # two images, the four heads of layer 2
    for mine, theirs in zip(negated, direct):
        assert (mine["image"], mine["component"]) == (theirs["image"], theirs["component"])
        assert float(mine["score"]) == pytest.approx(-float(theirs["score"]), abs=1e-6)
    summary = json.loads((folder / "manifest.json").read_text())["study"]
    assert summary["files"] == ["study_lens_agreement.csv", "plots/lens_agreement.png"]  # and the figure it drew
    page = (folder / "index.html").read_text()
    assert "dsl study lens_agreement" in page and "plots/lens_agreement.png" in page
    (folder / "plots" / "lens_agreement.png").unlink()
    code, err = dsl_in_process(["plot", str(folder)], tmp_path, monkeypatch, capsys)  # from its files alone
    assert code == 0 and (folder / "plots" / "lens_agreement.png").is_file(), err
    del study_registry.STUDIES["lens_agreement"]  # plain `dsl`, which has not imported the plugin
    code, err = dsl_in_process(["plot", str(folder)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "a run of study lens_agreement, which is not registered here: import the module" in err, err
    # and so does `dsl merge` of a sweep of it, which merged its jobs as no rows at all
    study_registry.register_study(LensAgreement)
    code, err = dsl_in_process(["run", "--multirun", *TINY, "layer=2", "study=lens_agreement", plugin_configs[1],
                                "hydra.sweep.dir=sweep", "seed=0,1"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    merged = (tmp_path / "sweep" / "manifest.json").read_bytes()
    del study_registry.STUDIES["lens_agreement"]
    code, err = dsl_in_process(["merge", str(tmp_path / "sweep")], tmp_path, monkeypatch, capsys)
    assert code == 2 and "a run of study lens_agreement, which is not registered here" in err, err[-2000:]
    assert "then merge from there" in err and (tmp_path / "sweep" / "manifest.json").read_bytes() == merged
    # and so does `dsl report`, which wrote the page again without the study's own tables
    code, err = dsl_in_process(["report", str(folder)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "a run of study lens_agreement, which is not registered here: import the module" in err, err
    assert (folder / "index.html").read_text() == page


def test_a_built_in_study_compares_a_lens_from_outside_in_a_column_of_its_own(registries, tmp_path, monkeypatch,
                                                                              capsys) -> None:
    """study.lenses: the default lenses keep their columns (dsl, direct), a further one gets a column named
    after it, its correlations are rows of correlations.csv, and the plot and page show it."""
    lenses.register(NegatedDirect)
    folder = tmp_path / "hi"
    code, err = dsl_in_process(["run", *TINY, "layer=2", "study=head_importance", "study.bootstrap=20",
                                "study.lenses=[steering,direct,negated_direct]", f"hydra.run.dir={folder}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    header = (folder / IMPORTANCE.name).read_text().splitlines()[0].split(",")
    assert header == [*IMPORTANCE.columns, "negated_direct"]
    rows = RunFolder(folder).read(IMPORTANCE)
    assert all(r["negated_direct"] == pytest.approx(-r["direct"], abs=2e-6) for r in rows)
    corr = {(r["image"], r["lens"]): r for r in RunFolder(folder).read(CORRELATIONS)}
    assert [lens for image, lens in corr if image == figures.POOLED] == [*figures.SCORES, "negated_direct"]
    assert corr["pooled", "negated_direct"]["spearman"] == pytest.approx(-corr["pooled", "direct"]["spearman"])
    assert figures.importance_scores(rows) == [*figures.SCORES, "negated_direct"]
    assert 'tabindex="0">negated_direct</th>' in (folder / "index.html").read_text()  # a column of every head's row


def test_a_decoder_family_from_outside_decodes_end_to_end(registries, plugin_configs, tmp_path, monkeypatch,
                                                           capsys) -> None:
    decoder.FAMILIES[NamedKandinsky.name] = NamedKandinsky
    common = ["debug=tiny", "images.limit=1", "layer=3", "decode.top_k=2", plugin_configs[1]]
    for name, chosen in (("tiny", "tiny"), ("named", "named_kandinsky_tiny")):
        code, err = dsl_in_process(["run", *common, f"decoder={chosen}", f"hydra.run.dir={tmp_path / name}"],
                                   tmp_path, monkeypatch, capsys)
        assert code == 0, err[-3000:]
    named, tiny = (rows_of(tmp_path / name / "similarity.csv") for name in ("named", "tiny"))
    pictures = [r["file"] for r in named if r["file"]]
    assert len(pictures) == 2 and pictures == [r["file"] for r in tiny if r["file"]]
    for file in pictures:  # the same pipeline, embeddings and seeds: the same bytes
        assert (tmp_path / "named" / file).read_bytes() == (tmp_path / "tiny" / file).read_bytes()
    assert sum(len(embeds) for embeds in NamedKandinsky.calls) == 2
    assert '"family": "named_kandinsky"' in (tmp_path / "named" / "manifest.json").read_text()


class Recording(lenses.DirectLens):
    """The direct lens, keeping what the run hands its `values`."""

    name = "recording_direct"
    seen: list = []

    def values(self, encoder, cache, components, embeds):
        self.seen.append((encoder, cache, list(components), embeds))
        return {}


def test_a_lens_values_get_the_runs_encoder_cache_components_and_its_own_embeddings(registries, tmp_path,
                                                                                    monkeypatch, capsys) -> None:
    from dsl_cli.encoder import HookedEncoder

    lenses.register(Recording)
    code, err = dsl_in_process(["run", *TINY, "layer=2", "component=all", "decode.enabled=false",
                                "lens.name=recording_direct", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (encoder, cache, components, embeds), = Recording.seen
    assert isinstance(encoder, HookedEncoder) and cache.embeds.shape == (2, encoder.d_embed)
    assert [c.label for c in components] == [r["component"] for r in rows_of(tmp_path / "r" / "similarity.csv")[:5]]
    assert [c.label for c in components] == ["L02H00", "L02H01", "L02H02", "L02H03", "L02MLP"]
    torch.testing.assert_close(embeds, encoder.direct(cache, components))


def test_an_unknown_name_is_one_line_naming_the_registered_ones(tmp_path, monkeypatch, capsys) -> None:
    for setting, line in [
        ("lens.name=nothing", "lens='nothing': choose one of diffusion, direct, steering, logit, attribution "
                              "(one of your own: import the module that registers it, then call dsl_cli.cli.main"),
        ("study.name=nothing", "study='nothing': choose one of head_importance, overlay_removal (one of your own"),
        ("study.lenses=[steering,nothing]", "lens='nothing': choose one of"),
        ("study.lenses=[diffusion]", "study.lenses: lens diffusion reads no attention head, which a study scores"),
        ("study.stepz=3", "study.stepz: no such setting"),  # a misspelt key: refused as the config is composed
    ]:
        study = [] if setting.startswith(("lens.", "study.name")) else ["study=head_importance"]
        code, err = dsl_in_process(["run", "debug=tiny", *study, setting, f"hydra.run.dir={tmp_path / 'r'}"],
                                   tmp_path, monkeypatch, capsys)
        assert code == 2 and line in err and len(err.strip().splitlines()) == 1, (setting, err)
        assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- what every registered one keeps


@pytest.fixture
def tiny_config():
    """`compose` of the run config with debug=tiny and the given overrides (no run)."""
    register_configs()

    def make(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
            return compose(config_name="run", overrides=["debug=tiny", *overrides])

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def config_of(group: str, name: str) -> dict:
    from omegaconf import OmegaConf

    path = CONFIGS / group / f"{name}.yaml"
    assert path.is_file(), f"no config {path.relative_to(CONFIGS.parent)}"
    return OmegaConf.to_container(OmegaConf.load(path))


@pytest.mark.parametrize("name", list(lenses.LENSES))
def test_every_lens_has_its_config_columns_and_figures_and_needs_no_network(name, tiny_config, no_network) -> None:
    cls = lenses.LENSES[name]
    assert config_of("lens", name)["name"] == name
    assert set(cls.columns) <= set(SIMILARITY.columns)
    assert all(f.split("/")[0] in RunFolder.FIGURES and f.endswith(".png") for f in cls.figures)
    cfg = tiny_config(f"lens={name}")
    assert lenses.get_lens(cfg.lens).name == name
    wanted, problems = cls(cfg.lens).needs(cfg.encoder)
    assert isinstance(wanted, list) and isinstance(problems, list)


@pytest.mark.parametrize("name", list(study_registry.STUDIES))
def test_every_study_has_its_config_settings_tables_and_figures_and_needs_no_network(name, tiny_config,
                                                                                     no_network) -> None:
    cls = study_registry.STUDIES[name]
    assert config_of("study", name)["name"] == name
    assert set(config_of("study", name)) - {"name"} <= set(cls.settings)  # its config sets only what it reads
    assert set(cls.settings) <= set(StudyConfig.__dataclass_fields__) and "lenses" in cls.settings
    assert cls.tables[0].name == f"study_{name}.csv" and all(isinstance(t, Table) for t in cls.tables)
    assert cls.figures and all(f.split("/")[0] in RunFolder.FIGURES and f.endswith(".png") for f in cls.figures)
    cfg = tiny_config(f"study={name}")
    study_registry.validate_study(cfg.study, cfg.seed)
    for decoding in ("true", "false"):
        wanted, problems = study_registry.get_study(name).needs(tiny_config(f"study={name}",
                                                                            f"decode.enabled={decoding}"))
        assert wanted == [] and problems == []  # the tiny decoder is built, never downloaded


@pytest.mark.parametrize("name", list(decoder.FAMILIES))
def test_every_decoder_family_has_a_config_and_says_what_it_needs_without_the_network(name, tiny_config,
                                                                                      no_network) -> None:
    cls = decoder.FAMILIES[name]
    configs = sorted(p.stem for p in (CONFIGS / "decoder").glob("*.yaml") if config_of("decoder", p.stem).get("family")
                     == name)
    assert configs, f"no config in configs/decoder/ has family: {name}"
    assert cls.pipeline.__module__.startswith("diffusers")  # an unmodified diffusers pipeline
    pretrained = tiny_config(f"decoder={configs[0]}").decoder
    assert pretrained.family == name and pretrained.source == "pretrained"
    wanted, problems = cls.needs(pretrained)  # what the preflight looks up, named, not yet looked up
    assert [w.repo for w in wanted] == [pretrained.repo_id] and problems == []
    assert cls.needs(tiny_config(f"decoder.family={name}").decoder) == ([], [])  # the tiny one is built here
    multiple = cls.size_multiple_for("tiny")
    decoder.check_request("tiny", "ddpm", multiple, multiple, name)


def test_dsl_check_composes_a_run_with_a_plugins_configs(registries, plugin_configs) -> None:
    """`dsl check` reads the run's config as `dsl run` does: `hydra.searchpath` (the plugins' config folder) is
    kept where Hydra's other settings are dropped; it was `Could not find 'decoder/named_kandinsky_tiny'`."""
    from dsl_cli import check

    decoder.FAMILIES[NamedKandinsky.name] = NamedKandinsky
    lenses.register(NegatedDirect)
    cfg = check.compose([*TINY, "decoder=named_kandinsky_tiny", "lens=negated_direct", plugin_configs[1],
                         "hydra.run.dir=elsewhere"])
    assert cfg.decoder.family == "named_kandinsky" and cfg.lens.name == "negated_direct"


class Misshapen(lenses.DirectLens):
    """A plugin lens that breaks the contract in the way `case` says."""

    name = "misshapen"
    columns = ("mode",)
    case = ""

    def embeddings(self, encoder, cache, components):
        embeds = super().embeddings(encoder, cache, components)
        if self.case == "raises":
            raise ValueError("my lens's bug")
        if self.case == "nan":
            return embeds * float("nan")
        return embeds[:, :-1] if self.case == "embeddings" else embeds[..., :5] if self.case == "width" else embeds

    def row(self) -> dict:
        return {"mode": "x", "modee": 1} if self.case == "row" else {"mode": "x"}

    def values(self, encoder, cache, components, embeds) -> dict:
        if self.case == "values_undeclared":
            return {"attribution": torch.zeros(embeds.shape[:2])}
        if self.case == "values_shape":
            return {"mode": torch.zeros(embeds.shape[0])}
        return {}


@pytest.mark.parametrize(("case", "message"), [
    ("embeddings", "lens=misshapen: embeddings() gave a tensor of shape (2, 4, 32) for 2 images and 5 components"),
    # another width than the encoder's: `internal error (a bug in dsl)` when scored
    ("width", "lens=misshapen: embeddings() gave a tensor of shape (2, 5, 5) for 2 images and 5 components of an "
              "encoder that embeds into 32; a lens gives [image, component, d_embed] = (2, 5, 32)"),
    ("row", "lens=misshapen: row() gave 'modee', which the lens does not declare in `columns` (mode)"),
    # NaN embeddings of a lens's own making: they were blamed on the model ("the model overflows ... in fp32")
    ("nan", "the misshapen lens embedding or its score is not finite (NaN or inf) with encoder.dtype=fp32; the "
            "encoder's own embedding is finite: look first at lens misshapen's own code (test_plugins.Misshapen)"),
    ("values_undeclared", "lens=misshapen: values() gave 'attribution', which the lens does not declare"),
    ("values_shape", "lens=misshapen: values() gave 'mode' of shape (2,); each value is [image, component] = (2, 5)"),
])
def test_a_plugin_lens_that_breaks_its_contract_is_named_before_anything_is_decoded(
        case, message, registries, plugin_configs, tmp_path, monkeypatch, capsys) -> None:
    """An undeclared row key was refused by the CSV writer after the pictures were decoded, a short embeddings
    tensor was `internal error (a bug in dsl)`, and an undeclared column was written silently."""
    monkeypatch.setattr(Misshapen, "case", case)
    lenses.register(Misshapen)
    (plugin_configs[0] / "lens" / "misshapen.yaml").write_text("name: misshapen\n")
    code, err = dsl_in_process(["run", *TINY, "layer=1", "component=all", "lens=misshapen", plugin_configs[1],
                                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and message in err and "internal error" not in err, err[-2000:]
    assert not list((tmp_path / "run").glob("images/*/misshapen/*.png"))  # nothing decoded


def test_a_plugin_lens_that_raises_is_named_as_code_outside_dsl(registries, plugin_configs, tmp_path, monkeypatch,
                                                                capsys) -> None:
    """An exception raised in a plugin's own code was `internal error (a bug in dsl)`: the line names the plugin's
    file, line and function instead."""
    monkeypatch.setattr(Misshapen, "case", "raises")
    lenses.register(Misshapen)
    (plugin_configs[0] / "lens" / "misshapen.yaml").write_text("name: misshapen\n")
    code, err = dsl_in_process(["run", *TINY, "layer=1", "lens=misshapen", plugin_configs[1],
                                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 1 and "a bug in dsl" not in line, line
    assert f"internal error (in code outside dsl, {__file__}:" in line and "in embeddings), ValueError: my lens's bug" in line


def test_a_plugin_study_whose_run_returns_no_summary_is_named(registries, plugin_configs, tmp_path, monkeypatch,
                                                              capsys) -> None:
    """A study's run() that returned None was `internal error (a bug in dsl), AttributeError`."""
    lenses.register(NegatedDirect)
    study_registry.register_study(type("Silent", (LensAgreement,), {"run": lambda self, *args: None}))
    code, err = dsl_in_process(["run", *TINY, "layer=2", "study=lens_agreement", plugin_configs[1],
                                f"hydra.run.dir={tmp_path / 'silent'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "study=lens_agreement: run() returned NoneType, not the manifest's summary" in err, err
