"""The rich table of a hierarchical latent's groups (``vaeeval latents``, ``elbo --diagnostics``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from vaeeval.results.latents import LatentHealth


def groups_table(health: LatentHealth) -> Table:
    """Each group of a hierarchical latent: its units, KL (with its Monte Carlo error and kind) and active units."""
    table = Table(title="Latent groups (a hierarchical latent, in the flat z's order)", title_justify="left")
    for column in ("group", "units", "KL (mean)", "± (Monte Carlo)", "KL", "active"):
        table.add_column(escape(column), justify="right")
    for group in health.groups:
        start, stop = group.units
        kl = "—" if group.kl is None else f"{group.kl:.4f}"
        stderr = "—" if group.kl_stderr is None else f"{group.kl_stderr:.4f}"
        table.add_row(escape(group.name), f"{start}-{stop - 1}", kl, stderr, escape(group.kl_kind or "—"),
                      f"{group.active_units} of {stop - start}")
    table.caption = escape(
        "a group's KL is E_q[log q_g - log p_g] over the evaluation's draws: in closed form (analytic) where its factors "
        "condition on nothing, at each draw of their parents (analytic_given_draws), else sampled (monte_carlo); they "
        "add up to the mean KL (exactly where all are sampled)"
        if health.groups and health.groups[0].kl is not None else
        "p(z) is one distribution over the flat z: the KL does not split by group"
    )
    return table
