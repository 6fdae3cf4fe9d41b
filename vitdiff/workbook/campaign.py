"""``python -m vitdiff.campaign 04 --profile cpu-long``: a long campaign that accumulates over sittings.

A notebook's study (:mod:`vitdiff.workbook.studies`) at a long profile is more runs than one sitting holds. This
command trains only the runs that are missing from ``experiments/results/<notebook>/<profile>.csv``, two one-thread
runs at a time, files each run's row the moment it finishes (and with ``--commit`` commits it), says how many runs
and CPU-hours remain, and can be killed and restarted at any point: a finished run is never lost (rows are written
atomically) and an interrupted one resumes from its last pause.

A filed row is *done* only while its config key and its code key (:func:`vitdiff.workbook.runs.code_key`) equal
what the current code builds; a row with other keys is *stale*: it is listed, retrained when the campaign runs,
and no verdict is filed while it stands. The budget arms (each study's reference and most different arm, seeds
0 and 1) come first: their learning curves are what the long budget is chosen by. A comparison whose loss MDE over
the profile's 4 seeds is above 2% of the loss then gets 4 seeds more for both its arms (:func:`precision_seeds`).

``--judge`` files the verdicts of every comparison at every budget of the profile (``steps`` column of
``verdicts.csv``) from the committed rows.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpoint import write_atomically
from ..config import ConfigError
from . import runs as runs_module
from .figures import notebook_figures
from .profiles import REPO_ROOT, Profile, get_profile, output_dir
from .runs import (_code_key_of, _run_job, _write_json, config_key, evaluate_run, file_run, make_config, map_runs,
                   one_thread, pause_points, results_dir, run_rows, slug)
from .studies import STUDIES, Study, study

# runs.code_key parses every numeric module again for each run it keys (about 0.7 s a job: planning 05 took 20 s,
# and a campaign plans every notebook to find shared runs). A source text's syntax tree never changes, so the parse
# is cached here; runs.py itself stays as it is, because its source is part of every filed run's code key.
runs_module._code_without_docs = functools.lru_cache(maxsize=64)(runs_module._code_without_docs)

BUDGET_SEEDS = (0, 1)
# A comparison whose loss MDE over the profile's seeds (at least 4) is above this fraction of the reference's loss
# gets as many seeds again, once (4 -> 8 at cpu-long): the campaign's rule for a precise enough answer.
PRECISION_MDE = 0.02


@dataclass(frozen=True)
class Job:
    """One (arm, seed) of a study, with the keys a filed row must carry to count as done."""
    study: Study
    arm: str
    seed: int
    config_key: str
    code_key: str


def plan(notebook: str, profile: Profile, rows=None) -> list[Job]:
    """Every run of a notebook's study at a profile, budget arms (seeds 0, 1) first, then seed by seed, then the
    seeds that the filed ``rows`` (default: the committed ones) call for (:func:`precision_seeds`)."""
    chosen = study(notebook, profile)
    runs = output_dir(chosen.notebook, profile) / "runs"
    rows = filed_rows(chosen.notebook, profile) if rows is None else rows
    order = [(arm, seed) for seed in BUDGET_SEEDS if seed in profile.seeds for arm in chosen.budget_arms]
    order += [(v.name, seed) for seed in profile.seeds for v in chosen.variants if (v.name, seed) not in order]
    jobs = [_job(chosen, arm, seed, profile, runs) for arm, seed in order]
    # Only rows the current code and config reproduce decide on more seeds (a stale row is retrained first).
    more = precision_seeds(chosen, profile, rows_of(rows, {(job.arm, job.seed) for job in status(jobs, rows)["done"]}))
    return jobs + [_job(chosen, v.name, seed, profile, runs)
                   for seed in sorted({s for seeds in more.values() for s in seeds})
                   for v in chosen.variants if seed in more.get(v.name, ())]


def _job(chosen: Study, arm: str, seed: int, profile: Profile, runs: Path) -> Job:
    config = make_config(chosen.variant(arm), profile, seed, runs / "unused")
    return Job(chosen, arm, seed, config_key(config), _code_key_of(config))


def precision_seeds(chosen: Study, profile: Profile, rows) -> dict[str, tuple[int, ...]]:
    """The extra seeds each arm needs: both arms of a comparison on the loss get as many seeds again as the profile
    has (numbered on from its largest seed, so ``--seeds`` moves them too) once every profile seed of both is filed
    and their paired MDE is above ``PRECISION_MDE`` of the reference's loss. The rule is the long campaign's: a
    profile without budgets (cpu, gpu, paper) or with fewer than 4 seeds (smoke, the probe) gets none."""
    from ..findings import paired_stats

    if len(profile.seeds) < 4 or not profile.budgets or not len(rows) or "loss" not in rows:
        return {}
    extra = tuple(range(max(profile.seeds) + 1, max(profile.seeds) + 1 + len(profile.seeds)))
    base = rows[rows["seed"].isin(profile.seeds)]
    more: dict[str, tuple[int, ...]] = {}
    for comparison in chosen.comparisons:
        if comparison.metric != "loss":
            continue
        table = base[base["variant"].isin([comparison.arm, comparison.reference])].pivot_table(
            index="seed", columns="variant", values="loss", aggfunc="first").reindex(
            index=list(profile.seeds), columns=[comparison.arm, comparison.reference])
        if table.isna().any().any():
            continue  # not every profile seed of both arms is filed yet
        stats = paired_stats(table[comparison.arm].to_numpy(float), table[comparison.reference].to_numpy(float),
                             comparison, "loss")
        if stats["mde_rel"] > PRECISION_MDE:
            for arm in (comparison.arm, comparison.reference):
                more[arm] = extra
    return more


def rows_of(frame, pairs: set[tuple[str, int]]):
    """The rows (or curve points) of ``frame`` whose (variant, seed) is one of ``pairs``."""
    return frame[[pair in pairs for pair in zip(frame["variant"], frame["seed"])]] if len(frame) else frame


def filed_rows(notebook: str, profile: Profile, folder: Path | None = None):
    """The filed rows of a notebook at a profile (an empty frame when none)."""
    import pandas as pd

    path = (folder or results_dir(Path(), True)) / notebook / f"{profile.name}.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["variant", "seed"])


def own_runs(rows):
    """The filed rows whose runs were trained for their notebook, not filed from another notebook's run
    (``same_run_as``, :func:`share_filed_runs`): what counts a run's time once."""
    return rows[rows["same_run_as"].isna()] if "same_run_as" in rows else rows


