"""The studies of 02-05 at every profile, and the campaign's bookkeeping: keys that make edited code stale, runs
that accumulate, verdicts by budget, and a default re-run that reads the committed rows back."""
import inspect
import math
import os
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest

from vitdiff import workbook as wb
from vitdiff.findings import read_verdicts
from vitdiff.workbook import campaign, studies


@pytest.fixture(autouse=True)
def outputs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VITDIFF_OUT_DIR", str(tmp_path / "outputs"))


@pytest.mark.parametrize("profile", list(wb.PROFILES))
@pytest.mark.parametrize("notebook", list(studies.STUDIES))
def test_every_arm_builds_at_every_profile(notebook, profile):
    chosen = wb.get_profile(profile)
    study = studies.study(notebook, chosen)
    names = [variant.name for variant in study.variants]
    assert len(names) == len(set(names))
    assert set(study.budget_arms) <= set(names) and study.reference in names
    for comparison in study.comparisons:
        assert {comparison.arm, comparison.reference} <= set(names)
    for variant in study.variants:  # on the meta device: paper-scale arms cost no memory
        params, gflops = wb.model_cost_of(variant, chosen)
        assert params > 0 and gflops > 0


def test_arms_scale_with_the_profile_and_stay_matched():
    tiny, paper = wb.get_profile("cpu"), wb.get_profile("paper")
    assert studies.study("03", tiny).variant("enc 4 / dec 3").overrides["encoder_dim"] == 96
    assert studies.study("03", paper).variant("enc 7 / dec 6").overrides["encoder_dim"] == 512
    for profile in (tiny, paper):
        study = studies.study("02", profile)
        target = wb.model_cost_of(study.variant(study.reference), profile)[1]
        matched = [variant for variant in study.variants if "matched" in variant.name]
        assert len(matched) == 2
        for variant in matched:
            assert abs(wb.model_cost_of(variant, profile)[1] - target) <= 0.10 * target


@pytest.mark.parametrize("notebook", list(studies.STUDIES))
def test_every_arm_trains_one_step_at_the_smallest_size(notebook, tmp_path):
    from vitdiff.trainer import Trainer

    profile = wb.get_profile("smoke").with_overrides(**{"train.steps": 1})
    for variant in studies.study(notebook, profile).variants:
        config = wb.make_config(variant, profile, 0, tmp_path / wb.slug(variant.name))
        with wb.one_thread():
            record = Trainer(config, progress=False).fit()
        assert math.isfinite(record["loss"]), variant.name


def _edited_source(monkeypatch, module: str, addition: str):
    real = inspect.getsource

    def getsource(obj):
        text = real(obj)
        return text + addition if getattr(obj, "__name__", None) == module else text

    monkeypatch.setattr(inspect, "getsource", getsource)


def test_an_edit_to_a_models_source_makes_its_filed_run_stale(monkeypatch):
    profile = wb.get_profile("smoke")
    job = campaign.plan("04", profile)[0]  # an IU-ViT arm (vitdiff.models.vit)
    rows = pd.DataFrame([{"variant": job.arm, "seed": job.seed, "config_key": job.config_key,
                          "code_key": job.code_key}])
    assert campaign.status([job], rows)["done"] == [job]
    with monkeypatch.context() as patch:
        _edited_source(patch, "vitdiff.models.vit", "\nEDITED = 1\n")
        assert campaign.status(campaign.plan("04", profile)[:1], rows)["stale"]
    with monkeypatch.context() as patch:  # a comment is not code: the run stays
        _edited_source(patch, "vitdiff.models.vit", "\n# a reworded comment\n")
        assert campaign.status(campaign.plan("04", profile)[:1], rows)["done"]
    with monkeypatch.context() as patch:  # another family's file does not touch an IU-ViT run
        _edited_source(patch, "vitdiff.models.dit", "\nEDITED = 1\n")
        assert campaign.status(campaign.plan("04", profile)[:1], rows)["done"]
    with monkeypatch.context() as patch:  # the trainer defines every run's numbers
        _edited_source(patch, "vitdiff.trainer", "\nEDITED = 1\n")
        assert campaign.status(campaign.plan("04", profile)[:1], rows)["stale"]


