"""Standard errors and paired differences: how every table in the repo says how far a figure can be trusted.

    mean, se = mean_se(per_item)                  # a mean over items (problems, chunks) and its standard error
    gaps = paired_gaps(row, ref)                  # row - ref per metric over the same chunks, paired SE, > 2 SE?
    gap_label(gaps)                               # "KL, acc" / "KL" / "no": which gaps exceed 2 paired SE
    r, se = ratio_se(child_per_chunk, parent_per_chunk)  # retention = mean(child) / mean(parent), paired SE

No torch here, so the report builder can use it.
"""

GAP_METRICS = (("kl_parent", "KL"), ("next_token_acc", "acc"))


def mean_se(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error, sample std / sqrt(n) (0 for a single value)."""
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    return m, (sum((x - m) ** 2 for x in xs) / max(1, n - 1) / n) ** 0.5


def paired_diff(a: dict, b: dict, metric: str) -> tuple[float, float]:
    """(mean of a - b, paired standard error) over the chunks both results were measured on (their `per_seq`).

    Pairing removes the chunk-to-chunk spread both models share, so it is usually much smaller than either
    model's own SE. It measures the evaluation sample's noise only; a second training seed would add its own.
    """
    xa, xb = a["per_seq"][metric], b["per_seq"][metric]
    if len(xa) != len(xb):
        raise ValueError(f"paired_diff needs the same evaluation chunks; got {len(xa)} and {len(xb)} values")
    return mean_se([x - y for x, y in zip(xa, xb)])


def ratio_se(num: list[float], den: list[float]) -> tuple[float | None, float | None]:
    """(mean(num) / mean(den), its standard error) over paired items, e.g. retention = the child's next-token
    accuracy over the parent's on the same chunks.

    The delta method for a ratio of means: SE = std(num_i - r * den_i) / sqrt(n) / mean(den). Chunks that are hard
    for both models move both means, so this is much smaller than the child's own SE divided by the parent's mean.
    """
    if len(num) != len(den):
        raise ValueError(f"ratio_se needs paired items; got {len(num)} and {len(den)} values")
    n = len(num)
    if n == 0 or sum(den) == 0:
        return None, None
    mn, md = sum(num) / n, sum(den) / n
    r = mn / md
    return r, mean_se([a - r * b for a, b in zip(num, den)])[1] / abs(md)


def paired_gaps(a: dict, b: dict, metrics=tuple(k for k, _ in GAP_METRICS)) -> dict:
    """Per metric: a - b, its paired SE (<metric>_se) and whether the gap exceeds 2 paired SE (<metric>_beyond_2se):
    the rows of an ablation table, each against the reference row."""
    out = {}
    for k in metrics:
        d, se = paired_diff(a, b, k)
        out |= {k: d, f"{k}_se": se, f"{k}_beyond_2se": abs(d) > 2 * se}
    return out


def gap_label(gaps: dict) -> str:
    """Which of a paired_gaps result's KL / accuracy gaps exceed 2 paired SE: "KL, acc", "KL", "acc" or "no"."""
    return ", ".join(name for k, name in GAP_METRICS if gaps.get(f"{k}_beyond_2se")) or "no"
