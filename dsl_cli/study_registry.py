"""Interventional studies as registered classes (DESIGN.md section 3, "Interventional studies").

A study is a `Study` subclass in the `STUDIES` registry (`@register_study`); `dsl run study=<name>` runs it
instead of decoding (its config: `dsl_cli/configs/study/<name>.yaml`, `name: <name>` and its settings, fields of
`config.StudyConfig`). The runner, the preflight, `dsl plot` and the pages name none of them:

- head_importance:  ablation importance of each head, correlated with each lens's score (`studies.head_importance`)
- overlay_removal:  heads ablated in each lens's order, a greedy one and random ones (`studies.overlay_curves`)

Each study compares the lenses `study.lenses` names (any registered lens that reads heads; default steering and
direct, whose score columns are `dsl` and `direct`: `figures.score_column`).

This module is light (no model library at import): `dsl plot` and `dsl report` draw and show a study from its
files with it. What computes the built-in studies lives in `dsl_cli.studies` (torch), which registers each
stage here (`@study_stage`); the runner imports it. A study from outside may define `run` itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from dsl_cli import figures
from dsl_cli.config import StudyConfig, declare_settings, group_schema
from dsl_cli.errors import UserError, printable
from dsl_cli.figures import DEFAULT_LENSES, drawn_from_files, score_column
from dsl_cli.outputs import CORRELATIONS, IMPORTANCE, OVERLAY, RunFolder, Table, group_rows, read_manifest
from dsl_cli.weights import Needs


class Study:
    """An interventional study on the run's chosen heads. A new study is a subclass with `@register_study`, a
    config `dsl_cli/configs/study/<name>.yaml` and a test (README "Extending").

    settings  the `study.*` settings it reads (fields of `config.StudyConfig`; `name` aside)
    new_settings  settings of its own that `config.StudyConfig` lacks, name -> default (a study of the user's:
              `{"top": 10}` makes `study.top` an int setting); it reads them too
    tables    its CSVs; the first is `study_<name>.csv`, whose presence makes a folder this study's
    figures   the figures it draws, as paths in the run folder (`<composite>`: one per composite)
    pools     whether a sweep's merge computes something again over all its jobs' rows (`pool`); a sweep
              merges every study's first table either way
    apart     the overrides a pooled sweep's jobs may differ in beside those that split the heads and images
              (`sweeps.SPLIT_KEYS`): the pooled statistics keep their values apart
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ("lenses",)
    new_settings: ClassVar[dict[str, Any]] = {}
    tables: ClassVar[tuple[Table, ...]] = ()
    figures: ClassVar[tuple[str, ...]] = ()
    pools: ClassVar[bool] = False
    apart: ClassVar[tuple[str, ...]] = ()

    def validate(self, study: Any, seed: int) -> None:
        """Its own checks of `cfg.study` that need no model (beside `validate_study`'s, for every setting)."""

    def check_columns(self, columns: list[str]) -> None:
        """Refuse lenses whose score columns (`figures.score_column`) would clash with this study's own."""

    def needs(self, cfg: Any) -> Needs:
        """The weights it loads beyond the encoder (asked by the preflight before anything loads)."""
        return [], []

    def run(self, cfg: Any, run_dir: Path, encoder: Any, preprocess: Any, images: list, heads: list) -> dict:
        """Its work on the run's images and heads (`Component`s): write its tables; return the manifest's summary
        (`files`: what it wrote, to which `run_study` adds the figures `draw` drew). By default its stage
        registered with `@study_stage(name)`."""
        if self.name not in STAGES:
            raise NotImplementedError(f"study {self.name!r}: no stage registered with @study_stage and no run()")
        return STAGES[self.name](cfg, run_dir, encoder, preprocess, images, heads)

    def draw(self, run_dir: Path, config: dict) -> list[Path]:
        """Its figures, drawn from its files alone (no model: `dsl plot`); `config` the manifest's."""
        return []

    def page(self, folder: Path, html: Any) -> str:
        """The HTML of its tables on its page; `html` is `dsl_cli.report` (cells, tables, filters), handed in."""
        return ""

    def rows(self, run_dir: Path) -> list[dict]:
        """Its first table's rows, checked as its figures and page read them (`study_table`; a sweep merges
        these). By default: as many as its manifest counts."""
        return study_table(run_dir, self.tables[0], count_problem)

    def pooling_problem(self, rows: list[dict], varying: list[str]) -> str | None:
        """Why the rows of a sweep's jobs (`rows`, every job's, in job order) do not pool, None where they do;
        `varying`: the overrides the jobs differ in."""
        return None

    def pool(self, sweep_dir: Path, rows: list[dict], config: Any) -> list[Path]:
        """Compute again over every job's rows what one run computes over its own, into the sweep folder;
        returns the files written. `config`: a job's config (the jobs agree on what it is read for)."""
        return []


