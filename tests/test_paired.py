"""Paired differences of two models' per-item zero-shot scores, against a direct computation."""

import math
import statistics

import pytest

from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.paired import paired_difference
from gqa_prune.evaluation.zeroshot import TaskScore, ZeroShotResult


def result(items: dict[str, list[float]]) -> ZeroShotResult:
    tasks = {
        n: TaskScore(
            acc=None,
            acc_norm=sum(v) / len(v),
            acc_stderr=None,
            acc_norm_stderr=None,
            num_samples=len(v),
        )
        for n, v in items.items()
    }
    return ZeroShotResult(
        tasks=tasks,
        mean_acc=None,
        mean_acc_norm=sum(t.acc_norm for t in tasks.values()) / len(tasks),
        num_fewshot=0,
        limit=None,
        lm_eval_version="x",
        requested=tuple(items),
        items={
            n: {"doc_id": [float(i) for i in range(len(v))], "score": v} for n, v in items.items()
        },
    )


A = {"t1": [1.0, 1.0, 1.0, 0.0, 0.0], "t2": [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]}
B = {"t1": [1.0, 1.0, 0.0, 0.0, 0.0], "t2": [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]}


def test_paired_difference_matches_a_direct_computation():
    per_task, mean = paired_difference(result(A), result(B))
    ses, unpaired = [], []
    for name in A:
        a, b = A[name], B[name]
        d = [x - y for x, y in zip(a, b)]
        n = len(d)
        assert per_task[name].diff == pytest.approx(statistics.fmean(d))
        assert per_task[name].se == pytest.approx(statistics.stdev(d) / math.sqrt(n))
        u = math.sqrt((statistics.variance(a) + statistics.variance(b)) / n)
        assert per_task[name].se_unpaired == pytest.approx(u)
        assert per_task[name].n == n
        ses.append(statistics.variance(d) / n)
        unpaired.append(u**2)
    means_a = [statistics.fmean(v) for v in A.values()]
    means_b = [statistics.fmean(v) for v in B.values()]
    assert mean.diff == pytest.approx((sum(means_a) - sum(means_b)) / 2)
    assert mean.a == pytest.approx(sum(means_a) / 2)
    assert mean.se == pytest.approx(math.sqrt(sum(ses)) / 2)
    assert mean.se_unpaired == pytest.approx(math.sqrt(sum(unpaired)) / 2)
    assert mean.n == 12
    # t1: the models agree on 4 of 5 items, so pairing shrinks the error
    assert per_task["t1"].se < per_task["t1"].se_unpaired
    # swapping the two flips the sign and keeps the errors
    _, back = paired_difference(result(B), result(A))
    assert back.diff == pytest.approx(-mean.diff) and back.se == pytest.approx(mean.se)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    per_task, mean = paired_difference(result(A), result(A), tasks=["t2"])
    assert list(per_task) == ["t2"]
    assert mean.diff == 0.0 and mean.se == 0.0 and mean.se_unpaired > 0


def test_paired_difference_refuses_different_items():
    short = dict(A, t2=A["t2"][:6])
    with pytest.raises(GQAPruneError, match="task t2: the two results scored different items"):
        paired_difference(result(A), result(short))
    with pytest.raises(GQAPruneError, match="no per-item logprob"):
        paired_difference(result(A), result(A), metric="logprob")
    with pytest.raises(GQAPruneError, match="no per-item scores for task t3"):
        paired_difference(result(A), result(A), tasks=["t3"])
