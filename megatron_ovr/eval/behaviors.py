r"""Cognitive-behaviour analysis of saved generations: four visual behaviours and their linguistic
counterparts, counted per response by an LLM judge; emergence rates and the Behaviour Transfer Rate.

Contract
--------
:data:`BEHAVIORS` lists the eight behaviours; :data:`BEHAVIOR_PAIRS` pairs each visual one with its
linguistic counterpart (visual reflection <-> backtracking, divide-and-conquer <-> subgoal setting, visual
verification <-> verification, goal-driven visual tracing <-> backward chaining).
:func:`judge_messages` is the one prompt per behaviour; it asks the judge to end with ``<count>N</count>``.

:func:`count_behaviors` asks the judge (a :class:`~megatron_ovr.eval.judge.JudgeClient`, cached and
resumable) about every (response, behaviour), ``concurrency`` calls at a time; the first call that fails for
good stops the run (every finished call is already cached, so a rerun resumes).

:func:`summarise` turns the counts into, per behaviour, the emergence rate (share of responses with
count > 0) and the mean count; per pair, the Behaviour Transfer Rate ``BTR = visual rate / linguistic rate``;
and an overall BTR, the mean visual rate over the mean linguistic rate (the ratio of the pairs' summed
rates). A BTR whose linguistic rate is 0 is undefined (None, shown as n/a).
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

from tqdm import tqdm

from .judge import JudgeClient, JudgeError

__all__ = [
    "BEHAVIORS", "BEHAVIOR_PAIRS", "Behavior", "BehaviorRate", "BehaviorReport", "JudgedResponse",
    "TransferRate", "count_behaviors", "format_report", "judge_messages", "plot_report", "read_responses",
    "summarise",
]


@dataclass(frozen=True)
class Behavior:
    key: str
    title: str
    """Shown to the judge on the prompt's ``## Behavior:`` line (the offline judge reads it back)."""
    modality: Literal["visual", "linguistic"]
    definition: str


BEHAVIORS: dict[str, Behavior] = {b.key: b for b in (
    Behavior("visual_reflection", "Visual reflection (re-inspecting the image)", "visual",
             "The response goes back to the image to inspect it again after a first reading, e.g. "
             "'let me look at the figure again', 'looking back at the image, the label is actually 5'. "
             "Each return to the image counts once."),
    Behavior("divide_and_conquer", "Divide-and-conquer (visual decomposition)", "visual",
             "The response splits the image into parts (regions, shapes, sub-figures, panels, bars or rows) "
             "and analyses them one by one to build the answer. Each decomposition counts once."),
    Behavior("visual_verification", "Visual verification (cross-checking with the image)", "visual",
             "The response checks an intermediate or final result against the image, e.g. 'this matches the "
             "diagram', 'checking with the figure, the angle is indeed acute'. Each check counts once."),
    Behavior("goal_driven_visual_tracing", "Goal-driven visual tracing", "visual",
             "Starting from what the question asks, the response purposefully traces elements of the image "
             "toward that goal, e.g. following a line, path, curve or arrow, or locating the point or label it "
             "needs. Each traced path counts once."),
    Behavior("backtracking", "Backtracking", "linguistic",
             "The response abandons or revises a line of reasoning after noticing a problem, e.g. 'wait, that "
             "is wrong', 'let me reconsider'. Each revision counts once."),
    Behavior("subgoal_setting", "Subgoal setting", "linguistic",
             "The response breaks the problem into intermediate goals, e.g. 'first find x, then compute the "
             "area', 'step 1: ...'. Each stated subgoal counts once."),
    Behavior("verification", "Verification", "linguistic",
             "The response checks an intermediate or final result by reasoning or computation, e.g. "
             "substituting the answer back, recomputing, 'let me verify'. Each check counts once."),
    Behavior("backward_chaining", "Backward chaining", "linguistic",
             "The response reasons backward from the goal to what it needs, e.g. 'to find the area we need "
             "the radius; to get the radius ...', 'working backwards from the answer'. Each chain counts once."),
)}