def status(jobs: list[Job], rows, unmeasured: set[tuple[str, int]] = frozenset()) -> dict[str, list[Job]]:
    """Jobs by state: ``done`` (a filed row with the same keys), ``stale`` (a filed row with other keys),
    ``legacy`` (a row filed before runs carried keys: readable as filed, not verifiable), ``missing`` (no row), and
    ``incomplete``: a current row whose (arm, seed) is in ``unmeasured`` (:func:`unmeasured_budgets`), filed again
    from a run that has every budget or trained again."""
    states: dict[str, list[Job]] = {"done": [], "stale": [], "legacy": [], "missing": [], "incomplete": []}
    keyed = {"config_key", "code_key"} <= set(rows.columns)
    for job in jobs:
        mine = rows[(rows["variant"] == job.arm) & (rows["seed"] == job.seed)]
        if not len(mine):
            states["missing"].append(job)
        elif not keyed or mine["code_key"].isna().iloc[0]:
            states["legacy"].append(job)
        elif mine["config_key"].iloc[0] == job.config_key and mine["code_key"].iloc[0] == job.code_key:
            states["incomplete" if (job.arm, job.seed) in unmeasured else "done"].append(job)
        else:
            states["stale"].append(job)
    return states


def unmeasured_budgets(notebook: str, profile: Profile, rows, folder: Path | None = None) -> set[tuple[str, int]]:
    """The filed runs (``rows``: :func:`filed_rows`) of a notebook whose curve lacks the Fréchet metric at one of the
    profile's budgets before its last step: a pause whose measurement was lost (a run killed between its checkpoint
    and its measurement, filed before :func:`measure_missed_pause`), which leaves that budget's verdicts a seed
    short."""
    import pandas as pd

    path = (folder or results_dir(Path(), True)) / notebook / f"{profile.name}_curves.csv"
    budgets = {steps for steps in profile.budgets if steps < profile.steps}
    if not budgets or not len(rows):
        return set()
    curves = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["variant", "seed", "step", "fd"])
    measured = curves[curves["fd"].notna()].groupby(["variant", "seed"])["step"].agg(set)
    return {(arm, int(seed)) for arm, seed in zip(rows["variant"], rows["seed"])
            if not budgets <= measured.get((arm, seed), set())}


