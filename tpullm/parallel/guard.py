"""The start-up guard: where every parameter lives, and a stop when the rules were not followed.

A rule can fail silently in two ways: a logical name that is missing from the table (flax maps
it to nothing, so the array is replicated), and a dimension that the mesh degree does not
divide (jit cannot cut it unevenly, so `rules.fit_spec` leaves it whole). Both cost memory on
every device without an error, so we measure them before the first step: the share of
parameter bytes that stays replicated on a mesh axis the rules meant to split it over.
"""

import dataclasses
import math

from tpullm.config import ConfigError
from tpullm.parallel import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class Report:
    rows: list  # [(Placement, bytes per device, wanted pieces, actual pieces)]
    mesh_shape: dict
    total_bytes: int
    per_device_bytes: int
    replicated_share: float  # of total_bytes, in arrays split less than the rules ask
    unknown_names: list

    def text(self, limit: float | None = None) -> str:
        head = f"  {'parameter':<40} {'shape':<20} {'logical axes':<36} {'split over':<24} {'MiB/device':>10}"
        lines = ["parameter layout (from the logical-axis rules):", head]
        for p, per_device, wanted, actual in self.rows:
            flag = f"  <- split {actual}x, rules ask {wanted}x" if actual < wanted else ""
            used = [
                x
                for x in rules_lib.padded(p.spec, len(p.shape))
                if x and any(self.mesh_shape[a] > 1 for a in rules_lib.axes_of(x))
            ]
            lines.append(
                f"  {p.path:<40} {_fmt(p.shape):<20} {_fmt(p.logical):<36} {_fmt(used):<24} "
                f"{per_device / 2**20:>10.3f}{flag}"
            )
        limit_text = "" if limit is None else f" (limit {limit:.0%}, mesh.max_replicated_share)"
        lines.append(
            f"  total {self.total_bytes / 2**20:.2f} MiB of parameters, {self.per_device_bytes / 2**20:.2f} "
            f"MiB per device ({self.total_bytes / max(self.per_device_bytes, 1):.1f}x less); replicated "
            f"against the rules: {self.replicated_share:.1%} of parameter bytes{limit_text}"
        )
        return "\n".join(lines)


def _fmt(seq) -> str:
    def one(x):
        return "-" if x is None else "x".join(map(str, x)) if isinstance(x, (tuple, list)) else str(x)

    return "(" + ", ".join(one(x) for x in seq) + ")"


def inspect(abstract_boxed_params, mesh_shape, rules=rules_lib.LOGICAL_AXIS_RULES) -> Report:
    """Per-array bytes per device and the share replicated against the rules (nothing allocated)."""
    _, placed = rules_lib.placements(abstract_boxed_params, mesh_shape, rules)
    known = rules_lib.known_names(rules)
    unknown = sorted({n for p in placed for n in p.logical if n is not None and n not in known})
    rows, total, per_device, replicated = [], 0, 0, 0
    for p in placed:
        wanted = rules_lib.split_factor(p.wanted, mesh_shape)
        actual = rules_lib.split_factor(p.spec, mesh_shape)
        rows.append((p, p.nbytes // actual, wanted, actual))
        total += p.nbytes
        per_device += p.nbytes // actual
        if actual < wanted:
            replicated += p.nbytes
    return Report(rows, dict(mesh_shape), total, per_device, replicated / max(total, 1), unknown)


def check(abstract_boxed_params, mesh_shape, max_replicated_share: float, rules=rules_lib.LOGICAL_AXIS_RULES) -> Report:
    """The report, or a ConfigError naming the arrays, the arithmetic and the fixes."""
    if not 0 <= max_replicated_share <= 1:
        raise ConfigError(f"mesh.max_replicated_share={max_replicated_share} must be in [0, 1]")
    report = inspect(abstract_boxed_params, mesh_shape, rules)
    if report.unknown_names:
        raise ConfigError(
            f"logical axis names {report.unknown_names} are not in the rules table, so their arrays would be "
            f"replicated on every device; add them to LOGICAL_AXIS_RULES in tpullm/parallel/rules.py"
        )
    if report.replicated_share > max_replicated_share:
        culprits = []
        for p, _, wanted, actual in report.rows:
            if actual < wanted:
                n = len(p.shape)
                dims = [
                    f"{name}={size} over {'x'.join(rules_lib.axes_of(w))}="
                    f"{math.prod(mesh_shape[a] for a in rules_lib.axes_of(w))}"
                    for name, size, w, s in zip(
                        rules_lib.padded(p.logical, n),
                        p.shape,
                        rules_lib.padded(p.wanted, n),
                        rules_lib.padded(p.spec, n),
                    )
                    if rules_lib.axes_of(w) != rules_lib.axes_of(s)
                ]
                culprits.append(f"{p.path} ({', '.join(dims)})")
        raise ConfigError(
            f"{report.replicated_share:.1%} of parameter bytes stay replicated on mesh axes the rules meant to split "
            f"them over (limit {max_replicated_share:.0%}): the degree does not divide these dimensions: "
            f"{'; '.join(culprits)}. Pick mesh degrees that divide them (or model sizes divisible by the degrees), "
            f"or raise mesh.max_replicated_share to accept the memory cost.\n" + report.text(max_replicated_share)
        )
    return report