def test_a_campaign_trains_only_what_is_missing_and_keeps_every_filed_row(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False: results)
    profile = replace(wb.get_profile("smoke"), budgets=(2,))
    campaign.run("04", profile, workers=1, limit=2)
    first = campaign.filed_rows("04_skip_connections", profile, results)
    assert len(first) == 2 and set(first["variant"]) == set(studies.study("04", profile).budget_arms)
    campaign.run("04", profile, workers=1, limit=1)
    rows = campaign.filed_rows("04_skip_connections", profile, results)
    states = campaign.status(campaign.plan("04", profile), rows)
    assert (len(states["done"]), len(states["missing"]), len(states["stale"])) == (3, 4, 0)
    kept = rows.merge(first[["variant", "seed"]]).sort_values("variant").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, first.sort_values("variant").reset_index(drop=True))
    # The budget's curve point carries the sample metrics; the verdicts come at both budgets.
    chosen, filed, curves, states = campaign.committed_study("04", profile)
    assert curves[curves["step"] == 2]["fd"].notna().all()
    table = campaign.judge_study(replace(chosen, comparisons=chosen.comparisons[:1]), filed, curves, profile,
                                 states=states)
    assert sorted(table["steps"]) == [2, profile.steps]
    assert (results / "04_skip_connections" / "samples" / "smoke").is_dir()


def test_stale_rows_refuse_verdicts():
    profile = wb.get_profile("smoke")
    jobs = campaign.plan("04", profile)
    with pytest.raises(ValueError, match="retrain them with"):
        campaign.judge_study(jobs[0].study, pd.DataFrame(), pd.DataFrame(), profile, states={"stale": jobs[:1]})


def _tree_status() -> str:
    return subprocess.run(["git", "-C", str(wb.REPO_ROOT), "status", "--porcelain", "--", "experiments"],
                          capture_output=True, text=True, check=True).stdout


def test_a_default_rerun_reads_the_committed_rows_back_and_leaves_the_tree_clean(tmp_path):
    before = _tree_status()
    profile = wb.get_profile("cpu")
    study = studies.study("04", profile)
    results, curves, states = wb.study_runs(study, profile, tmp_path, train=None)
    assert not states.get("trained") and len(results) == len(study.variants) * len(profile.seeds)
    table = campaign.judge_study(study, results, curves, profile, states=states)
    committed = read_verdicts(wb.REPO_ROOT / "experiments" / "results" / "verdicts.csv")
    committed = committed[(committed["notebook"] == study.notebook) & (committed["profile"] == "cpu")]
    assert list(table["comparison"]) == list(committed["comparison"])
    assert table["mean_diff"].to_numpy() == pytest.approx(committed["mean_diff"].to_numpy(), rel=1e-5)
    assert list(table["verdict"]) == list(committed["verdict"])
    wb.notebook_figures(study.notebook, "cpu", wb.REPO_ROOT / "experiments" / "results")
    assert _tree_status() == before


_TIMES = ("startup_s", "train_s", "eval_loss_s", "eval_fd_s", "samples_s", "wall_s", "img_per_s")


def test_the_notebook_run_headless_with_no_parameters_leaves_the_whole_tree_as_it_was(tmp_path):
    # What a user runs: papermill, no parameters, so the notebook's default profile (cpu-long: the committed run).
    def tree() -> str:
        return subprocess.run(["git", "-C", str(wb.REPO_ROOT), "status", "--porcelain"], capture_output=True,
                              text=True, check=True).stdout

    before = tree()
    env = {key: value for key, value in os.environ.items() if key != "VITDIFF_PROFILE"}
    env |= {"PYTHONPATH": str(wb.REPO_ROOT), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
            "VITDIFF_OUT_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "papermill", "notebooks/04_skip_connections.ipynb",
                             str(tmp_path / "out.ipynb")], cwd=wb.REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree() == before
    assert (tmp_path / "04_skip_connections" / "cpu-long").is_dir()  # its outputs went to the user's folder