STUDIES: dict[str, type[Study]] = {}
# name -> the stage that computes that study: stage(cfg, run_dir, encoder, preprocess, images, heads) -> summary
STAGES: dict[str, Callable[..., dict]] = {}


def study_stage(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Function decorator: make the function the stage that `Study.run` calls for study `name`."""
    def register(stage: Callable[..., dict]) -> Callable[..., dict]:
        STAGES[name] = stage
        return stage

    return register


def decodes(cfg: Any) -> bool:
    """Whether the overlay study decodes its ablated composites (decode.enabled and some study.decode_steps)."""
    decode = cfg.get("decode")
    return bool(decode is not None and decode.enabled and cfg.study.decode_steps)


def register_study(cls: type[Study]) -> type[Study]:
    """Class decorator: make `cls` the study of `study.name=<cls.name>` (`study=<cls.name>` with its config)."""
    known = {f.name for f in fields(StudyConfig)} - {"name"}
    unknown = [s for s in cls.settings if s not in known]
    if unknown:  # refused now, not when a run reads the setting
        raise ValueError(f"study {cls.name!r}: config.StudyConfig has no setting {', '.join(map(repr, unknown))} "
                         "(a setting of the study's own goes into its `new_settings`, with its default)")
    if not cls.tables or cls.tables[0].name != f"study_{cls.name}.csv":
        raise ValueError(f"study {cls.name!r}: its first table must be study_{cls.name}.csv")
    taken = STUDIES.get(cls.name)
    if taken is not None and taken.__module__ == __name__ and cls is not taken:
        raise ValueError(f"study name {cls.name!r} is one of dsl's own studies: give yours another name")
    declare_settings("study", cls.name, cls.new_settings)  # last: a study refused leaves no setting behind
    STUDIES[cls.name] = cls
    return cls


def study_class(name: str) -> type[Study]:
    if name not in STUDIES:
        raise UserError(f"study={name!r}: choose one of {', '.join(STUDIES)} "
                        "(one of your own: import the module that registers it, then call dsl_cli.cli.main; "
                        "docs/extending.md)")
    return STUDIES[name]


def get_study(name: str) -> Study:
    """The study object of `study.name=<name>`; UserError naming the registered ones for another name."""
    return study_class(str(name))()


def find_study(folder: Path) -> Study | None:
    """The registered study whose CSV a run folder holds (its first table); None where none does."""
    return next((cls() for cls in STUDIES.values() if RunFolder(folder).csv(cls.tables[0]).is_file()), None)


def study_of_folder(folder: Path) -> Study:
    """The study whose CSV a run folder holds (its first table); UserError where none does."""
    found = find_study(folder)
    if found is not None:
        return found
    refuse_unregistered(folder)
    names = " or ".join(cls.tables[0].name for cls in STUDIES.values())
    raise UserError(f"{folder}: no study CSV here ({names})")


def refuse_unregistered(folder: Path, then: str = "redraw") -> None:
    """UserError where the run in `folder` is of a study not registered in this process (a plugin's, run from a
    script that imported it): its figures and page would be drawn, or its sweep merged, without what only its
    class knows."""
    config = (read_manifest(folder) or {}).get("config")
    named = ((config.get("study") if isinstance(config, dict) else None) or {}).get("name")
    if isinstance(named, str) and named not in STUDIES:
        raise UserError(f"{folder}: a run of study {printable(named)}, which is not registered here: import the "
                        f"module that registers it, as the run did (docs/extending.md), then {then} from there")


# ---------------------------------------------------------------- what every study shares


def validate_study(study: Any, seed: int = 0) -> None:
    """Checks on `cfg.study` that need no model (called by `dsl_cli.run.validate` before anything loads):
    the study is registered, every setting is in range, the lenses can score heads; then the study's own.
    `seed` is the run's."""
    chosen = get_study(study.name)
    if study.get("steps", 1) < 1:
        raise UserError(f"study.steps={study.steps}: must be at least 1")
    if study.get("greedy_pool") is not None and study.greedy_pool < 1:
        raise UserError(f"study.greedy_pool={study.greedy_pool}: must be at least 1 (or null for all heads)")
    if study.get("random_orders", 0) < 0:
        raise UserError(f"study.random_orders={study.random_orders}: must be 0 or more")
    if study.get("bootstrap", 1) < 1:
        raise UserError(f"study.bootstrap={study.bootstrap}: must be at least 1 (resamples)")
    if any(step < 0 for step in study.get("decode_steps", [])):
        raise UserError(f"study.decode_steps={list(study.decode_steps)}: steps are 0 or more")
    if not 0 < study.get("overlay_scale", 1) <= 1:
        raise UserError(f"study.overlay_scale={study.overlay_scale}: must be in (0, 1]")
    chosen.check_columns(check_lenses(study.get("lenses") or DEFAULT_LENSES))
    _refuse_unread(chosen, study)
    chosen.validate(study, seed)


def _refuse_unread(chosen: type["Study"], study: Any) -> None:
    """A setting changed from its default that the study does not read (`study=head_importance study.steps=3`)
    is refused: it ran, silently ignored, as if the study had used it."""
    schema = group_schema("study")  # dsl's settings and those other studies declared
    defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(schema)}
    reads = [*chosen.settings, *chosen.new_settings]
    for key, default in defaults.items():
        if key != "name" and key not in reads and key in study and study[key] != default:
            raise UserError(f"study.{key}={_typed(study[key])}: study={chosen.name} does not read it (it reads "
                            f"{', '.join(reads)}); leave it out")


