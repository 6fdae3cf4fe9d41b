"""Notebook 07's layer: text-to-image on the embedded captioned shapes set.

Rooms: :mod:`.profiles` (the workbook's profiles resized for captions, what each trains), :mod:`.runs` (one seed,
trained and judged), :mod:`.seeds` (a profile's seeds, filed and read back one a sitting), :mod:`.verdicts` (arms,
comparisons and targets), :mod:`.longer` (a profile against the longer one that continues it), :mod:`.figures` and
:mod:`.widgets`. The measuring code, whose source keys a filed seed, is :mod:`vitdiff.text_alignment`; the shared
layer is :mod:`vitdiff.workbook`.
"""
from ..text_alignment import (ALIGNMENT_METRICS, SHAPE_SHUFFLED_METRICS, alignment_rows, alignment_summary,
                              fd_shapes, fd_shapes_label, shapes_features, text_code_key)
from . import figures, longer, profiles, runs, seeds, verdicts, widgets
from .figures import (GRID_PROMPTS, prompt_grid, prompt_grid_figure, prompt_grid_file, show_captioned, show_examples,
                      show_prompt_grid)
from .longer import (budget_pair, file_growth_verdicts, longer_training_lines, plot_both_budgets,
                     rows_at_both_budgets, show_longer_training, verdicts_at_both_budgets)
from .profiles import (TEXT_BASE_PROFILES, TEXT_CONTINUES, TEXT_PROFILE_CHANGES, TEXT_SETUPS, VERDICT_GUIDANCE,
                       TextSetup, make_text_config, resolution_shifted_noise, text_profile, text_protocol,
                       text_training_protocol)
from .runs import (CONTINUED_FROM, SEED_FACTS, TrainingStopped, continue_shorter_run, continued_from_step,
                   grow_trainer, local_text_model, logged_training_seconds, run_text_seed, seed_keys,
                   text_run_dir, train_text_model)
from .seeds import file_text_seed, filed_text_seeds, run_text_seeds, text_seed_folder, threads_by_seed
from .verdicts import (OWN, SHAPE_SHUFFLED, SHUFFLED, TARGET_ALL_CORRECT, TARGET_SEEDS, TARGET_SHAPE_RATIO,
                       alignment_arm, alignment_arms, alignment_comparisons, show_targets, target_checks,
                       target_lines)
from .widgets import prompt_explorer
