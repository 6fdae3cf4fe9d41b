"""What the notebooks share, in rooms: ``profiles`` (the recipe and sizes every notebook runs), ``runs`` (one
(variant, seed) trained and measured on one thread; workers; result files), ``figures`` (every notebook's figures from its results files, sample grids; the one style is ``style``),
``studies`` (the arms and comparisons of 02-05 at any profile), ``campaign`` (training what is missing of a study,
filing each run as it lands; ``python -m vitdiff.campaign``), ``budget`` (whether a budget has settled),
``notebook`` (what a notebook calls to read its runs back, judge them and show the answer) and ``widgets``
(explorers for JupyterLab).

A notebook declares its variants (a name, a model family, switch overrides) and calls :func:`run_ablation`; every
variant is trained with every seed of the profile through the same :class:`vitdiff.trainer.Trainer` that
``vitdiff train`` uses, one thread a run, then measured with the same protocol:

* ``loss`` and ``loss@<sigma>``: the training objective of the EMA model on the same held-out images with the same
  noise at fixed noise levels (:data:`LOSS_SIGMAS`), and their mean: the primary, low-noise metric, also measured
  during training (the learning curves);
* ``fd``: the Fréchet distance of n EMA samples: ``FD-<data>-clf@n`` on the features of a pinned small classifier
  for the embedded sets (it is *not* FID), Inception FID from local weights for the others
  (:func:`vitdiff.metrics.frechet_metric`).

Seed s gives every arm the same data order, noise draws and (where shapes allow) initialisation, so arms are
compared by paired differences (:mod:`vitdiff.findings`).
"""
from .profiles import (PROFILES, QUICKSTART_PROFILE_CHANGES, REPO_ROOT, Profile, ProfileChanges, fd_label,
                       get_profile, output_dir, protocol, quickstart_profile, sampling_protocol, training_protocol)
from .runs import (CURVE_FRACTIONS, LOSS_SIGMAS, Variant, config_key, evaluate_run, judge, make_config,
                   map_runs, match_flops, model_cost, model_cost_of, one_thread, results_dir, run_ablation,
                   run_rows, run_variant, save_results, file_run, slug, code_key, pause_points, sigma_column,
                   sigma_losses, summarize)
from .figures import (check_outputs, class_labels, notebook_figures, paper_style, plot_alignment, plot_findings,
                      plot_quality_vs_gflops, plot_rate_verdicts, sample_file, save_figure, save_samples,
                      show_class_rows, show_conclusion, show_figures, show_grid, stale_figures)
from .widgets import explorer, sample_explorer
from .studies import SCALES, STUDIES, Study, study
from .budget import show_budget
from .campaign import judge_study
from .notebook import (cost_line, file_table, file_verdicts, rows_folder, setup, show_verdicts, study_runs, summary,
                       verdict_changes)
