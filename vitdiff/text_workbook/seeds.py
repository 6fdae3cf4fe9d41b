"""A profile's seeds: each filed as it is judged, read back while its config and code are unchanged, so seeds
that take hours accumulate one a sitting (:func:`run_text_seeds`)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from ..checkpoint import copy_atomically, write_atomically
from ..workbook import Profile, map_runs, results_dir, save_results
from ..workbook.figures import TEXT_NOTEBOOK
from .figures import prompt_grid_file
from .profiles import TEXT_SETUPS, make_text_config, text_protocol
from .runs import SEED_FACTS, run_text_seed, seed_keys, text_run_dir


def text_seed_folder(out_dir: Path, file_results: bool = False) -> Path:
    """Where notebook 07 files its seeds: ``out_dir/results/07_text_to_image/``, or with ``file_results`` the
    committed ``experiments/results/07_text_to_image/``."""
    return results_dir(out_dir, file_results) / TEXT_NOTEBOOK


def file_text_seed(result: dict, folder: Path, profile: Profile, grid: Path) -> None:
    """File one judged seed (:func:`run_text_seed`) under ``folder``: its prompt grid (``grid``, a ``.png`` with
    its ``.pdf`` beside it) as ``samples/<profile>/prompt_grid_seed<seed>.png`` and ``.pdf``, its loss curve in
    ``<profile>_curves.csv``, the protocol in ``<profile>.json`` and, last, its rows in ``<profile>.csv`` (what marks
    the seed as filed), each replacing that seed's earlier files atomically: a seed killed while filing is not filed,
    and none filed before it is lost."""
    import pandas as pd

    seed = result["rows"][0]["seed"]

    def with_this_seed(path: Path, new):
        if not path.is_file():
            return new
        old = _read_filed(path)
        return pd.concat([old[old["seed"] != seed], new], ignore_index=True)

    curves, rows = (with_this_seed(folder / f"{profile.name}{suffix}.csv", pd.DataFrame(result[key]))
                    for suffix, key in (("_curves", "curve"), ("", "rows")))
    (folder / "samples" / profile.name).mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".pdf"):
        copy_atomically(grid.with_suffix(suffix), prompt_grid_file(folder, profile, seed, suffix))
    # The record describes every seed filed once this one is: their seeds and the threads each trained on.
    threads = threads_by_seed(rows)
    filed_profile = replace(profile, seeds=tuple(sorted(threads)))
    record = json.dumps({"protocol": text_protocol(filed_profile, threads=threads), "profile": asdict(filed_profile)},
                        indent=1)
    write_atomically(folder / f"{profile.name}.json", lambda handle: handle.write(record.encode()))
    _write_filed(folder / f"{profile.name}_curves.csv", curves)
    _write_filed(folder / f"{profile.name}.csv", rows)


def threads_by_seed(rows) -> dict[int, float]:
    """Each seed's thread count from its rows (NaN for a seed filed before the count was recorded)."""
    if "threads" not in rows:
        return {}
    return {int(seed): threads for seed, threads in rows.drop_duplicates("seed")[["seed", "threads"]].values}


def _write_filed(path: Path, table) -> None:
    table = table.sort_values("seed", kind="stable")
    write_atomically(path, lambda handle: table.to_csv(handle, index=False, float_format="%.6g"))


def _drop_text_seeds(folder: Path, profile: Profile, seeds) -> None:
    """Remove ``seeds`` (stale: filed by another config or code) from the profile's rows under ``folder``, rows
    first (what marks a seed as filed), then curves; their prompt grids are replaced when they are filed again."""
    for suffix in ("", "_curves"):
        path = folder / f"{profile.name}{suffix}.csv"
        if path.is_file():
            table = _read_filed(path)
            _write_filed(path, table[~table["seed"].isin(seeds)])


def _read_filed(path: Path):
    """A filed table, its keys read as text (a 12-digit hex key of digits alone would otherwise become a number)."""
    import pandas as pd

    return pd.read_csv(path, dtype={"config_key": str, "code_key": str})


def _text_seed_states(folder: Path, profile: Profile, runs_dir: Path) -> dict[int, bool]:
    """Each seed filed under ``folder`` for the profile -> whether it is current: filed by the same config and code,
    judged at the profile's guidance scales and caption count, with its curve and prompt grid."""
    path = folder / f"{profile.name}.csv"
    if not path.is_file():
        return {}
    rows = _read_filed(path)
    curves_path = folder / f"{profile.name}_curves.csv"
    curve_seeds = set(_read_filed(curves_path)["seed"]) if curves_path.is_file() else set()
    setup, states = TEXT_SETUPS[profile.name], {}
    for seed, filed in rows.groupby("seed"):
        config = make_text_config(profile, int(seed), runs_dir)
        states[int(seed)] = (all(key in filed and (filed[key] == value).all()
                                 for key, value in seed_keys(config).items())
                             and (filed["n"] == profile.eval_n).all()
                             and set(filed["guidance"]) == set(setup.guidance)
                             and seed in curve_seeds
                             and all(prompt_grid_file(folder, profile, int(seed), suffix).is_file()
                                     for suffix in (".png", ".pdf")))
    return states


