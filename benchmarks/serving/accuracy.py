"""Answer accuracy for datasets whose answers are known (`--dataset shapes`), per question kind."""
from __future__ import annotations

from collections.abc import Sequence

from benchmarks.serving.metrics import RequestResult
from benchmarks.serving.workloads import BenchRequest


def accuracy(requests: Sequence[BenchRequest], results: Sequence[RequestResult]) -> dict[str, dict]:
    """{kind: {"right", "total", "accuracy"}} over requests with an expected answer; a failed request is wrong."""
    from runtime.shapes.scene import Question, is_correct

    tally: dict[str, list[int]] = {}
    for req, res in zip(requests, results):
        if not req.expected:
            continue
        q = Question(req.question_kind, "", req.expected)
        right = res.success and is_correct(q, res.text)
        counts = tally.setdefault(req.question_kind, [0, 0])
        counts[0] += int(right)
        counts[1] += 1
    return {k: {"right": r, "total": n, "accuracy": r / n} for k, (r, n) in sorted(tally.items())}


def accuracy_table(acc: dict[str, dict]) -> str:
    rows = [f"{'question kind':<16}{'right':>8}{'total':>8}{'accuracy':>10}"]
    rows += [f"{k:<16}{v['right']:>8}{v['total']:>8}{v['accuracy']:>10.1%}" for k, v in acc.items()]
    return "\n".join(rows)