def _typed(value: Any) -> Any:
    """A config value as it was typed (a list, not OmegaConf's ListConfig)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def check_lenses(names) -> list[str]:
    """The score columns of the lenses a study compares: each registered and reading heads, no column twice."""
    from dsl_cli.lenses import lens_class

    names = [str(n) for n in names]
    if not names:
        raise UserError("study.lenses=[]: name at least one lens to compare (default [steering, direct])")
    for name in names:
        cls = lens_class(name)
        if not cls.submodules or (cls.label_kinds is not None and "head" not in cls.label_kinds):
            raise UserError(f"study.lenses: lens {name} reads no attention head, which a study scores")
    columns = [score_column(n) for n in names]
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise UserError(f"study.lenses={names}: two lenses score into the column {', '.join(twice)}")
    return columns


def needs(cfg: Any) -> Needs:
    """The weights the run's study loads beyond the encoder (the preflight)."""
    return get_study(cfg.study.name).needs(cfg)


def run_study(cfg: Any, run_dir: Path, encoder: Any, preprocess: Any, images: list, components: list) -> dict:
    """Run the study `cfg.study.name` names on the run's images and the selected heads: its tables, then its
    figures drawn from them (as `dsl plot` draws them). Returns its summary for the manifest."""
    study = get_study(cfg.study.name)  # checked by `validate_study` before anything loaded
    heads = [c for c in components if c.kind == "head"]
    if not heads:
        raise UserError(f"study={study.name} ablates attention heads: select some with layer=... head=... "
                        "(component=heads)")
    summary = study.run(cfg, run_dir, encoder, preprocess, images, heads)
    if not isinstance(summary, dict):  # a plugin's run() that returned nothing: its line, not a bug of dsl's
        raise UserError(f"study={study.name}: run() returned {type(summary).__name__}, not the manifest's summary (a "
                        "dict, its `files` the tables it wrote: Study.run)")
    drawn = _draw(study, run_dir)
    summary["files"] = [*summary.get("files", []), *(str(p.relative_to(run_dir)) for p in drawn)]
    return summary


def redraw_study(run_dir: Path) -> list[Path]:
    """Draw a study's figures again from its CSVs, pictures and manifest alone (`dsl plot`)."""
    return _draw(study_of_folder(run_dir), run_dir)


def _draw(study: Study, run_dir: Path) -> list[Path]:
    config = (read_manifest(run_dir) or {}).get("config", {})
    with drawn_from_files(run_dir):
        return study.draw(run_dir, config)


# ---------------------------------------------------------------- the built-in studies