def describe(notebook: str, profile: Profile, states: dict[str, list[Job]], rows) -> str:
    """How far a campaign is: runs done, stale and missing, and the CPU-hours the rest needs at the mean wall time
    of the filed runs of each arm (of all arms where an arm has none yet)."""
    todo = states["stale"] + states["missing"]
    legacy = f", {len(states['legacy'])} filed before runs carried keys" if states["legacy"] else ""
    incomplete = states.get("incomplete", [])
    unmeasured = f", {len(incomplete)} lacking a budget's measurement" if incomplete else ""
    line = (f"{notebook} @ {profile.name}: {len(states['done'])} done{legacy}, {len(states['stale'])} stale"
            f"{unmeasured}, {len(states['missing'])} missing")
    more = [job for job in todo if job.seed not in profile.seeds]
    if more:
        line += (f" ({len(more)} of them seeds beyond the profile's {len(profile.seeds)}, where the loss MDE is "
                 f"above {PRECISION_MDE:.0%})")
    if "wall_s" in rows and len(rows) and rows["wall_s"].notna().any():
        by_arm = rows.groupby("variant")["wall_s"].mean()
        hours = sum(by_arm.get(job.arm, rows["wall_s"].mean()) for job in todo) / 3600
        line += f"; about {hours:.1f} CPU-hours to go (mean wall time of the filed runs)"
    return line


def _commit(paths: list[Path], message: str) -> None:
    """Commit just these paths (nothing else staged is swept in); retried while another git holds the index."""
    relative = [str(path.relative_to(REPO_ROOT)) for path in paths if path.exists()]
    for _ in range(10):
        subprocess.run(["git", "-C", str(REPO_ROOT), "add", "--", *relative], check=False, capture_output=True)
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "commit", "-q", "-m", message, "--", *relative],
                              capture_output=True, text=True)
        if done.returncode == 0 or "nothing" in done.stdout + done.stderr:
            return
        time.sleep(3)
    print(f"campaign: could not commit {relative}: {done.stderr.strip()}", file=sys.stderr)


def commit_filed(folder: Path, notebook: str, profile: Profile, what: str) -> None:
    """Commit a notebook's filed rows, curves, samples and protocol with everything they regenerate."""
    base = folder / notebook
    _commit([base / f"{profile.name}.csv", base / f"{profile.name}_curves.csv", base / f"{profile.name}.json",
             base / "samples" / profile.name, *refresh(notebook, profile)],
            f"campaign {notebook} @ {profile.name}: {what}")


def train_jobs(jobs: list[Job], profile: Profile, runs: Path, folder: Path, *, workers: int | None = None,
               commit: bool = False):
    """Train ``jobs`` (one thread each, ``workers`` at a time), filing each run's row under ``folder`` (a results
    folder) as it lands, and with ``commit`` committing it. Returns (results, curves) of the trained runs."""
    if not jobs:
        return run_rows([])
    from ..metrics import check_frechet_metric

    check_frechet_metric(profile.dataset)  # before any training: the evaluation must be able to run
    _key_sources_when_loaded()  # the code this process trains, before the first run
    for job in jobs:
        measure_missed_pause(job, profile, runs)
    name = jobs[0].study.notebook
    campaign = os.getpid()
    specs = [(campaign, (job.study.variant(job.arm), profile, job.seed, runs, {})) for job in jobs]

    def land(spec, row):
        file_run(row, folder / name, profile, runs)
        print(f"filed {name} {row['variant']} seed {row['seed']}: loss {row['loss']:.4f}, fd {row['fd']:.1f}, "
              f"{row['wall_s']:.0f} s", flush=True)
        if commit:
            commit_filed(folder, name, profile, f"{row['variant']} seed {row['seed']} filed")

    return run_rows(map_runs(_run_job_for_campaign, specs, workers=workers, progress=False, on_result=land))


def _run_job_for_campaign(spec: tuple) -> dict:
    """A queued run (``(campaign pid, run spec)``), trained only while the campaign that queued it is alive. A
    stopped campaign (SIGTERM to its process group) dies at once, while its workers save their runs and would
    otherwise go on with the runs still queued, training them where no one can file them and holding their
    directories' locks against the next campaign: such a worker exits instead. Nor is a run trained by a process
    whose code was edited on disk since it loaded it (:func:`check_code_unchanged`)."""
    campaign, job = spec
    if campaign not in (os.getpid(), os.getppid()):  # run in the campaign's process, or by its worker
        os._exit(0)
    check_code_unchanged()
    return _run_job(job)