BEHAVIOR_PAIRS: tuple[tuple[str, str], ...] = (
    ("visual_reflection", "backtracking"),
    ("divide_and_conquer", "subgoal_setting"),
    ("visual_verification", "verification"),
    ("goal_driven_visual_tracing", "backward_chaining"),
)
"""(visual, linguistic) keys of each behaviour pair."""

JUDGE_SYSTEM_PROMPT = "You are a careful annotator of reasoning traces. You count behaviours exactly as defined."


def judge_messages(behavior: Behavior, response: str, question: Optional[str] = None) -> list[dict]:
    """The judge prompt for one behaviour in one response (chat messages)."""
    context = f"The question was:\n<question>\n{question}\n</question>\n\n" if question else ""
    prompt = (
        f"## Behavior: {behavior.title}\n"
        f"Definition: {behavior.definition}\n\n"
        f"{context}"
        "Count the distinct instances of this behavior in the following response. Only count the behavior "
        "as defined; do not count other behaviors.\n\n"
        f"<response>\n{response}\n</response>\n\n"
        "Explain briefly, then give the number of instances (0 if there are none) on the last line as "
        "<count>N</count>."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


@dataclass(frozen=True)
class JudgedResponse:
    """A response to analyse and where it came from."""

    id: str
    response: str
    question: Optional[str] = None


def read_responses(path: str | Path, benchmark: Optional[str] = None) -> list[JudgedResponse]:
    """The responses of a ``generations.jsonl`` (the harness's, or any JSONL with a ``response`` field),
    optionally only those of one ``benchmark``; ``ValueError`` names the file and line of a bad row."""
    path = Path(path)
    responses = []
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {err.msg}") from err
            if not isinstance(row, dict) or not isinstance(row.get("response"), str):
                raise ValueError(f"{path}:{line_no}: expected an object with a string 'response'")
            if benchmark is not None and row.get("benchmark") != benchmark:
                continue
            has_origin = "benchmark" in row and "id" in row
            item = f"{row['benchmark']}/{row['id']}" if has_origin else str(row.get("id", line_no))
            sample = f"#{row['sample']}" if "sample" in row else ""
            responses.append(JudgedResponse(id=item + sample, response=row["response"], question=row.get("question")))
    if not responses:
        which = f" of benchmark {benchmark!r}" if benchmark is not None else ""
        raise ValueError(f"{path}: no responses{which} to analyse")
    return responses


def count_behaviors(responses: Sequence[JudgedResponse], client: JudgeClient, *,
                    behaviors: Sequence[Behavior] = tuple(BEHAVIORS.values()),
                    concurrency: int = 8) -> dict[str, list[int]]:
    """behaviour key -> one judged count per response (in response order); see the module docstring."""
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    counts = {b.key: [0] * len(responses) for b in behaviors}
    tasks = [(b, i) for i in range(len(responses)) for b in behaviors]
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(tasks), desc="judge", unit="call") as progress:
        futures = {pool.submit(client.count, judge_messages(b, responses[i].response, responses[i].question)): (b, i)
                   for b, i in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                behavior, i = futures[future]
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise JudgeError(f"judging {behavior.key} in response {responses[i].id}: {error} "
                                     f"(finished calls are cached: rerun to resume)") from error
                counts[behavior.key][i] = future.result()
                progress.update(1)
    return counts


@dataclass(frozen=True)
class BehaviorRate:
    behavior: str
    modality: str
    responses: int
    with_behavior: int
    rate: float
    """Emergence rate: share of responses with count > 0."""
    mean_count: float


@dataclass(frozen=True)
class TransferRate:
    visual: str
    linguistic: str
    visual_rate: float
    linguistic_rate: float
    btr: Optional[float]
    """visual_rate / linguistic_rate; None when the linguistic rate is 0."""


@dataclass(frozen=True)
class BehaviorReport:
    rates: dict[str, BehaviorRate]
    pairs: list[TransferRate]
    overall_btr: Optional[float]

    def to_json(self) -> dict:
        return {"rates": {k: asdict(v) for k, v in self.rates.items()}, "pairs": [asdict(p) for p in self.pairs],
                "overall_btr": self.overall_btr}


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator > 0 else None


def summarise(counts: Mapping[str, Sequence[int]],
              pairs: Sequence[tuple[str, str]] = BEHAVIOR_PAIRS) -> BehaviorReport:
    """Emergence rates, pairwise BTR and overall BTR from per-response counts (see the module docstring)."""
    lengths = {len(v) for v in counts.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError("every behaviour needs one count per response, and at least one; "
                         f"got lengths {sorted(lengths)}")
    rates = {}
    for key, values in counts.items():
        present = sum(1 for c in values if c > 0)
        rates[key] = BehaviorRate(behavior=key, modality=BEHAVIORS[key].modality, responses=len(values),
                                  with_behavior=present, rate=present / len(values),
                                  mean_count=sum(values) / len(values))
    transfer = [TransferRate(visual=v, linguistic=l, visual_rate=rates[v].rate, linguistic_rate=rates[l].rate,
                             btr=_ratio(rates[v].rate, rates[l].rate)) for v, l in pairs]
    overall = _ratio(sum(p.visual_rate for p in transfer), sum(p.linguistic_rate for p in transfer))
    return BehaviorReport(rates=rates, pairs=transfer, overall_btr=overall)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _btr(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_report(report: BehaviorReport) -> str:
    """Markdown: one row per behaviour pair (rates, mean counts, BTR), then the overall BTR."""
    rows = ["| visual behaviour | rate | mean | linguistic behaviour | rate | mean | BTR |",
            "|---|---:|---:|---|---:|---:|---:|"]
    for pair in report.pairs:
        v, l = report.rates[pair.visual], report.rates[pair.linguistic]
        rows.append(f"| {BEHAVIORS[pair.visual].title} | {_percent(v.rate)} | {v.mean_count:.2f} | "
                    f"{BEHAVIORS[pair.linguistic].title} | {_percent(l.rate)} | {l.mean_count:.2f} | "
                    f"{_btr(pair.btr)} |")
    responses = next(iter(report.rates.values())).responses
    rows.append(f"\nOverall BTR: {_btr(report.overall_btr)} over {responses} responses "
                "(rate: share of responses with the behaviour; mean: instances per response).")
    return "\n".join(rows)


def plot_report(report: BehaviorReport, path: str | Path, title: str = "Cognitive behaviours") -> Path:
    """A grouped bar chart PNG: per pair, the visual and linguistic emergence rates, BTR above each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = range(len(report.pairs))
    width = 0.38
    fig, ax = plt.subplots(figsize=(8, 4.5))
    visual = [100 * p.visual_rate for p in report.pairs]
    linguistic = [100 * p.linguistic_rate for p in report.pairs]
    ax.bar([x - width / 2 for x in positions], visual, width, label="visual", color="#4C72B0")
    ax.bar([x + width / 2 for x in positions], linguistic, width, label="linguistic", color="#DD8452")
    for x, pair in zip(positions, report.pairs):
        top = max(100 * pair.visual_rate, 100 * pair.linguistic_rate)
        ax.text(x, top + 2, f"BTR {_btr(pair.btr)}", ha="center", fontsize=9)
    ax.set_xticks(list(positions))
    ax.set_xticklabels([f"{BEHAVIORS[p.visual].title.split(' (')[0]}\nvs {BEHAVIORS[p.linguistic].title}"
                        for p in report.pairs], fontsize=8)
    ax.set_ylabel("emergence rate (% of responses)")
    ax.set_ylim(0, 112)
    ax.set_title(f"{title} (overall BTR {_btr(report.overall_btr)})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
