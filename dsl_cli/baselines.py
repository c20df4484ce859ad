"""How much the decoder adds: each decoded component again with more seeds (`decode.seeds=N`), and baseline
pictures the decoder makes from no component at all, scored against every image.

Part of the decode stage (`dsl_cli.run` calls it after the first seed's pictures):
    seeds.csv       one row per (image, component, extra seed): seeds seed+1 .. seed+N-1 (the first seed's
                    picture and sim_decoded are in similarity.csv, as without decode.seeds)
    baselines.csv   one row per (image, baseline, seed): `uncond`, the decoder's unconditional embedding
                    (`negative_embed` of the decoder's family: the negative every picture is guided away
                    from), and `mean`, the mean embedding of the run's images; each picture is decoded once
                    per seed and compared with every image's own embedding
Pictures: images/<image>/<lens>/seed<seed>/<component>.png and images/_baselines/<lens>/seed<seed>/<name>.png.
A resumed run decodes only the pictures whose file is not whole on disk or whose rows are not all there, each
with the whole batch it was first decoded in (`whole_batches`), so that it gets the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dsl_cli.outputs import (BASELINE_IMAGE, BASELINE_NAMES, BASELINES, SEEDS, RunFolder, Table, group_rows,
                             is_picture)


@dataclass
class Extra:
    """One extra picture: what to decode with which seed, where it goes, and the rows it scores, each with
    the embedding [E] its sim_decoded compares the picture with."""

    embed: Optional[torch.Tensor]  # [E]; None: the decoder's unconditional embedding (known once it is built)
    seed: int
    file: str  # relative to the run folder
    table: Table  # outputs.SEEDS | outputs.BASELINES
    rows: list[tuple[dict, torch.Tensor]] = field(default_factory=list)


def seed_extras(cfg, folder: RunFolder, lens: str, scored: list, decoded: list[tuple[int, int]]) -> list[Extra]:
    """The extra seeds of every decoded (image, component) pair: `decode.seeds` - 1 pictures each."""
    extras = []
    for i, k in decoded:
        image, component = scored[i].name, scored[i].rows[k]["component"]
        for seed in range(cfg.seed + 1, cfg.seed + cfg.decode.seeds):
            row = {"image": image, "lens": lens, "component": component, "seed": seed}
            extra = Extra(scored[i].embeds[k], seed, folder.picture(image, lens, component, seed), SEEDS)
            extra.rows.append((row, scored[i].clean))
            extras.append(extra)
    return extras


def baseline_extras(cfg, folder: RunFolder, lens: str, scored: list) -> list[Extra]:
    """The baseline pictures, one per baseline and seed, each scoring a row of every image."""
    embeds = {"uncond": None, "mean": torch.stack([s.clean for s in scored]).mean(0)}
    extras = []
    for seed in range(cfg.seed, cfg.seed + cfg.decode.seeds):
        for name in BASELINE_NAMES:
            extra = Extra(embeds[name], seed, folder.picture(BASELINE_IMAGE, lens, name, seed), BASELINES)
            extra.rows += [({"image": s.name, "lens": lens, "component": name, "seed": seed}, s.clean)
                           for s in scored]
            extras.append(extra)
    return extras


def _keys(extra: Extra) -> list[tuple[str, str, str]]:
    """(table, file, image) of each row the extra scores: what names a row of seeds.csv or baselines.csv."""
    return [(extra.table.name, extra.file, row["image"]) for row, _ in extra.rows]


def _read_extras(folder: RunFolder, extras: list[Extra]) -> tuple[list[Table], dict[tuple[str, str, str], dict]]:
    """The tables of these extras, and their rows by `_keys` (a row repeated by an edit: the first)."""
    tables = [table for table in (SEEDS, BASELINES) if any(extra.table == table for extra in extras)]
    found: dict[tuple[str, str, str], dict] = {}
    for table in tables:
        for row in folder.read(table):
            found.setdefault((table.name, row["file"], row["image"]), row)
    return tables, found


def _write_extras(folder: RunFolder, tables: list[Table], extras: list[Extra], found: dict) -> None:
    """Each table rewritten with the rows of `extras` found, in decoding order."""
    for table in tables:
        folder.write(table, [found[key] for extra in extras if extra.table == table for key in _keys(extra)
                             if key in found])


def start_extras(folder: RunFolder, extras: list[Extra], batch_size: int | str) -> list[Extra]:
    """Keep the rows of an earlier attempt's extras that are done, each row once (a row repeated by an edit
    counted its seed twice in `seed_spread`), and return the extras still to decode. An extra is done when its
    picture is whole on disk and every row it scores is there, and so is every other extra of its decode batch
    (`whole_batches`)."""
    tables, found = _read_extras(folder, extras)
    done = {extra.file for extra in extras
            if all(key in found for key in _keys(extra)) and is_picture(folder.file(extra.file))}
    done -= whole_batches(batch_size, [extra.file for extra in extras], done)
    _write_extras(folder, tables, [extra for extra in extras if extra.file in done], found)
    return [extra for extra in extras if extra.file not in done]


def order_extras(folder: RunFolder, extras: list[Extra]) -> None:
    """Every extra's rows in decoding order: a resumed run appends the pictures it decoded again after the
    rows it kept, and the uninterrupted run's tables are in this order."""
    tables, found = _read_extras(folder, extras)
    _write_extras(folder, tables, extras, found)


def whole_batches(batch_size: int | str, plan: list, done: set) -> set:
    """The items of every decode batch of `plan` (its items in decoding order, `batch_size` a batch) that is
    not all in `done`: a picture decoded again is decoded with the whole batch it was first decoded in, so that
    float round-off (which depends on the batch) gives it the same bytes. With decode.batch_size=auto the
    batches depend on the free memory: none are redone whole."""
    if type(batch_size) is not int or batch_size < 1:
        return set()
    redo: set = set()
    for start in range(0, len(plan), batch_size):
        batch = plan[start:start + batch_size]
        if not done.issuperset(batch):
            redo.update(batch)
    return redo


def score_extras(folder: RunFolder, extras: list[Extra], again: torch.Tensor) -> None:
    """Append the rows of decoded extras: again [N, E], the saved pictures re-encoded."""
    for extra, picture in zip(extras, again):
        rows = []
        for row, clean in extra.rows:
            sim = torch.nn.functional.cosine_similarity(picture, clean.float(), dim=0).item()
            rows.append({**row, "sim_decoded": sim, "file": extra.file})
        folder.log(extra.table).append(rows)


def seed_spread(run_dir: Path, rows: list[dict]) -> list[dict]:
    """similarity.csv rows with `sim_decoded_mean` and `sim_decoded_std` (sample standard deviation) over
    every seed of their component: the first seed's sim_decoded and its rows in seeds.csv."""
    extra = group_rows(RunFolder(run_dir).read(SEEDS), ("image", "component"))
    for row in rows:
        values = [r["sim_decoded"] for r in extra.get((row["image"], row["component"]), [])]
        if row["sim_decoded"] is not None and values:
            values.append(row["sim_decoded"])
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            row.update(sim_decoded_mean=mean, sim_decoded_std=std)
    return rows