def test_a_run_killed_between_its_checkpoint_and_its_measurement_files_the_same_row(tmp_path, monkeypatch):
    profile = replace(wb.get_profile("smoke"), budgets=(2,))
    for name in ("whole", "killed"):
        monkeypatch.setenv("VITDIFF_OUT_DIR", str(tmp_path / name / "outputs"))
        monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False, name=name: tmp_path / name)
        if name == "killed":  # the checkpoint at the budget is written, then the process dies before measuring
            real = wb.runs.evaluate_run

            def dies_at_the_budget(trainer, *args, **kwargs):
                if trainer.step == 2:
                    raise KeyboardInterrupt
                return real(trainer, *args, **kwargs)

            with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
                patch.setattr(wb.runs, "evaluate_run", dies_at_the_budget)
                campaign.run("04", profile, workers=1, limit=1)
        campaign.run("04", profile, workers=1, limit=1)
    whole, killed = (pd.read_csv(tmp_path / name / "04_skip_connections" / "smoke_curves.csv")
                     for name in ("whole", "killed"))
    assert list(killed["step"]) == [1, 2, 3, 4] and killed["fd"].notna().sum() == 2
    columns = [c for c in whole if c not in _TIMES]
    pd.testing.assert_frame_equal(killed[columns], whole[columns])
    rows = [pd.read_csv(tmp_path / name / "04_skip_connections" / "smoke.csv") for name in ("whole", "killed")]
    columns = [c for c in rows[0] if c not in _TIMES]
    pd.testing.assert_frame_equal(rows[1][columns], rows[0][columns])


def test_a_run_two_notebooks_share_is_trained_once(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False: tmp_path)
    profile = wb.get_profile("smoke")
    campaign.run("04", profile, workers=1, limit=1)  # skip: concat_linear seed 0, the IU-ViT preset as it is
    iuvit, unet = campaign.plan("05", profile)[:2]
    assert (iuvit.arm, unet.arm) == ("IU-ViT", "U-Net (matched params)")
    assert campaign.share_filed_runs([iuvit, unet], profile, tmp_path) == [unet]
    filed = campaign.filed_rows("05_vit_vs_unet", profile, tmp_path).iloc[0]
    source = campaign.filed_rows("04_skip_connections", profile, tmp_path).iloc[0]
    assert filed["same_run_as"] == "04_skip_connections: skip: concat_linear"
    assert (filed["loss"], filed["fd"], filed["code_key"]) == (source["loss"], source["fd"], source["code_key"])
    assert campaign.status([iuvit], campaign.filed_rows("05_vit_vs_unet", profile, tmp_path))["done"] == [iuvit]
    assert (tmp_path / "05_vit_vs_unet" / "samples" / "smoke" / "iu-vit_seed0.png").is_file()
    # A switch that changes the network is another run, even where it adds no parameter.
    runs = tmp_path / "runs"
    reference = wb.make_config(studies.study("04", profile).variant("skip: concat_linear"), profile, 0, runs)
    for arm in ("skip: add", "skip: lerp", "pos: sincos", "head: linear (no conv)"):
        other = wb.make_config(studies.study("04", profile).variant(arm), profile, 0, runs)
        assert not campaign.same_network(reference, other), arm


def test_a_run_whose_budget_measurement_was_lost_is_filed_again_from_its_twin_that_has_it(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False: tmp_path)
    profile = replace(wb.get_profile("smoke"), budgets=(2,))
    campaign.run("04", profile, workers=1, limit=1)  # skip: concat_linear seed 0, measured at its budget (step 2)
    iuvit, concat = campaign.plan("05", profile)[0], campaign.plan("04", profile)[0]
    assert campaign.share_filed_runs([iuvit], profile, tmp_path) == []
    curves_path = tmp_path / "04_skip_connections" / "smoke_curves.csv"
    curves = pd.read_csv(curves_path)
    assert curves.loc[curves["step"] == 2, "fd"].notna().all()
    # The budget's measurement lost in 04 (a run filed before a missed pause was measured on resume).
    curves.loc[curves["step"] == 2, "fd"] = float("nan")
    curves.to_csv(curves_path, index=False)
    rows = campaign.filed_rows("04_skip_connections", profile, tmp_path)
    assert campaign.unmeasured_budgets("04_skip_connections", profile, rows, tmp_path) == {
        ("skip: concat_linear", 0)}
    states = campaign.status([concat], rows, {("skip: concat_linear", 0)})
    assert states["incomplete"] == [concat] and not states["done"]
    assert "1 done" not in campaign.describe("04_skip_connections", profile, states, rows)
    assert "1 lacking a budget's measurement" in campaign.describe("04_skip_connections", profile, states, rows)
    # 05 files the same run with the measurement: 04's row and curve are filed again from it, and are complete.
    assert campaign.share_filed_runs([concat], profile, tmp_path) == []
    assert not campaign.unmeasured_budgets("04_skip_connections", profile,
                                           campaign.filed_rows("04_skip_connections", profile, tmp_path), tmp_path)
    assert campaign.filed_rows("04_skip_connections", profile, tmp_path).iloc[0]["same_run_as"] == (
        "05_vit_vs_unet: IU-ViT")
    # A twin that lacks the measurement too is no source: the run stays as filed.
    for notebook in ("04_skip_connections", "05_vit_vs_unet"):
        path = tmp_path / notebook / "smoke_curves.csv"
        curves = pd.read_csv(path)
        curves.loc[curves["step"] == 2, "fd"] = float("nan")
        curves.to_csv(path, index=False)
    assert campaign.share_filed_runs([concat], profile, tmp_path) == [concat]