def _key_sources() -> dict[str, str]:
    """The sha1 of the file, as it is on disk now, of every module a run's code key may read: the numeric modules
    (:data:`vitdiff.workbook.runs.NUMERIC_MODULES`) and every module of :mod:`vitdiff.models`, each loaded now if it
    is not yet (the same modules every time, whatever a run has imported since)."""
    import hashlib
    import importlib
    import pkgutil

    models = importlib.import_module("vitdiff.models")
    names = {*runs_module.NUMERIC_MODULES, models.__name__,
             *(f"{models.__name__}.{module.name}" for module in pkgutil.iter_modules(models.__path__))}
    return {name: hashlib.sha1(Path(importlib.import_module(name).__file__).read_bytes()).hexdigest()
            for name in sorted(names)}


@functools.cache
def _key_sources_when_loaded() -> dict[str, str]:
    """:func:`_key_sources` the first time this process asks: the code it loaded (it starts training at once)."""
    return _key_sources()


def check_code_unchanged() -> None:
    """Refuse to start a run in a process whose keyed modules were edited on disk since it loaded them.

    A run's code key is read from the files on disk when the run starts (:func:`vitdiff.workbook.runs.code_key`;
    runs.py stays as it is, its source being in every filed key), while the process trains the code it loaded: a
    campaign left running while its user edits a model would file the old code's numbers under the new code's key,
    a row that reads as current but is not."""
    edited = [name for name, digest in _key_sources().items() if _key_sources_when_loaded().get(name) != digest]
    if edited:
        files = ", ".join(name.replace(".", "/") + ".py" for name in edited)
        raise ConfigError(f"{files} changed on disk after this campaign loaded it: its next run would train the old "
                          "code under the new code's key. Restart the campaign (the same command) to train the "
                          "code on disk; every run filed so far is kept")


def measure_missed_pause(job: Job, profile: Profile, runs: Path) -> bool:
    """Measure the pause that an interrupted run's checkpoint has reached but its learning curve lacks.

    A run checkpoints at each pause and then measures there; one killed in between would resume past that pause
    without its point, and the budget's verdict would lack a seed. The measurement is a function of the checkpoint
    alone (fixed images, noise and sampler seed, one thread), so taking it before resuming files the numbers the
    run would have filed. The training seconds of the killed segment were never written and stay uncounted.
    (This lives here rather than in ``run_variant``: an edit to runs.py changes the code key of every filed run.)"""
    from ..trainer import Trainer

    out = run_folder(runs, job)
    progress_file = out / "progress.json"
    if not (out / "last.pt").is_file() or (out / "result.json").is_file():
        return False
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"code_key": job.code_key}
    if progress.get("code_key") != job.code_key:
        return False  # begun by other code: run_variant starts it afresh
    with one_thread():
        trainer = Trainer(make_config(job.study.variant(job.arm), profile, job.seed, out), progress=False)
        curve = progress.get("curve", [])
        if trainer.step not in pause_points(profile) or any(point["step"] == trainer.step for point in curve):
            return False
        point = {"step": trainer.step, **evaluate_run(trainer, profile, fd=trainer.step in profile.budgets
                                                      or trainer.step == profile.steps)}
    seconds = {"startup_s": 0.0, "train_s": 0.0, "eval_loss_s": 0.0, "eval_fd_s": 0.0, **progress.get("seconds", {})}
    for name in ("eval_loss_s", "eval_fd_s"):
        seconds[name] += point.pop(name, 0.0)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if line.strip()] if (out / "metrics.jsonl").is_file() else []
    losses = [record["loss"] for record in logged if record.get("step", 0) <= trainer.step and "loss" in record]
    _write_json(progress_file, {"curve": [*curve, point], "seconds": seconds, "code_key": job.code_key,
                                "train_loss": losses[-1] if losses else progress.get("train_loss")})
    print(f"measured {job.study.notebook} {job.arm} seed {job.seed} at step {trainer.step}, where it was stopped "
          "after its checkpoint and before its measurement", flush=True)
    return True


def run_folder(runs: Path, job: Job) -> Path:
    """Where ``run_variant`` keeps a job's checkpoints and measurements."""
    return runs / job.arm.replace("/", "_") / f"seed{job.seed}"