@register_study
class HeadImportance(Study):
    """Head importance correlation: per image and head, 1 - cos(e_ablated, e), correlated with each lens's score
    and with the closed-form direct importance (`studies.head_importance`)."""

    name = "head_importance"
    settings = ("ablation", "bootstrap", "lenses")
    tables = (IMPORTANCE, CORRELATIONS)  # + a column per further lens (`IMPORTANCE.with_columns`)
    figures = ("plots/head_importance.png",)
    pools = True
    apart = ("study.ablation",)  # `correlations` pools each ablation on its own

    def check_columns(self, columns: list[str]) -> None:
        taken = [c for c in columns if c in IMPORTANCE.columns and c not in ("dsl", "direct")]
        if taken:
            raise UserError(f"study.lenses: {', '.join(taken)} is already a column of {IMPORTANCE.name}")

    def rows(self, run_dir: Path) -> list[dict]:
        return study_table(run_dir, IMPORTANCE, importance_problem)

    def pooling_problem(self, rows: list[dict], varying: list[str]) -> str | None:
        """Rows that one run could have written: each (ablation, image, head) once, the same heads for every
        image (`importance_problem`); and one mean per ablation, which jobs splitting the images do not share."""
        if {"images.shard", "images.num_shards"} & set(varying) and any(r["ablation"] == "mean" for r in rows):
            return "the jobs split the images, and each took the mean of its own for mean ablation"
        found = importance_problem(rows, None)
        return f"their rows overlap or leave gaps ({found})" if found else None

    def pool(self, sweep_dir: Path, rows: list[dict], config: Any) -> list[Path]:
        """correlations.csv over every job's rows, as one run computes its own (`correlation.importance_correlations`,
        with the jobs' study.bootstrap and seed), checked as one run's is (`checked_correlations`), and the
        run's figure drawn from them (plots/head_importance.png)."""
        from dsl_cli.correlation import importance_correlations  # scipy: only a merge that pools loads it

        corr = importance_correlations(rows, figures.importance_scores(rows), int(config.study.bootstrap),
                                       int(config.seed))
        RunFolder(sweep_dir).write(CORRELATIONS, corr)
        path = RunFolder(sweep_dir).figure("plots", self.name)  # the run's figure, over every job's heads
        figures.save_figure(figures.plot_head_importance(rows, checked_correlations(sweep_dir, rows)), path)
        return [RunFolder(sweep_dir).csv(CORRELATIONS), path]

    def draw(self, run_dir: Path, config: dict) -> list[Path]:
        folder = RunFolder(run_dir)
        rows = self.rows(run_dir)
        figure = figures.plot_head_importance(rows, checked_correlations(run_dir, rows))
        path = folder.figure("plots", self.name)
        figures.save_figure(figure, path)
        return [path]

    def page(self, folder: Path, html: Any) -> str:
        rows = self.rows(folder)
        return html.importance_tables(rows, checked_correlations(folder, rows))


TableProblem = Callable[[list[dict], int | None], str | None]  # (rows, the rows written) -> what is wrong


def study_table(run_dir: Path, table: Table, problem: TableProblem) -> list[dict]:
    """A study's table, for its figures and page; UserError naming the file where `problem` finds its rows are
    not those the study wrote (as its manifest counts them, where it completed): drawn and shown as whole, a
    table cut short lost points and rows without a word, and shifted the overlay curves a step."""
    rows = RunFolder(run_dir).read(table)
    _refuse_if(run_dir, table, problem(rows, study_rows(read_manifest(run_dir) or {})))
    return rows


def checked_correlations(run_dir: Path, rows: list[dict]) -> list[dict]:
    """correlations.csv, for the head-importance figure and page; UserError naming it where its rows are not
    one per ablation, image (and `pooled`) and score of the importance rows (checked) they were computed from."""
    corr = RunFolder(run_dir).read(CORRELATIONS)
    keys = Counter((r["ablation"], r["image"], r["lens"]) for r in corr)
    expected = {(ablation, image, lens) for ablation, one in group_rows(rows, ("ablation", "image"))
                for image in (one, figures.POOLED) for lens in figures.importance_scores(rows)}
    repeated = next((key for key, count in keys.items() if count > 1), None)
    lacking, extra = sorted(expected - keys.keys()), sorted(keys.keys() - expected)
    found = (f"{_key_text(repeated)} has {keys[repeated]} rows" if repeated else
             f"lacks {_key_text(lacking[0])}" if lacking else
             f"{_key_text(extra[0])} is not one of the study's" if extra else None)
    _refuse_if(run_dir, CORRELATIONS, found)
    return corr


def _key_text(key: tuple) -> str:
    return " ".join(printable(str(part)) for part in key)


