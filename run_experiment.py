"""Run the linear-regression HPO in this process: `python run_experiment.py [config.yaml]`.

`python run_experiment.py --best best.yaml` trains once with the cfg that
`hpo-inspect STUDY --best-config best.yaml` wrote (outside any study), e.g. the final model.
"""

import sys

from experiments.linear_regression import single_session
from hpo_framework import HPOError, load_best, load_config, run_hpo, unflatten

if __name__ == "__main__":
    if sys.argv[1:2] == ["--best"]:
        print(f"validation MSE {single_session(load_best(sys.argv[2])):.6f}")
        sys.exit()
    path = sys.argv[1] if len(sys.argv) > 1 else "config.yaml"
    try:
        study = run_hpo(single_session, path)
        space = load_config(path).search_space
    except HPOError as e:
        sys.exit(f"error: {e}")
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        sys.exit(f"error: study {study.study_name!r} has no completed trial; see hpo-inspect")
    print(f"best validation MSE {study.best_value:.6f} (trial {study.best_trial.number})")
    # nested, as cfg has them (a list-valued choice as its list, not Optuna's JSON text)
    print(f"best parameters {unflatten(space.decode(study.best_params))}")