# -- the budget probe -----------------------------------------------------------------------------------------
def probe_profile(profile: Profile, steps: int) -> Profile:
    """The budget probe of a long profile: its budget arms, seeds 0 and 1, trained on to ``steps``, with the
    Fréchet metric at the profile's budgets and at every doubling of its steps up to ``steps``
    (:mod:`vitdiff.workbook.budget` reads the curves)."""
    if steps <= profile.steps:
        raise ConfigError(f"a probe of {profile.name} trains past its {profile.steps} steps: ask for more (e.g. "
                         f"--probe {2 * profile.steps})")
    doublings = [profile.steps * 2 ** k for k in range(1, 32) if profile.steps * 2 ** k < steps]
    return replace(profile.with_overrides(**{"train.steps": steps}), name=f"{profile.name}-probe",
                   seeds=BUDGET_SEEDS, budgets=tuple(sorted({*profile.budgets, profile.steps, *doublings, steps})))


def continue_runs(jobs: list[Job], profile: Profile, probe: Profile) -> int:
    """Start each probe job from the profile's own finished run of the same arm, seed and code (its checkpoint
    and learning curve), where this machine has one: the learning rate is constant after warm-up and the EMA
    decay depends on the step alone, so a run trained on past ``profile.steps`` is that run up to there (a test
    checks it). Without the profile's run the probe trains from step 0, to the same numbers. Returns how many
    runs were continued."""
    continued = 0
    for job in jobs:
        source = run_folder(output_dir(job.study.notebook, profile) / "runs", job)
        target = run_folder(output_dir(job.study.notebook, probe) / "runs", job)
        if (target / "last.pt").exists() or not (source / "result.json").is_file():
            continue
        if json.loads((source / "result.json").read_text()).get("code_key") != job.code_key:
            continue
        for name in ("progress.json", "metrics.jsonl", "last.pt"):  # the checkpoint last: it marks the copy done
            write_atomically(target / name, lambda handle, name=name: handle.write((source / name).read_bytes()))
        continued += 1
    return continued


# -- one run, several notebooks -------------------------------------------------------------------------------
def _training_config(config) -> dict:
    """A config as training sees it: without the run's name, its folder and the model section (compared by the
    network it builds, since a switch set to its default builds the same network)."""
    return {key: value for key, value in config.to_dict().items() if key not in ("name", "out_dir", "model")}


def same_network(first, second) -> bool:
    """Whether two configs build the same network: the same modules and, once both get the same random weights
    (every parameter and buffer drawn from one seeded stream, so zero-initialised layers cannot hide a
    difference), the same training loss on the same inputs."""
    import torch

    from ..build import batch_condition, build_diffusion, build_model, data_geometry

    models = []
    for config in (first, second):
        torch.manual_seed(0)
        model = build_model(config)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        models.append(model.eval())
    if str(models[0]) != str(models[1]) or list(models[0].state_dict()) != list(models[1].state_dict()):
        return False
    _, loss_fn = build_diffusion(first)
    channels, size = data_geometry(first)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, channels, size, size, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    with torch.no_grad():
        losses = [loss_fn.loss_at(model, x0, sigma, noise, batch_condition(model, [0, 1, 2, 3], "cpu"))
                  for model in models]
    return torch.equal(losses[0], losses[1])


