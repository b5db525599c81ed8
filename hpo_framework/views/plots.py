"""Pictures of a study: each plot as a PNG (matplotlib) and an interactive HTML file (plotly),
plus an ``index.html`` that shows them beside the summary table.

Plotting libraries are an optional extra (``pip install 'hpo-framework[plots]'``), imported
only here.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo_framework.exceptions import HPOError

log = logging.getLogger("hpo.plots")

#: A contour needs this many completed trials that have both of its parameters.
_CONTOUR_MIN_TRIALS = 3


class PlotsUnavailable(HPOError):
    """Raised when ``--plot`` is asked for but matplotlib or plotly is not installed."""


def _libraries() -> tuple[Any, Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
        import plotly  # noqa: F401
    except ImportError as e:
        raise PlotsUnavailable(
            f"plots need matplotlib and plotly ({e.name} is missing): "
            "pip install 'hpo-framework[plots]'"
        ) from None
    return optuna.visualization, plt


def _plots(
    study: optuna.Study, complete: list[optuna.trial.FrozenTrial]
) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (title, function name in optuna.visualization[.matplotlib], extra kwargs)."""
    if len(study.directions) > 1:
        names = [d.name.lower() for d in study.directions]
        return {
            "pareto_front": ("Pareto front", "plot_pareto_front", {"target_names": names}),
            "history_0": ("Optimization history (objective 0)", "plot_optimization_history",
                          {"target": lambda t: t.values[0], "target_name": names[0]}),
        }  # fmt: skip
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # needs no scikit-learn
    # Losses often span decades: on a linear axis the good trials all sit on the floor.
    # Parallel coordinates have no log axis, so they show log10 of the objective instead.
    parallel: dict[str, Any] = {}
    parallel_title = "Parallel coordinates"
    if _spans_decades(complete):
        parallel = {"target": lambda t: math.log10(t.values[0]), "target_name": "log10(objective)"}
        parallel_title += " (log10 of the objective)"
    plots: dict[str, tuple[str, str, dict[str, Any]]] = {
        "history": ("Optimization history", "plot_optimization_history", {}),
        "importances": ("Parameter importances", "plot_param_importances",
                        {"evaluator": evaluator}),
        "parallel_coordinate": (parallel_title, "plot_parallel_coordinate", parallel),
        "slice": ("Slice", "plot_slice", {}),
    }  # fmt: skip
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate"] = ("Intermediate values", "plot_intermediate_values", {})
    pair = _contour_pair(complete)
    if pair is not None:
        plots["contour"] = (f"Contour ({pair[0]} × {pair[1]})", "plot_contour", {"params": pair})
    return plots


def _contour_pair(complete: list[optuna.trial.FrozenTrial]) -> list[str] | None:
    """The two numeric parameters that occur together in the most completed trials.

    In a conditional space some never do (``momentum`` only with ``sgd``, ``beta`` only with
    ``adam``): a contour of those would be empty.
    """
    order: dict[str, int] = {}
    together: Counter[tuple[str, str]] = Counter()
    for t in complete:
        numeric = [
            n for n, d in t.distributions.items()
            if not isinstance(d, optuna.distributions.CategoricalDistribution)
        ]  # fmt: skip
        for n in numeric:
            order.setdefault(n, len(order))
        numeric.sort(key=order.__getitem__)
        together.update(itertools.combinations(numeric, 2))
    if not together:
        return None
    pair, count = min(together.items(), key=lambda kv: (-kv[1], order[kv[0][0]], order[kv[0][1]]))
    return list(pair) if count >= _CONTOUR_MIN_TRIALS else None


