"""``refiner ablate``: ablations of the Refiner, each arm trained under the same budget.

One job per module, each importing only those above it in this list:

- :mod:`.studies`: arms and studies (specification, parsing, the built-in arms' table);
- :mod:`.run_dirs`: the run directories: the arm's record, refusing a changed arm, equivalent runs copied;
- :mod:`.plan`: the arms, fractions, seeds and base config, and each run's budget-matched config;
- :mod:`.report`: the table, the JSON and the plot;
- :mod:`.run`: :func:`run_ablation`, which trains, continues or copies each run under its lock.
"""
from ..bench import count_flops
from .plan import arm_configs
from .report import plot_ablation
from .run import run_ablation
from .studies import (
    BUILTIN_ARMS,
    BUILTINS,
    DEFAULT_FRACTIONS,
    DEFAULT_SEEDS,
    AblationError,
    Arm,
    Study,
    list_studies,
    load_study,
    parse_arm,
)

__all__ = ['run_ablation', 'BUILTIN_ARMS', 'Arm', 'Study', 'AblationError', 'load_study', 'list_studies',
           'parse_arm', 'arm_configs', 'count_flops', 'DEFAULT_FRACTIONS', 'DEFAULT_SEEDS', 'BUILTINS', 'plot_ablation']