def share_filed_runs(jobs: list[Job], profile: Profile, folder: Path) -> list[Job]:
    """File for each job the done run of another notebook that trains the same network on the same config (05's
    IU-ViT is 04's ``skip: concat_linear`` under another name): its row, curve and samples, named for this arm,
    with ``same_run_as`` saying whose run it is. A run is trained once. Returns the jobs still to train."""
    import pandas as pd

    if not jobs:
        return jobs
    runs = output_dir(jobs[0].study.notebook, profile) / "runs"
    done_elsewhere = []
    for notebook in STUDIES:
        other_jobs = plan(notebook, profile)
        if other_jobs[0].study.notebook != jobs[0].study.notebook:
            other = other_jobs[0].study.notebook
            rows = filed_rows(other, profile, folder)
            done_elsewhere += status(other_jobs, rows, unmeasured_budgets(other, profile, rows, folder))["done"]
    todo = []
    for job in jobs:
        config = make_config(job.study.variant(job.arm), profile, job.seed, runs)
        twin = next((other for other in done_elsewhere
                     if other.seed == job.seed and other.code_key == job.code_key
                     and _training_config(config) == _training_config(
                         other_config := make_config(other.study.variant(other.arm), profile, other.seed, runs))
                     and same_network(config, other_config)), None)
        if twin is None:
            todo.append(job)
            continue
        source = folder / twin.study.notebook
        rows = filed_rows(twin.study.notebook, profile, folder)
        row = rows[(rows["variant"] == twin.arm) & (rows["seed"] == twin.seed)].iloc[0].dropna().to_dict()
        curves = pd.read_csv(source / f"{profile.name}_curves.csv")
        curve = curves[(curves["variant"] == twin.arm) & (curves["seed"] == twin.seed)].drop(columns=["variant", "seed"])
        record = {**row, "variant": job.arm, "config_key": job.config_key,
                  "same_run_as": f"{twin.study.notebook}: {twin.arm}",
                  "curve": [point.dropna().to_dict() for _, point in curve.iterrows()]}
        file_run(record, folder / job.study.notebook, profile, runs)
        picture = source / "samples" / profile.name / f"{slug(twin.arm)}_seed{twin.seed}.png"
        if picture.is_file():
            target = folder / job.study.notebook / "samples" / profile.name / f"{slug(job.arm)}_seed{job.seed}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(picture, target)
        print(f"filed {job.study.notebook} {job.arm} seed {job.seed}: the same run as {record['same_run_as']}",
              flush=True)
    return todo


def refresh(notebook: str, profile: Profile) -> list[Path]:
    """What a landed row changes, regenerated so each committed row leaves ``report --check`` passing: the notebook's
    verdicts by budget (while no stale row stands), its figures, and the generated tables and claims."""
    from .. import report
    from ..findings import update_verdicts

    chosen, rows, curves, states = committed_study(notebook, profile)
    folder = results_dir(Path(), True)
    touched = []
    if len(rows) and not states["stale"]:
        update_verdicts(folder / "verdicts.csv", judge_study(chosen, rows, curves, profile, states=states))
        touched.append(folder / "verdicts.csv")
    try:
        touched += notebook_figures(chosen.notebook, profile.name, folder)
        touched.append(folder / chosen.notebook / "figures" / f"{profile.name}_figures.json")  # their record
    except Exception as error:  # a figure must never cost the campaign a run: say so, `make figures` redraws
        print(f"campaign: the figures of {chosen.notebook} @ {profile.name} were not drawn ({error!r})", flush=True)
    report.main([])
    return [*touched, REPO_ROOT / "experiments" / "README.md", REPO_ROOT / "README.md"]


def run(notebook: str, profile: Profile, *, workers: int = 2, commit: bool = False, limit: int | None = None,
        budget_only: bool = False, probe: int | None = None, arms: list[str] | None = None,
        profile_seeds_only: bool = False) -> None:
    """Train the missing and stale runs of a notebook's study into ``experiments/results/``, filing (and with
    ``commit`` committing) each row as it lands; ``limit`` stops after that many runs, ``budget_only`` trains only
    the budget arms, ``arms`` only the arms named (e.g. more seeds where a result surprised), ``probe`` trains the
    budget probe to that many steps instead (:func:`probe_profile`). Runs that the landed rows call for (more
    seeds where the MDE is too wide, :func:`precision_seeds`) are trained in the same call, unless
    ``profile_seeds_only`` leaves them for a later call (every arm at the profile's seeds first, in every notebook)."""
    base, profile = (profile, probe_profile(profile, probe)) if probe else (None, profile)
    folder = results_dir(Path(), True)
    tried: set[tuple[str, int]] = set()
    while True:
        name, jobs, rows, states, todo = _todo(notebook, profile, folder, probe=bool(probe),
                                               budget_only=budget_only, arms=arms,
                                               profile_seeds_only=profile_seeds_only)
        todo = [job for job in todo if (job.arm, job.seed) not in tried]
        if not todo or (limit and tried):
            break  # each round trains (arm, seed) pairs not tried before, so the loop ends
        if base is not None:
            print(f"{continue_runs(todo, base, profile)} of {len(todo)} probe runs continue the {base.name} runs "
                  "of this machine", flush=True)
        shared = share_filed_runs(todo, profile, folder)
        if commit and len(shared) < len(todo):
            commit_filed(folder, name, profile, f"{len(todo) - len(shared)} run(s) filed from other notebooks")
        unmeasured = [job for job in shared if job in states["incomplete"]]
        if unmeasured:  # training them again would read the finished run back, the same curve without the budget
            print(f"{name}: {', '.join(f'{job.arm} seed {job.seed}' for job in unmeasured)} lack a budget's "
                  "measurement and no other notebook files the same run with it: their rows stand, a seed short at "
                  "that budget (to measure it, remove the run's folder under outputs/ and its row, then run the "
                  "campaign again)", flush=True)
            shared = [job for job in shared if job not in unmeasured]
        tried |= {(job.arm, job.seed) for job in todo}
        todo = shared[:limit] if limit else shared
        print(describe(name, profile, states, rows), f"; training {len(todo)} now", flush=True)
        train_jobs(todo, profile, output_dir(name, profile) / "runs", folder, workers=workers, commit=commit)
    print(describe(name, profile, states, rows), flush=True)  # the last round's plan: with the rows just filed


