"""Rank models on the same data, only where their numbers measure the same thing.

Every model is evaluated on the same points with the same seed. Numbers are
ranked by iwae within a measure: log-probabilities of the observed values are
comparable with each other whatever the family; log-densities are comparable
with each other only on continuous data (on discrete data a density grows
without bound as its scale shrinks onto the grid); a density and a probability
never. Differences to the best model are paired per point: both models scored
the same points, so the standard error of the mean difference is usually far
smaller than the two models' errors combined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vaeeval.errors import VaeevalError
from vaeeval.estimators.annealing.ais import AISEvaluator, AISOptions
from vaeeval.estimators.importance.evaluate import EvaluationOptions, Evaluator
from vaeeval.format.data import Dataset
from vaeeval.format.model import Model
from vaeeval.format.terms import DENSITY, PROBABILITY
from vaeeval.results.numbers import AISEvaluation, Evaluation, Stat, mean_and_stderr


@dataclass(frozen=True)
class Difference:
    """iwae of the best model minus iwae of another, averaged over the same points."""

    model: int  # index into Comparison.entries
    best: int
    paired: Stat  # mean and standard error of the per-point differences
    unpaired_stderr: float | None  # what the error would be treating the two means as independent


@dataclass(frozen=True)
class Group:
    """Models whose numbers share a measure; ranked unless ``refusal`` says why not."""

    measure: str
    members: tuple[int, ...]  # best first when ranked, else in the order given
    ranked: bool
    refusal: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Everything ``compare`` found."""

    models: tuple[Model, ...]
    evaluations: tuple[Evaluation | AISEvaluation, ...]
    groups: tuple[Group, ...]
    differences: tuple[Difference, ...]
    notes: tuple[str, ...]
    metric: str = "iwae"  # what ranks the models: iwae, or ais (``compare --estimator ais``)

    def rank(self, index: int) -> int | None:
        """1 for the best of its group, 2 for the next...; ``None`` when its group is not ranked."""
        for group in self.groups:
            if group.ranked and index in group.members:
                return group.members.index(index) + 1
        return None


def _unpaired(a: Stat, b: Stat) -> float | None:
    return None if a.stderr is None or b.stderr is None else math.hypot(a.stderr, b.stderr)


def _names(models: Sequence[Model], indices: Sequence[int]) -> str:
    return ", ".join(str(models[i].path.name if models[i].path else f"model {i}") for i in indices)


def _given(model: Model) -> tuple[str, ...]:
    """What a model's numbers are conditioned on (log p(x | c)), sorted: its covariates, and an observed library size."""
    observed = ("library size",) if model.library is not None and not model.library.latent else ()
    return tuple(sorted((*model.covariates, *observed)))


def rank(
    models: Sequence[Model], evaluations: Sequence[Evaluation | AISEvaluation], data_is_discrete: bool, metric: str = "iwae"
) -> Comparison:
    """Group evaluations by measure (and by the covariates a model is conditioned on), rank by ``metric``
    within a group, pair each with its group's best."""
    by_measure: dict[str, list[int]] = {}
    by_group: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for index, evaluation in enumerate(evaluations):
        by_measure.setdefault(evaluation.measure, []).append(index)
        by_group.setdefault((evaluation.measure, _given(models[index])), []).append(index)
    groups, differences, notes = [], [], []
    if len(by_measure) > 1:
        notes.append(
            f"Not ranked against each other: {_names(models, by_measure[DENSITY])} give log-densities and "
            f"{_names(models, by_measure[PROBABILITY])} log-probabilities, which measure different things"
            + (" (drop --density to score the continuous models on the data's bins)." if data_is_discrete else ".")
        )
    conditions: dict[tuple[str, ...], list[int]] = {}
    for index, model in enumerate(models):
        conditions.setdefault(_given(model), []).append(index)
    if len(conditions) > 1:
        shown = "; ".join(
            f"{_names(models, members)} log p(x{' | ' + ', '.join(given) if given else ''})" for given, members in conditions.items()
        )
        notes.append(f"Not ranked against each other: {shown}; conditioned on different things, they are different quantities.")
    for (measure, _), members in by_group.items():
        if measure == DENSITY and data_is_discrete:
            if len(members) > 1:
                notes.append(
                    f"Not ranked: {_names(models, members)} give densities of discrete data, which grow without "
                    "bound as a model's scale shrinks onto the grid; score them on bins to compare."
                )
            groups.append(Group(measure, tuple(members), False, "densities of discrete data"))
            continue
        order = sorted(members, key=lambda i: -getattr(evaluations[i].summary, metric).mean)
        groups.append(Group(measure, tuple(order), True))
        best = order[0]
        for other in order[1:]:
            paired = mean_and_stderr(getattr(evaluations[best].points, metric) - getattr(evaluations[other].points, metric))
            unpaired = _unpaired(getattr(evaluations[best].summary, metric), getattr(evaluations[other].summary, metric))
            differences.append(Difference(other, best, paired, unpaired))
    fitted_here = [index for index, model in enumerate(models) if any(note.startswith("optimistic") for note in model.notes)]
    if fitted_here:
        notes.append(
            f"Optimistic: {_names(models, fitted_here)} had their likelihood's scale fitted on this very data "
            "(vaeeval calibrate); compare them on other held-out data."
        )
    return Comparison(tuple(models), tuple(evaluations), tuple(groups), tuple(differences), tuple(notes), metric)


def compare(
    models: Sequence[Model],
    datasets: Sequence[Dataset],
    options: EvaluationOptions | None = None,
    *,
    annealing: AISOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """Evaluate every model on the same points with the same seed, then rank where comparable.

    Args:
        models: two or more loaded models.
        datasets: the same data loaded (and so checked) once for each model, in the same order.
        options: how to evaluate each model (the same for all); on discrete data continuous
            models are scored on the data's bins unless ``options.density``.
        annealing: rank by AIS with these settings instead of by IWAE.
        progress: called with the number of (model, point) pairs finished.

    Raises:
        VaeevalError: fewer than two models, or datasets that are not the same points.
    """
    if len(models) < 2:
        raise VaeevalError("compare needs at least two models")
    if len(datasets) != len(models) or any(d.n != datasets[0].n for d in datasets):
        raise VaeevalError("compare needs the same data points for every model")
    evaluations = []
    for position, (model, dataset) in enumerate(zip(models, datasets, strict=True)):
        offset = position * dataset.n
        report = None if progress is None else (lambda done, offset=offset: progress(offset + done))
        try:
            if annealing is None:
                evaluations.append(Evaluator(model, dataset, options).evaluate(report))
            else:
                evaluations.append(AISEvaluator(model, dataset, annealing, options or EvaluationOptions()).evaluate(report))
        except VaeevalError as error:  # say which model
            raise VaeevalError(f"{model.path or f'model {position}'}: {error.args[0]}") from None
    data_is_discrete = datasets[0].domain.grid_levels is not None
    comparison = rank(models, evaluations, data_is_discrete, "iwae" if annealing is None else "ais")
    rescored = [i for i, e in enumerate(evaluations) if e.scoring.levels is not None]
    if rescored:
        levels = sorted({evaluations[i].scoring.levels for i in rescored})
        notes = (
            f"The data is discrete, so {_names(models, rescored)} "
            f"{'is' if len(rescored) == 1 else 'are'} scored as the probability of each value's bin on "
            f"{' / '.join(map(str, levels))} levels: every number is then a log-probability of the observed values.",
            *comparison.notes,
        )
        comparison = replace(comparison, notes=notes)
    return comparison