def _refuse_if(run_dir: Path, table: Table, found: str | None) -> None:
    """UserError naming a study's table where `found` says what is wrong with it."""
    if found is not None:
        raise UserError(f"{RunFolder(run_dir).csv(table)}: {found}; the file was cut short or edited: restore it, or "
                        "run the study again into a new folder (hydra.run.dir)")


def study_rows(manifest: dict) -> int | None:
    """The rows a complete study wrote into its table, as its manifest counts them; None where that is not
    known (a study that did not complete, a manifest edited)."""
    summary = manifest.get("study")
    rows = summary.get("rows") if isinstance(summary, dict) else None
    return rows if manifest.get("status") == "complete" and type(rows) is int else None


def importance_problem(rows: list[dict], written: int | None) -> str | None:
    """What is wrong with study_head_importance.csv's rows, None where nothing is: the study wrote one row per
    ablation, image and head, the same heads for every (ablation, image), `written` rows in all (None: not
    known)."""
    keys = Counter((row["ablation"], row["image"], row["component"]) for row in rows)
    repeated = next((key for key, count in keys.items() if count > 1), None)
    if repeated is not None:
        return f"{_key_text(repeated)} has {keys[repeated]} rows"
    heads = {group: {row["component"] for row in block}
             for group, block in group_rows(rows, ("ablation", "image")).items()}
    every = set().union(*heads.values())
    for (ablation, image), have in heads.items():
        if have != every:
            return f"{printable(str(ablation))} {printable(str(image))} lacks head {printable(min(every - have))}"
    return count_problem(rows, written)


def count_problem(rows: list[dict], written: int | None) -> str | None:
    """A table holding another number of rows than the `written` the study counted (None: not known)."""
    return f"{len(rows)} rows where the study wrote {written}" if written not in (None, len(rows)) else None


def overlay_table_problem(rows: list[dict], written: int | None) -> str | None:
    """What is wrong with study_overlay_removal.csv's rows, None where nothing is: each composite's every order
    holds each step once (`figures.overlay_problem`), `written` rows in all (None: not known)."""
    found = (figures.overlay_problem(group) for group in group_rows(rows, ("image",)).values())
    return next(filter(None, found), None) or count_problem(rows, written)


@register_study
class OverlayRemoval(Study):
    """Overlay removal: heads ablated cumulatively in each lens's order, an ACDC-like greedy order and random
    orders, tracing the similarity to the pasted image (`studies.overlay_curves`)."""

    name = "overlay_removal"
    settings = ("ablation", "steps", "greedy_pool", "random_orders", "overlay_scale", "overlay_position",
                "decode_steps", "lenses")
    tables = (OVERLAY,)
    figures = ("plots/overlay_removal.png", "grids/<composite>_overlay_fade.png")

    def validate(self, study: Any, seed: int) -> None:
        if study.ablation == "both":
            raise UserError("study.ablation=both: overlay removal takes one ablation (zero or mean)")
        if seed + study.random_orders - 1 >= 2**64:
            raise UserError(f"seed={seed}: the random orders use seeds up to seed + study.random_orders - 1, "
                            "which must stay below 2**64")

    def check_columns(self, columns: list[str]) -> None:
        taken = [c for c in columns if c in ("greedy", "random")]
        if taken:
            raise UserError(f"study.lenses: {', '.join(taken)} is already an order of {OVERLAY.name}")

    def needs(self, cfg: Any) -> Needs:
        """The decoder, where the study decodes its ablated composites (`decodes`)."""
        from dsl_cli.decoder import get_family

        return get_family(cfg.decoder.family).needs(cfg.decoder) if decodes(cfg) else ([], [])

    # no `pool`: each job's curves ablate its own heads in its own orders (a greedy order over a layer's heads
    # is not one over all heads), so a sweep merges the jobs' rows side by side and computes nothing again
    def rows(self, run_dir: Path) -> list[dict]:
        return study_table(run_dir, OVERLAY, overlay_table_problem)

    def draw(self, run_dir: Path, config: dict) -> list[Path]:
        folder = RunFolder(run_dir)
        rows = self.rows(run_dir)
        heads = (read_manifest(run_dir) or {}).get("components")
        figure = figures.plot_overlay_removal(rows, figures.overlay_settings(rows, config, heads))
        grids = figures.draw_fade_grids(run_dir, rows)
        path = folder.figure("plots", self.name)
        figures.save_figure(figure, path)
        return [path, *grids]

    def page(self, folder: Path, html: Any) -> str:
        return html.overlay_tables(folder, self.rows(folder))