def filed_text_seeds(folder: Path, profile: Profile, runs_dir: Path):
    """(rows, curves) of the profile's seeds that are filed under ``folder`` and current (:func:`_text_seed_states`);
    empty frames (with a ``seed`` column) when there are none."""
    import pandas as pd

    states = _text_seed_states(folder, profile, runs_dir)
    current = [seed for seed in profile.seeds if states.get(seed)]
    if not current:
        return pd.DataFrame(columns=["seed"]), pd.DataFrame(columns=["seed"])
    rows, curves = (_read_filed(folder / f"{profile.name}{suffix}.csv") for suffix in ("", "_curves"))
    return rows[rows["seed"].isin(current)], curves[curves["seed"].isin(current)]


def _copy_committed_seeds(profile: Profile, out_dir: Path, runs_dir: Path, states: dict[int, bool]) -> None:
    """Copy into ``out_dir``'s own results (whose seeds' ``states`` are given) the profile's seeds that are current
    in the committed results and not there: a run without ``file_results`` then reads the committed seeds back, as
    the campaign's notebooks do, and trains only the others, leaving the committed files untouched."""
    folder, committed = text_seed_folder(out_dir), text_seed_folder(out_dir, file_results=True)
    if committed.resolve() == folder.resolve():
        return
    rows, curves = filed_text_seeds(committed, profile, runs_dir)
    for seed in sorted(set(rows["seed"]) - {seed for seed, is_current in states.items() if is_current}):
        file_text_seed({"rows": rows[rows["seed"] == seed].to_dict("records"),
                        "curve": curves[curves["seed"] == seed].to_dict("records")},
                       folder, profile, prompt_grid_file(committed, profile, seed))


def run_text_seeds(profile: Profile, out_dir: Path, *, workers: int | None = None, threads: int = 1,
                   progress: bool = True, file_results: bool = False):
    """Every seed of the profile -> (rows, curves, runs): the alignment rows (one per seed, split, guidance and
    attribute), the training loss by step, and one row of facts per seed.

    A seed filed by the same config and code (:func:`filed_text_seeds`) is read back; the others train in
    ``workers`` processes of ``threads`` threads each (:func:`run_text_seed`), and each is filed as it finishes
    (:func:`file_text_seed`) in :func:`text_seed_folder`. So a profile's seeds can be trained one sitting at a
    time: ``seeds: [0]``, then ``[0, 1]`` reads seed 0 back and trains seed 1. Without ``file_results`` the seeds
    current in the committed results are read back too (copied into ``out_dir``'s results), so a default run
    reproduces the committed one and leaves the tree unchanged. Filing into the committed results
    (``file_results``) refuses, before any training, to replace seeds filed there by another config or code; in
    ``out_dir`` they are replaced. The rows are also saved with :func:`vitdiff.workbook.save_results` in ``out_dir``."""
    from ..config import ConfigError

    folder, runs_dir = text_seed_folder(out_dir, file_results), out_dir / "runs"
    states = _text_seed_states(folder, profile, runs_dir)
    stale = sorted(seed for seed, is_current in states.items() if not is_current)
    if stale and file_results:
        raise ConfigError(f"{folder / profile.name}.csv holds seeds {stale} filed by another config or code, which "
                          "filing here would replace: keep them (run without file_results, or with the config they "
                          "were filed by), or remove them first (git rm the profile's files there)")
    if not file_results:
        _drop_text_seeds(folder, profile, stale)
        _copy_committed_seeds(profile, out_dir, runs_dir, states)
        states = _text_seed_states(folder, profile, runs_dir)
    todo = [seed for seed in profile.seeds if not states.get(seed)]

    def file(job, result):
        seed = job[1]
        grid = text_run_dir(make_text_config(profile, seed, runs_dir), seed, runs_dir) / "prompt_grid.png"
        file_text_seed(result, folder, profile, grid)

    # A seed of several threads takes as many cores: fewer at once then.
    workers = workers or max(1, min(len(todo), (os.cpu_count() or 1) // threads))
    map_runs(run_text_seed, [(profile, seed, runs_dir, threads) for seed in todo], workers=workers, progress=progress,
             on_result=file)
    rows, curves = filed_text_seeds(folder, profile, runs_dir)
    missing = sorted(set(profile.seeds) - set(rows["seed"]))
    if missing:
        raise RuntimeError(f"seeds {missing} of {profile.name} were trained but are not filed under {folder}")
    save_results(rows, profile, out_dir, protocol_line=text_protocol(profile, threads=threads_by_seed(rows)))
    # Seeds filed before a fact was recorded read back without it (blank).
    runs = rows.drop_duplicates("seed").reindex(columns=["seed", *SEED_FACTS]).reset_index(drop=True)
    return rows, curves, runs