def write_plots(
    study: optuna.Study,
    directory: Path,
    summary: dict[str, Any],
    progress: Callable[[str], None] = lambda title: None,
    histories: dict[int, dict[str, list[dict[str, Any]]]] | None = None,
) -> list[Path]:
    """Write every plot as PNG and HTML, and index.html; returns the files written.

    ``progress`` is called with each plot's title before it is drawn (a large study takes
    seconds per plot); ``histories`` (trial number -> logged metrics) adds one panel per
    metric, one curve per trial."""
    vis, plt = _libraries()
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    shown: list[tuple[str, str]] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        raise HPOError(
            f"study {study.study_name!r} has {len(complete)} completed trials; plots need 2"
        )
    log_objective = _spans_decades(complete)
    for name, (title, function, kwargs) in _plots(study, complete).items():
        progress(title)
        log_scale = log_objective and name.startswith(("history", "slice"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                figure = getattr(vis, function)(study, **kwargs)
                figure.update_layout(title=title)
                if log_scale:
                    figure.update_yaxes(type="log")
                figure.write_html(directory / f"{name}.html", include_plotlyjs="directory")
                axes = getattr(vis.matplotlib, function)(study, **kwargs)
                fig = _figure_of(axes)
                if log_scale:
                    for ax in _flat(axes):
                        ax.set_yscale("log")
                if name == "parallel_coordinate":  # room per axis: no overlapping ticks
                    n_axes = 1 + len({p for t in complete for p in t.params})
                    fig.set_size_inches(max(6.4, 1.6 * n_axes), 5.2)
                    _readable_parallel(fig, plt)
                if name == "slice":
                    _readable_slice(fig, plt)
                # Optuna sizes and titles its own figures; resizing would push the colour bar
                # of the slice plot over its last panel.
                fig.savefig(directory / f"{name}.png", dpi=110, bbox_inches="tight")
                plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.warning("plot %s skipped: %s", name, e)
            continue
        written += [directory / f"{name}.png", directory / f"{name}.html"]
        shown.append((name, title))
    if histories:
        progress("Logged metrics")
        written += _metrics_plot(histories, summary, directory, plt)
        shown.append(("metrics", "Logged metrics (trial().log), one curve per trial"))
    index = directory / "index.html"
    index.write_text(_index_html(summary, shown))
    written.append(index)
    return written


#: Curves drawn per metric: the best trials (by the study's first objective), then the rest.
_MAX_CURVES = 20


def _metrics_plot(
    histories: dict[int, dict[str, list[dict[str, Any]]]],
    summary: dict[str, Any],
    directory: Path,
    plt: Any,
) -> list[Path]:
    """One panel per metric (x: the step, or the call's order without one), one curve per
    trial: the best trials dark and labelled, the others light; as PNG and HTML."""
    import plotly.graph_objects as go
    from matplotlib.ticker import MaxNLocator
    from plotly.subplots import make_subplots

    names = sorted({m for h in histories.values() for m in h})
    sign = -1.0 if summary["directions"][0] == "maximize" else 1.0
    finished = [t for t in summary.get("trials") or summary["top"] if t["values"]]
    ranked = [t["number"] for t in sorted(finished, key=lambda t: sign * t["values"][0])]
    order = {n: i for i, n in enumerate(ranked)}
    numbers = sorted(histories, key=lambda n: (order.get(n, len(order)), n))[:_MAX_CURVES]
    best = set(numbers[:5])
    fig, axes = plt.subplots(
        len(names), 1, figsize=(7.5, 2.8 * len(names)), squeeze=False, sharex=True
    )
    web = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=names)
    for row, name in enumerate(names):
        ax = axes[row][0]
        for number in reversed(numbers):  # the best drawn last, on top
            points = histories[number].get(name, [])
            xs = [p["step"] if p["step"] is not None else i for i, p in enumerate(points)]
            ys = [p["value"] for p in points]
            label = f"trial {number}" if number in best else None
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3,
                    linewidth=1.8 if number in best else 0.8,
                    alpha=1.0 if number in best else 0.35, label=label)  # fmt: skip
            web.add_trace(
                go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"trial {number}",
                           legendgroup=str(number), showlegend=row == 0,
                           opacity=1.0 if number in best else 0.4),
                row=row + 1, col=1,
            )  # fmt: skip
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        values = [p["value"] for h in histories.values() for p in h.get(name, [])]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
            web.update_yaxes(type="log", row=row + 1, col=1)
    handles, labels = axes[0][0].get_legend_handles_labels()  # drawn worst first: best first
    axes[0][0].legend(handles[::-1], labels[::-1], fontsize=8, loc="best", title="best trials",
                      title_fontsize=8)  # fmt: skip
    axes[-1][0].set_xlabel("step")
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{summary['study']}: logged metrics")
    fig.tight_layout()
    fig.savefig(directory / "metrics.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    web.update_layout(title=f"{summary['study']}: logged metrics", height=300 * len(names))
    web.write_html(directory / "metrics.html", include_plotlyjs="directory")
    return [directory / "metrics.png", directory / "metrics.html"]


def _readable_parallel(fig: Any, plt: Any) -> None:
    """Optuna's parallel coordinates as a person reads them: its Blues colour map draws the
    worst trials white on a grey background, so a colour map visible from end to end; and
    its ``None`` tick (a parameter the trial did not use, under ``when:``) says so."""
    from matplotlib.collections import LineCollection

    for ax in fig.axes:
        for collection in ax.collections:
            if isinstance(collection, LineCollection):
                reverse = collection.get_cmap().name.endswith("_r")
                collection.set_cmap(plt.get_cmap("viridis" if reverse else "viridis_r"))
                collection.set_linewidth(1.6)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        if "None" in labels:
            ax.set_yticks(ax.get_yticks(), ["(not used)" if x == "None" else x for x in labels])
        ax.tick_params(axis="y", labelsize=8)


def _readable_slice(fig: Any, plt: Any) -> None:
    """Optuna's slice plot with ticks that do not run together (``0.00250.0050``): fewer,
    tilted ones on linear axes; and its trial colours visible from the first trial on."""
    from matplotlib.collections import PathCollection
    from matplotlib.ticker import AutoLocator, MaxNLocator

    for ax in fig.axes:
        for collection in ax.collections:
            if isinstance(collection, PathCollection):
                collection.set_cmap(plt.get_cmap("viridis"))
        # numeric linear axes only (categories have locators of their own)
        if isinstance(ax.xaxis.get_major_locator(), AutoLocator) and ax.get_xlabel():
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def _spans_decades(trials: list[optuna.trial.FrozenTrial]) -> bool:
    values = [t.values[0] for t in trials if t.values]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def _flat(axes: Any) -> list[Any]:
    return list(axes.flat) if hasattr(axes, "flat") else [axes]


def _figure_of(axes: Any) -> Any:
    return _flat(axes)[0].get_figure()


def _index_html(summary: dict[str, Any], shown: list[tuple[str, str]]) -> str:
    e = html.escape
    counts = " · ".join(f"{k} {v}" for k, v in summary["counts"].items())
    budget = "∞" if summary["budget"] is None else summary["budget"]
    rows = "".join(
        f"<tr><td>{t['number']}</td><td>{e(', '.join(f'{v:.6g}' for v in t['values'] or []))}</td>"
        f"<td>{e(str(t['worker']))}</td><td>{(t['duration_s'] or 0):.2f}s</td>"
        f"<td><code>{e(json.dumps(t['params']))}</code></td></tr>"
        for t in summary["top"]
    )
    figures = "".join(
        f'<figure><a href="{name}.html"><img src="{name}.png" alt="{e(title)}"></a>'
        f'<figcaption>{e(title)} (<a href="{name}.html">interactive</a>)</figcaption></figure>'
        for name, title in shown
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(summary["study"])} — hpo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }}
figure {{ display: inline-block; margin: 0.5rem; vertical-align: top; }}
img {{ height: 380px; max-width: 640px; object-fit: contain; border: 1px solid #ddd; }}
</style></head><body>
<h1>{e(summary["study"])}</h1>
<p>state <b>{e(summary["state"])}</b> · directions {e(", ".join(summary["directions"]))} ·
progress {summary["finished"]}/{budget} · {e(counts)}</p>
<h2>Top trials</h2>
<table><tr><th>trial</th><th>value</th><th>worker</th><th>duration</th><th>params</th></tr>{rows}</table>
<h2>Plots</h2>{figures}
</body></html>
"""