def test_the_budget_probe_continues_the_profiles_runs_to_the_numbers_of_a_run_from_scratch(tmp_path, monkeypatch):
    base = replace(wb.get_profile("smoke"), budgets=(2,))
    probe = campaign.probe_profile(base, 8)
    assert (probe.name, probe.steps, probe.seeds, probe.budgets) == ("smoke-probe", 8, (0, 1), (2, 4, 8))
    with pytest.raises(ValueError, match="--probe 8"):
        campaign.probe_profile(base, 4)
    for name in ("continued", "scratch"):
        monkeypatch.setenv("VITDIFF_OUT_DIR", str(tmp_path / name / "outputs"))
        monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False, name=name: tmp_path / name)
        if name == "continued":
            campaign.run("04", base, workers=1, limit=1)
        campaign.run("04", base, workers=1, limit=1, probe=8)
    curves = {name: pd.read_csv(tmp_path / name / "04_skip_connections" / "smoke-probe_curves.csv")
              for name in ("continued", "scratch")}
    assert list(curves["continued"]["step"]) == [1, 2, 3, 4, 6, 8]  # the base run's pauses, then the probe's
    assert list(curves["scratch"]["step"]) == [2, 4, 6, 8]
    shared = curves["continued"][curves["continued"]["step"].isin([2, 4, 6, 8])].reset_index(drop=True)
    columns = [c for c in shared if c not in _TIMES]
    pd.testing.assert_frame_equal(shared[columns], curves["scratch"][columns])


def test_the_settled_budget_is_the_first_step_near_the_end_with_the_final_order():
    from vitdiff.workbook.budget import budget_curves, budget_lines, settled_budget

    def curves(fd_a, fd_b, loss_a=(3, 2, 1, 0.5), loss_b=(4, 3, 2, 1)):
        return pd.DataFrame([{"variant": arm, "seed": seed, "step": step, "loss": loss + seed * 1e-3, "fd": fd}
                             for arm, fds, losses in (("a", fd_a, loss_a), ("b", fd_b, loss_b))
                             for step, fd, loss in zip((400, 1000, 2000, 4000), fds, losses) for seed in (0, 1)])

    # FD within 10% of the end from 2000 on for both arms, and the order held from there: settled at 2000.
    step, why = settled_budget(budget_curves(curves((100, 60, 42, 40), (150, 80, 52, 50))))
    assert step == 2000 and "within 10%" in why
    # Still falling by half over the last doubling: not settled, and it says by how much.
    step, why = settled_budget(budget_curves(curves((100, 80, 60, 30), (150, 90, 70, 35))))
    assert step is None and "a -50%" in why and "held" in why
    # Near the end in FD, but the order by loss flips at the last point: not settled there.
    step, why = settled_budget(budget_curves(curves((41, 41, 41, 40), (50, 50, 50, 50), loss_b=(4, 3, 2, 0.4))))
    assert step is None and "order by loss changed between 2000 and 4000" in why
    lines = budget_lines(curves((100, 60, 42, 40), (150, 80, 52, 50)))
    assert lines[2].startswith("| 400 | 3.0005 / 100.0 (2) | 4.0005 / 150.0 (2) |")


@pytest.mark.parametrize("argv, message", [
    (["04", "--profile", "smoke", "--arm", "skip: nope"], "has no arm 'skip: nope': use one of"),
    (["09", "--status"], "no study for notebook '09'"),
    (["04", "--profile", "nope", "--status"], "unknown profile 'nope'"),
    (["04", "--profile", "smoke", "--probe", "2", "--status"], "ask for more (e.g. --probe 8)"),
])
def test_campaign_mistakes_are_one_line_that_says_what_to_do(argv, message, capsys):
    assert campaign.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("campaign: ") and message in err and "Traceback" not in err