def _todo(notebook: str, profile: Profile, folder: Path, *, probe: bool, budget_only: bool, arms: list[str] | None,
          profile_seeds_only: bool = False):
    """(notebook name, jobs, filed rows, states, jobs to train) of one round of :func:`run`."""
    jobs = plan(notebook, profile)
    name = jobs[0].study.notebook
    rows = filed_rows(name, profile, folder)
    if probe:  # a probe is its budget arms alone
        jobs = [job for job in jobs if job.arm in job.study.budget_arms]
    states = status(jobs, rows, unmeasured_budgets(name, profile, rows, folder))
    todo = states["stale"] + states["incomplete"] + states["missing"]
    if budget_only:
        todo = [job for job in todo if job.arm in job.study.budget_arms and job.seed in BUDGET_SEEDS]
    if profile_seeds_only:
        todo = [job for job in todo if job.seed in profile.seeds]
    if arms:
        unknown = sorted(set(arms) - {job.arm for job in jobs})
        if unknown:
            raise ConfigError(f"{name} has no arm {', '.join(map(repr, unknown))}: use one of "
                             f"{sorted({job.arm for job in jobs})}")
        todo = [job for job in todo if job.arm in arms]
    return name, jobs, rows, states, todo


# -- verdicts by budget ---------------------------------------------------------------------------------------
def budget_frames(results, curves, profile: Profile) -> dict[int, object]:
    """The per-run frame at each budget: the curve points at that step (with the Fréchet metric), and the final
    rows at the last step. A profile without budgets has its final rows only."""
    frames = {}
    for steps in profile.budgets:
        if steps < profile.steps and len(curves) and "fd" in curves:
            frame = curves[(curves["step"] == steps)]
            if len(frame) and frame["fd"].notna().any():
                frames[steps] = frame
    frames[profile.steps] = results
    return frames


def judge_study(chosen: Study, results, curves, profile: Profile, *, states: dict | None = None):
    """Every comparison of a study at every budget: one verdict table (``steps`` column). Refused while stale rows
    stand; rows filed before runs carried keys (``states["legacy"]``) are judged on the loss alone."""
    import pandas as pd

    from ..findings import VERDICT_COLUMNS, verdict_table

    states = states or {}
    stale = states.get("stale", [])
    if stale:
        raise ConfigError(f"{len(stale)} filed run(s) of {chosen.notebook} were made by other code or config "
                         f"({', '.join(f'{job.arm} seed {job.seed}' for job in stale[:5])}...): retrain them with "
                         f"`python -m vitdiff.campaign {chosen.notebook[:2]} --profile {profile.name}` "
                         "before judging")
    if states.get("legacy"):
        chosen = legacy_study(chosen)
    if not len(results):
        return pd.DataFrame(columns=list(VERDICT_COLUMNS))
    present = set(results["variant"])
    comparisons = [c for c in chosen.comparisons if {c.arm, c.reference} <= present]
    tables = [verdict_table(frame, comparisons, notebook=chosen.notebook, profile=profile.name, steps=steps)
              for steps, frame in budget_frames(results, curves, profile).items()]
    return pd.concat(tables, ignore_index=True)


def legacy_study(chosen: Study) -> Study:
    """A study judged on rows filed before runs carried keys: by the loss alone, because their FD was measured
    against a reference at the stored 32x32 size, not the runs' 16x16 (experiments/results/fd_validation/)."""
    return replace(chosen, comparisons=tuple(replace(c, secondary=None) for c in chosen.comparisons))


