"""Which registered generator is the champion: decided on comparable terms only.

The rules (the README states them for users):

- Models trained on different data never compete. Each data set (its content hash from
  ``data/prepared/manifest.json``) has its own champion alias, ``champion-<hash[:12]>``.
- ``champion`` (what ``models:/arvision-generator@champion`` loads) is the champion of the data
  it was first set on: a candidate trained on other data never touches it (it competes for its
  own data's alias instead). It is set when no ``champion`` exists yet.
- A candidate beats the incumbent only when, re-scored in the same evaluation (same val data,
  same feature network, same sampling seed and labels), its value of ``evaluate.primary`` is
  lower **beyond the bootstrap interval**: the 95 % interval of the paired difference
  (candidate − incumbent) lies wholly below 0. Paired: both generated sets and val are
  resampled at the same indices (``evaluate.bootstrap`` resamples seeded by ``evaluate.seed``,
  :func:`arvision.metrics.samples.bootstrap_counts`), so the noise of val, which both share,
  cancels; what is left is the two sample sets' own noise. A difference inside that noise keeps
  the incumbent; so does a tie. Where the primary has no interval (``val_bpd``, a likelihood;
  ``evaluate.bootstrap: 0``) the plain values are compared. Numbers stored by earlier runs are
  never compared.
- A model that copies training images (``copy_rate`` above ``evaluate.max_copy_rate``) is
  disqualified: Fréchet distance rewards memorisation, so it must not crown a copier.
"""

from __future__ import annotations

from dataclasses import dataclass

from arvision.tracking import GENERATOR_MODEL

CHAMPION = "champion"
DATA_TAG = "data.content_hash"


def data_alias(data_hash: str) -> str:
    """The per-data champion alias: ``champion-<first 12 hex of the data's content hash>``."""
    return f"{CHAMPION}-{data_hash[:12]}"


@dataclass(frozen=True)
class Incumbent:
    """The version a candidate on this data must beat."""

    version: str
    data_hash: str
    holds_champion: bool  # also holds the plain ``champion`` alias


def _version_by_alias(client, alias: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(GENERATOR_MODEL, alias)
    except mlflow.exceptions.MlflowException:  # no such alias, or no registered model yet
        return None


def incumbent(client, data_hash: str) -> Incumbent | None:
    """The current champion of ``data_hash``'s data, or None when this data has none yet."""
    champ = _version_by_alias(client, CHAMPION)
    if champ is not None and champ.tags.get(DATA_TAG) == data_hash:
        return Incumbent(str(champ.version), data_hash, True)
    mv = _version_by_alias(client, data_alias(data_hash))
    if mv is not None and mv.tags.get(DATA_TAG) == data_hash:
        return Incumbent(str(mv.version), data_hash, False)
    return None


def beats(candidate: float, incumbent_value: float | None, *, candidate_qualifies: bool = True,
          incumbent_qualifies: bool = True, diff_ci: tuple[float, float] | None = None) -> bool:
    """Lower is better; a tie keeps the incumbent; no incumbent → the candidate wins. A
    disqualified candidate never wins; a qualified one always beats a disqualified incumbent.
    ``diff_ci``: the interval of candidate − incumbent (:func:`difference_interval`); given,
    the candidate must be lower beyond it: the whole interval below 0."""
    if not candidate_qualifies:
        return False
    if incumbent_value is None or not incumbent_qualifies:
        return True
    return candidate < incumbent_value and (diff_ci is None or diff_ci[1] < 0)


def difference_interval(candidate_B, incumbent_B, candidate: float, incumbent_value: float) -> tuple[float, float] | None:
    """The 95 % interval of candidate − incumbent from their paired bootstrap values ``(B,)``
    (lower-is-better, :func:`arvision.judge.primary_resamples`), or None when either has none."""
    if candidate_B is None or incumbent_B is None or not len(candidate_B):
        return None
    from arvision.metrics.samples import paired_interval

    return paired_interval(candidate_B, incumbent_B, candidate - incumbent_value)


def promote(client, version: str, data_hash: str) -> list[str]:
    """Give ``version`` its data's champion alias, and ``champion`` too when ``champion`` is
    unset or belongs to this data. Returns the aliases set."""
    aliases = [data_alias(data_hash)]
    champ = _version_by_alias(client, CHAMPION)
    if champ is None or champ.tags.get(DATA_TAG) == data_hash:
        aliases.append(CHAMPION)
    for alias in aliases:
        client.set_registered_model_alias(GENERATOR_MODEL, alias, str(version))
    return aliases


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concluded for a registered candidate: whether it becomes champion, and
    why; :meth:`text` is the sentence, naming the aliases a winner was given."""

    won: bool
    version: str
    why: str

    def text(self, aliases: list[str] = ()) -> str:
        return f"v{self.version} is the new champion ({', '.join(aliases)}){self.why}" if self.won else self.why


def decide(version: str, candidate: dict, incumbent: Incumbent | None, rescored: dict | None, *, primary: str,
           max_copy_rate: float, diff_ci: tuple[float, float] | None = None, shown=None) -> Decision:
    """The champion rule, in words: ``candidate`` (its metrics, lower-is-better ``primary`` by
    :func:`arvision.judge.primary_value`) against the ``incumbent`` ``rescored`` here on the same
    data (None: there is none, or it could not be loaded). A candidate copying more than
    ``max_copy_rate`` of its samples is disqualified; otherwise :func:`beats` decides, with the
    paired interval ``diff_ci`` of candidate − incumbent. ``shown(metrics)``: the primary value as
    the sentence prints it (with its interval)."""
    from arvision.judge import primary_value

    shown = shown or (lambda m: f"{primary_value(m, primary):.4g}")
    value = primary_value(candidate, primary)
    champ_value = None if rescored is None else primary_value(rescored, primary)
    ok = candidate["copy_rate"] <= max_copy_rate
    inc_ok = rescored is None or rescored["copy_rate"] <= max_copy_rate
    won = beats(value, champ_value, candidate_qualifies=ok, incumbent_qualifies=inc_ok, diff_ci=diff_ci)
    kept = f"; champion v{incumbent.version} kept." if incumbent is not None else "; no champion on this data."
    margin = ("" if diff_ci is None or champ_value is None else
              f" (difference {value - champ_value:.4g} [{diff_ci[0]:.4g}, {diff_ci[1]:.4g}], paired bootstrap)")
    if not ok:
        return Decision(False, version, f"v{version} registered as candidate but disqualified: it copies "
                               f"{candidate['copy_rate']:.0%} of its samples (evaluate.max_copy_rate {max_copy_rate:.0%})" + kept)
    if won:
        if incumbent is None:
            why = ": no champion on this data yet."
        elif rescored is None:
            why = f": champion v{incumbent.version} could not be re-scored here."
        elif not inc_ok:
            why = f": champion v{incumbent.version} copies {rescored['copy_rate']:.0%} of its samples."
        else:
            why = (f": {primary} {shown(candidate)} beats v{incumbent.version}'s {shown(rescored)}, re-scored here, "
                   + ("beyond the interval" if diff_ci is not None else "(no interval)") + f"{margin}.")
        return Decision(True, version, why)
    beyond = " beyond the interval" if diff_ci is not None and value < champ_value else ""
    return Decision(False, version, f"v{version} registered as candidate; champion v{incumbent.version} kept: "
                           f"{primary} {shown(candidate)} does not beat v{incumbent.version}'s "
                           f"{shown(rescored)}{beyond}, re-scored here{margin}.")