def test_no_committed_notebook_carries_papermills_injected_parameters():
    # A committed run's `-p file_results True` left in the notebook would make every default run (and nbval) file
    # its rows into experiments/results/.
    import json

    for path in sorted((wb.REPO_ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        assert not [c for c in cells if "injected-parameters" in c.get("metadata", {}).get("tags", [])], path.name


def _loss_rows(jobs, losses):
    """Filed rows of ``jobs`` with the keys that make them done and the given loss of each (arm, seed)."""
    return pd.DataFrame([{"variant": job.arm, "seed": job.seed, "loss": losses(job.arm, job.seed),
                          "config_key": job.config_key, "code_key": job.code_key, "wall_s": 1.0} for job in jobs])


def test_a_comparison_whose_mde_is_above_2_percent_of_the_loss_gets_as_many_seeds_again():
    profile = replace(wb.get_profile("smoke"), seeds=(0, 1, 2, 3), budgets=(2,))  # a long campaign's shape
    jobs = campaign.plan("04", profile, rows=pd.DataFrame(columns=["variant", "seed", "loss"]))
    comparison = jobs[0].study.comparisons[0]
    pair = [job for job in jobs if job.arm in (comparison.arm, comparison.reference)]
    noisy = {0: 0.0, 1: 0.06, 2: -0.05, 3: 0.02}  # paired differences spread over ~10% of a loss of 0.5
    for spread, wanted in ((1.0, (4, 5, 6, 7)), (0.01, ())):
        rows = _loss_rows(pair, lambda arm, seed: 0.5 + (spread * noisy[seed] if arm == comparison.arm else 0))
        assert campaign.precision_seeds(jobs[0].study, profile, rows).get(comparison.arm, ()) == wanted
        more = {(job.arm, job.seed) for job in campaign.plan("04", profile, rows=rows)} - {(j.arm, j.seed) for j in jobs}
        assert more == {(arm, seed) for arm in (comparison.arm, comparison.reference) for seed in wanted}
    # Until every profile seed of both arms is filed, nothing more is planned.
    rows = _loss_rows(pair[:-1], lambda arm, seed: 0.5 + (noisy[seed] if arm == comparison.arm else 0))
    assert campaign.precision_seeds(jobs[0].study, profile, rows) == {}
    assert campaign.precision_seeds(jobs[0].study, wb.get_profile("smoke"), rows) == {}  # 1 seed: no rule
    rows = _loss_rows(pair, lambda arm, seed: 0.5 + (noisy[seed] if arm == comparison.arm else 0))
    assert campaign.precision_seeds(jobs[0].study, profile, rows)  # ... which the cpu profile (no budgets) lacks
    assert campaign.precision_seeds(jobs[0].study, replace(profile, budgets=()), rows) == {}
    # Rows the current code does not reproduce (stale keys) decide nothing.
    stale = rows.assign(code_key="other")
    assert len(campaign.plan("04", profile, rows=stale)) == len(jobs)


def test_a_campaign_trains_the_seeds_its_landed_rows_call_for_in_the_same_call(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False: results)
    profile = replace(wb.get_profile("smoke"), seeds=(0, 1, 2, 3), budgets=(2,))
    comparison = studies.study("04", profile).comparisons[0]
    rounds = []

    def file_fake_rows(todo, profile, runs, folder, **_):  # what training would file: noisy paired losses
        rounds.append(sorted({job.seed for job in todo}))
        path = folder / todo[0].study.notebook / f"{profile.name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = _loss_rows(todo, lambda arm, seed: 0.5 + (0.05 * (-1) ** seed if arm == comparison.arm else 0))
        pd.concat([pd.read_csv(path), new] if path.is_file() else [new]).to_csv(path, index=False)

    monkeypatch.setattr(campaign, "train_jobs", file_fake_rows)
    # Asked for the profile's seeds only, the call stops there; the next call trains the seeds they call for.
    campaign.run("04", profile, workers=1, arms=[comparison.arm, comparison.reference], profile_seeds_only=True)
    assert rounds == [[0, 1, 2, 3]]
    campaign.run("04", profile, workers=1, arms=[comparison.arm, comparison.reference])
    assert rounds == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rows = campaign.filed_rows("04_skip_connections", profile, results)
    missing = campaign.status(campaign.plan("04", profile, rows), rows)["missing"]
    assert len(rows) == 16 and not [job for job in missing if job.arm in (comparison.arm, comparison.reference)]


def test_a_larger_probe_extends_the_earlier_probes_runs_to_the_numbers_of_a_run_from_scratch(tmp_path, monkeypatch):
    # `--probe 16000` after `--probe 8000`: the filed 8000-step rows are stale, and their runs resume from step 8000.
    base = replace(wb.get_profile("smoke"), budgets=(2,))
    for name, probes in (("extended", (8, 16)), ("scratch", (16,))):
        monkeypatch.setenv("VITDIFF_OUT_DIR", str(tmp_path / name / "outputs"))
        monkeypatch.setattr(campaign, "results_dir", lambda out_dir, file_results=False, name=name: tmp_path / name)
        for steps in probes:
            campaign.run("04", base, workers=1, limit=1, probe=steps)
    folder = {name: tmp_path / name / "04_skip_connections" for name in ("extended", "scratch")}
    curves = {name: pd.read_csv(path / "smoke-probe_curves.csv") for name, path in folder.items()}
    rows = {name: pd.read_csv(path / "smoke-probe.csv") for name, path in folder.items()}
    assert list(curves["extended"]["step"]) == [2, 4, 6, 8, 12, 16]  # the 8-step probe's pauses, then the 16's
    assert list(curves["scratch"]["step"]) == [2, 4, 8, 12, 16]
    shared = curves["extended"][curves["extended"]["step"].isin(curves["scratch"]["step"])].reset_index(drop=True)
    columns = [c for c in shared if c not in _TIMES]
    pd.testing.assert_frame_equal(shared[columns], curves["scratch"][columns])
    assert len(rows["extended"]) == 1 and rows["extended"]["steps"].tolist() == [16]
    columns = [c for c in rows["scratch"] if c not in _TIMES]
    pd.testing.assert_frame_equal(rows["extended"][columns], rows["scratch"][columns])


def test_a_worker_whose_campaign_is_gone_exits_instead_of_training_the_queued_runs():
    import multiprocessing
    import os

    from vitdiff.workbook.campaign import _run_job_for_campaign

    context = multiprocessing.get_context("spawn")
    # Queued by a campaign that is not this worker's parent (it died): the worker exits before looking at the run.
    orphan = context.Process(target=_run_job_for_campaign, args=((os.getpid() + 10**6, None),))
    # Queued by its live parent: it goes on to the run (an empty spec here, so the run itself fails).
    child = context.Process(target=_run_job_for_campaign, args=((os.getpid(), None),))
    for process in (orphan, child):
        process.start()
        process.join(120)
    assert orphan.exitcode == 0 and child.exitcode == 1
    with pytest.raises(TypeError):  # one worker: the run is trained in the campaign's own process
        _run_job_for_campaign((os.getpid(), None))


def test_a_campaign_refuses_to_train_code_edited_on_disk_since_it_loaded_it(monkeypatch):
    import importlib
    import os
    import sys

    from vitdiff.config import ConfigError

    # A keyed module that a run imports after the campaign looked (the flop counter's vitdiff.models.catalog) is
    # not an edit.
    monkeypatch.delitem(sys.modules, "vitdiff.models.catalog", raising=False)
    campaign._key_sources_when_loaded.cache_clear()
    campaign._key_sources_when_loaded()  # what this process loaded
    importlib.import_module("vitdiff.models.catalog")
    campaign.check_code_unchanged()  # nothing edited since
    loaded = campaign._key_sources()
    assert {"vitdiff.models.vit", "vitdiff.models.catalog", "vitdiff.workbook.runs"} <= set(loaded)
    # A model file saved while the campaign runs: its next run would train the loaded code under the new key.
    monkeypatch.setattr(campaign, "_key_sources", lambda: {**loaded, "vitdiff.models.vit": "edited"})
    with pytest.raises(ConfigError, match=r"vitdiff/models/vit\.py changed on disk .* Restart the campaign"):
        campaign._run_job_for_campaign((os.getpid(), None))  # refused before the run (an empty spec) is looked at