def committed_study(notebook: str, profile: Profile):
    """(study, results, curves, states) of a notebook at a profile from the committed rows alone."""
    import pandas as pd

    jobs = plan(notebook, profile)
    chosen = jobs[0].study
    folder = results_dir(Path(), True) / chosen.notebook
    rows = filed_rows(chosen.notebook, profile)
    states = status(jobs, rows)
    # Rows no planned run accounts for (extra seeds the current code no longer asks for) are kept, not judged.
    planned = {(job.arm, job.seed) for job in jobs}
    curves_path = folder / f"{profile.name}_curves.csv"
    curves = pd.read_csv(curves_path) if curves_path.is_file() else pd.DataFrame(columns=["variant", "seed", "step"])
    return chosen, rows_of(rows, planned), rows_of(curves, planned), states


def judge(notebook: str, profile: Profile, *, legacy: bool = False) -> None:
    """File the verdicts of a notebook at a profile from its committed rows (``legacy``: rows filed before runs
    carried keys are judged as filed)."""
    from ..findings import update_verdicts

    chosen, rows, curves, states = committed_study(notebook, profile)
    if states["legacy"] and not legacy:
        raise ConfigError(f"{len(states['legacy'])} rows of {chosen.notebook} @ {profile.name} were filed before runs "
                         "carried keys: judge them as filed with --legacy")
    table = judge_study(chosen, rows, curves, profile, states=states)
    update_verdicts(results_dir(Path(), True) / "verdicts.csv", table)
    print(f"{chosen.notebook} @ {profile.name}: {len(table)} verdict rows filed "
          f"(budgets {sorted(set(table['steps']))})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitdiff.campaign", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", help=f"notebook numbers ({', '.join(STUDIES)})")
    parser.add_argument("--profile", default="cpu-long", help="workbook profile (default: cpu-long)")
    parser.add_argument("--seeds", help="seeds as a list or range, e.g. 0-3 or 0,1,2 (default: the profile's)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each (default: 2)")
    parser.add_argument("--limit", type=int, help="stop after this many runs (default: all missing)")
    parser.add_argument("--budget-only", action="store_true", help="train only the budget arms (seeds 0 and 1)")
    parser.add_argument("--arm", action="append", dest="arms", metavar="NAME",
                        help="train only this arm (repeatable), e.g. --arm 'skip: none' --seeds 0-3")
    parser.add_argument("--profile-seeds-only", action="store_true",
                        help="train the profile's seeds only, leaving the extra seeds a wide MDE calls for to a later "
                             "call (every arm of every notebook at 4 seeds first)")
    parser.add_argument("--probe", type=int, metavar="STEPS",
                        help="train the budget probe instead: the budget arms (seeds 0, 1) on to STEPS, filed as "
                             "profile <profile>-probe (how the long budget is chosen)")
    parser.add_argument("--commit", action="store_true", help="git-commit each run's filed rows as they land")
    parser.add_argument("--status", action="store_true", help="only say what is done, stale and missing")
    parser.add_argument("--judge", action="store_true", help="only file the verdicts (by budget) of the filed rows")
    parser.add_argument("--legacy", action="store_true", help="with --judge: accept rows filed without keys")
    args = parser.parse_args(argv)
    from ..cli import run_command

    def command() -> int:
        try:
            profile = get_profile(args.profile)
        except ValueError as error:  # an unknown profile: one line, not a traceback
            raise ConfigError(str(error)) from error
        if args.seeds:
            profile = replace(profile, seeds=_seeds(args.seeds))
        for notebook in args.notebooks:
            if args.status or args.judge:
                shown = probe_profile(profile, args.probe) if args.probe else profile
                if args.judge:
                    judge(notebook, shown, legacy=args.legacy)
                    continue
                jobs = [job for job in plan(notebook, shown)
                        if not args.probe or job.arm in job.study.budget_arms]
                name = jobs[0].study.notebook
                rows = filed_rows(name, shown)
                print(describe(name, shown, status(jobs, rows, unmeasured_budgets(name, shown, rows)), rows))
            else:
                run(notebook, profile, workers=args.workers, commit=args.commit, limit=args.limit,
                    budget_only=args.budget_only, probe=args.probe, arms=args.arms,
                    profile_seeds_only=args.profile_seeds_only)
        return 0

    return run_command("campaign", command)


def _seeds(text: str) -> tuple[int, ...]:
    if "-" in text:
        first, last = text.split("-")
        return tuple(range(int(first), int(last) + 1))
    return tuple(int(seed) for seed in text.split(","))


if __name__ == "__main__":
    sys.exit(main())
