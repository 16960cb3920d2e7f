"""Policy search (ttach_instance.search) against independent references.

References: a plain-loop scorer (mean of the members' softmax in float64, log, divide by T,
log_softmax, mean log-likelihood at the label), a zooming brute-force grid for the temperature,
the closed form of temperature scaling for two classes with one margin, exhaustive search over
every multiset / subset, and a hand-built pool where greedy is not optimal (values by hand).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ttach_instance.search import budget_policy_search, fit_temperature, greedy_policy_search

BOUNDS = (1e-2, 1e2)


# ----------------------------------------------------------------------------- references
def ref_ensemble_log_probs(log_probs, members):
    """log of the mean of the members' probabilities (a member listed twice counts twice)."""
    probs = torch.stack([log_probs[i].double().exp() for i in members]).mean(0)
    return probs.log()


def ref_log_likelihood(z, labels, t=1.0):
    s = torch.log_softmax(z.double() / t, dim=1)
    return float(s[torch.arange(len(labels)), labels].mean())


def ref_best_temperature(z, labels, bounds=BOUNDS, points=2001, zooms=3):
    """Brute force: a grid over log T, then ``zooms`` finer grids around the best point."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    z = z.double()
    best = None
    for _ in range(zooms + 1):
        grid = torch.linspace(lo, hi, points, dtype=torch.float64)
        s = torch.log_softmax(z.unsqueeze(0) / grid.exp().view(-1, 1, 1), dim=2)
        lls = s[:, torch.arange(len(labels)), labels].mean(1)
        j = int(lls.argmax())
        best = (math.exp(float(grid[j])), float(lls[j]))
        step = (hi - lo) / (points - 1)
        lo, hi = max(lo, float(grid[j]) - step), min(hi, float(grid[j]) + step)
    return best


def ref_score(log_probs, labels, members, temperature, memo=None):
    """The ensemble's (temperature-scaled) mean log-likelihood; ``memo``: a dict for one pool."""
    key = (tuple(sorted(members)), temperature)
    if memo is not None and key in memo:
        return memo[key]
    z = ref_ensemble_log_probs(log_probs, members)
    if temperature == "fit":
        score = ref_best_temperature(z, labels, points=101, zooms=6)[1]
    else:
        score = ref_log_likelihood(z, labels, 1.0 if temperature is None else temperature)
    if memo is not None:
        memo[key] = score
    return score


def random_pool(seed, c=4, n=12, k=3, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    base = torch.randn(n, k, generator=g)
    base[torch.arange(n), labels] += 1.0
    logits = base + spread * torch.randn(c, n, k, generator=g)
    return torch.log_softmax(logits.double(), dim=2), labels


def two_class(p_true):
    """log-probs (samples, 2) of class 0 = p_true[i]."""
    p = torch.tensor(p_true, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


# ----------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("n1,n2,d", [(3, 1, 2.0), (5, 2, 0.7), (9, 1, 6.0), (2, 1, 1.0)])
def test_temperature_closed_form_two_classes(n1, n2, d):
    # n1 samples right and n2 wrong, all with margin d: the NLL n1 log(1 + e^{-d/T}) +
    # n2 log(1 + e^{d/T}) is minimal where sigmoid(d/T) = n1 / (n1 + n2): T = d / log(n1 / n2).
    logits = torch.tensor([[d, 0.0]] * n1 + [[0.0, d]] * n2, dtype=torch.float64)
    labels = torch.zeros(n1 + n2, dtype=torch.long)
    t, ll = fit_temperature(torch.log_softmax(logits, 1), labels)
    expected_t = d / math.log(n1 / n2)
    expected_ll = -(n1 * math.log1p(math.exp(-d / expected_t)) + n2 * math.log1p(math.exp(d / expected_t))) / (n1 + n2)
    assert float(t) == pytest.approx(expected_t, rel=1e-5)
    assert float(ll) == pytest.approx(expected_ll, abs=1e-10)


def test_temperature_matches_brute_force_grid():
    torch.manual_seed(0)
    points = 4001
    step = (math.log(BOUNDS[1]) - math.log(BOUNDS[0])) / (points - 1)
    for sharpness in (0.3, 1.0, 3.0, 8.0):
        labels = torch.randint(0, 7, (60,))
        logits = sharpness * torch.randn(5, 60, 7)
        logits[:, torch.arange(60), labels] += sharpness  # informative but miscalibrated
        lp = torch.log_softmax(logits, 2)
        ts, lls = fit_temperature(lp, labels)
        for b in range(5):
            grid = torch.linspace(math.log(BOUNDS[0]), math.log(BOUNDS[1]), points, dtype=torch.float64)
            scaled = torch.log_softmax(lp[b].double().unsqueeze(0) / grid.exp().view(-1, 1, 1), dim=2)
            grid_ll = scaled[:, torch.arange(60), labels].mean(1)
            j = int(grid_ll.argmax())
            assert abs(math.log(float(ts[b])) - float(grid[j])) <= step  # within the grid's resolution
            assert float(lls[b]) >= float(grid_ll[j]) - 1e-10  # at least as good as the grid's best
            assert float(lls[b]) == pytest.approx(ref_log_likelihood(lp[b], labels, float(ts[b])), abs=1e-12)


def test_temperature_stops_at_the_bracket():
    # every sample right: sharper is always better, T goes to the lower bound; every sample
    # confidently wrong: softer is always better, T goes to the upper bound
    right = torch.log_softmax(torch.tensor([[3.0, 0.0, -1.0]] * 4), 1)
    labels = torch.zeros(4, dtype=torch.long)
    t, ll = fit_temperature(right, labels)
    assert float(t) == pytest.approx(BOUNDS[0], rel=1e-9)
    assert float(ll) == pytest.approx(ref_log_likelihood(right, labels, BOUNDS[0]), abs=1e-12)
    t, _ = fit_temperature(right, torch.full((4,), 2, dtype=torch.long))
    assert float(t) == pytest.approx(BOUNDS[1], rel=1e-9)
    t, _ = fit_temperature(right, labels, bounds=(0.5, 2.0))
    assert float(t) == pytest.approx(0.5, rel=1e-9)


# ----------------------------------------------------------------------------- GPS
def test_greedy_not_optimal_hand_built():
    # Two samples of class 0; P(class 0) under each candidate: A (0.55, 0.55), B (0.9, 0.3),
    # C (0.3, 0.9). Unscaled mean log-likelihoods by hand:
    #   step 1: A log .55 = -0.5978 beats B, C: (log .9 + log .3) / 2 = -0.6547
    #   step 2: {A,B} = {A,C}: (log .725 + log .425) / 2 = -0.5886 beat {A,A} (-0.5978); the tie
    #           goes to B (index 1). But {B,C} has means (.6, .6): log .6 = -0.5108 -- better.
    #   step 3: {A,B,C} (7/12, 7/12): log(7/12) = -0.5390 beats {A,B,A} (2/3, 7/15) and {A,B,B}
    #           (47/60, 23/60); the best triple is {B,B,C}: (.7, .5): -0.5249.
    lp = torch.stack([two_class([0.55, 0.55]), two_class([0.9, 0.3]), two_class([0.3, 0.9])])
    labels = torch.zeros(2, dtype=torch.long)
    res = greedy_policy_search(lp, labels, 3, temperature=None)
    assert res.indices == [0, 1, 2]
    expected = [math.log(0.55), (math.log(0.725) + math.log(0.425)) / 2, math.log(7 / 12)]
    assert res.scores == pytest.approx(expected, abs=1e-12)
    assert res.temperatures == [1.0, 1.0, 1.0]
    assert res.scores[1] < math.log(0.6)  # {B, C}: greedy misses it
    assert res.scores[2] < (math.log(0.7) + math.log(0.5)) / 2  # {B, B, C}
    assert greedy_policy_search(lp, labels, 3, temperature=1.0).scores == pytest.approx(expected, abs=1e-12)


def _best_multiset(log_probs, labels, size, temperature, memo):
    scored = sorted(((ref_score(log_probs, labels, m, temperature, memo), m)
                     for m in itertools.combinations_with_replacement(range(log_probs.shape[0]), size)),
                    key=lambda sm: -sm[0])
    return scored[0], scored[1][0] if len(scored) > 1 else -math.inf


@pytest.mark.parametrize("temperature", ["fit", None])
def test_greedy_equals_exhaustive_when_optima_nest(temperature):
    # If the best multisets of sizes 1..n are nested (each the previous plus one candidate),
    # greedy must find every one of them; on every pool, each greedy step must be the best
    # one-step extension of the previous ones (the reference scores every candidate).
    nested_cases = 0
    for seed in range(12):
        lp, labels = random_pool(seed)
        res = greedy_policy_search(lp, labels, 3, temperature=temperature)
        memo = {}
        for m in range(1, 4):
            extension = [ref_score(lp, labels, res.indices[:m - 1] + [c], temperature, memo)
                         for c in range(lp.shape[0])]
            assert extension[res.indices[m - 1]] == pytest.approx(max(extension), abs=1e-7)
            assert res.scores[m - 1] == pytest.approx(extension[res.indices[m - 1]], abs=1e-7)
        optima = [_best_multiset(lp, labels, m, temperature, memo) for m in range(1, 4)]
        sets = [best[1] for best, _ in optima]
        unique = all(best[0] - second > 1e-6 for best, second in optima)
        nested = all(sets[m] in set(itertools.combinations(sets[m + 1], m + 1)) for m in range(2))
        if unique and nested:
            nested_cases += 1
            for m in range(3):
                assert tuple(sorted(res.indices[:m + 1])) == sets[m]
                assert res.scores[m] == pytest.approx(optima[m][0][0], abs=1e-7)
    assert nested_cases >= 3  # the theorem was exercised, not skipped


def test_greedy_repeats_and_ties_go_to_the_lowest_index():
    lp, labels = random_pool(3, c=3)
    dup = torch.cat([lp, lp])  # candidates 3..5 copy 0..2
    res = greedy_policy_search(dup, labels, 5)
    assert all(i < 3 for i in res.indices)
    assert res.indices == greedy_policy_search(lp, labels, 5).indices
    best = max(range(3), key=lambda c: ref_score(lp, labels, [c], "fit"))
    assert greedy_policy_search(lp[[best, best]], labels, 4).indices == [0, 0, 0, 0]  # with replacement


def test_greedy_chunking_and_dtype_do_not_change_the_result():
    lp, labels = random_pool(5, c=9, n=40, k=6)
    whole = greedy_policy_search(lp, labels, 4)
    one_by_one = greedy_policy_search(lp, labels, 4, chunk_elements=1)
    assert one_by_one.indices == whole.indices
    assert one_by_one.scores == pytest.approx(whole.scores, abs=1e-12)
    assert one_by_one.temperatures == pytest.approx(whole.temperatures, rel=1e-4)
    half = greedy_policy_search(lp.half(), labels, 4)
    assert half.scores == pytest.approx(whole.scores, abs=2e-3)


def test_greedy_fitted_temperature_is_the_ensembles():
    lp, labels = random_pool(7, c=5, n=30, k=4, spread=3.0)
    res = greedy_policy_search(lp, labels, 3)
    for m in range(1, 4):
        z = ref_ensemble_log_probs(lp, res.indices[:m])
        t, ll = ref_best_temperature(z, labels)
        assert math.log(res.temperatures[m - 1]) == pytest.approx(math.log(t), abs=1e-4)
        assert res.scores[m - 1] == pytest.approx(ll, abs=1e-9)


# ----------------------------------------------------------------------------- budget
def ref_budget_key(log_probs, labels, members):
    probs = torch.stack([log_probs[i].double().exp() for i in members]).mean(0)
    correct = int((probs.argmax(1) == labels).sum())
    nll = float(-probs[torch.arange(len(labels)), labels].log().mean())
    return correct, nll


def ref_budget_best(log_probs, labels, budget, identity, objective):
    best = None
    for subset in itertools.combinations(range(log_probs.shape[0]), budget):  # lexicographic
        if identity not in subset:
            continue
        correct, nll = ref_budget_key(log_probs, labels, subset)
        key = (-correct, nll) if objective == "accuracy" else (nll,)
        if best is None or key < best[0]:
            best = (key, subset, correct, nll)
    return best


@pytest.mark.parametrize("objective", ["accuracy", "nll"])
def test_budget_equals_brute_force(objective):
    for seed in range(6):
        lp, labels = random_pool(seed, c=6, n=20, k=4)
        for budget in (1, 2, 3, 4, 6):
            for identity in (0, 3):
                res = budget_policy_search(lp, labels, budget, identity=identity, objective=objective)
                _, subset, correct, nll = ref_budget_best(lp, labels, budget, identity, objective)
                assert res.method == "exhaustive"
                assert res.indices[0] == identity and len(set(res.indices)) == budget
                assert tuple(sorted(res.indices)) == subset
                for m in range(1, budget + 1):  # every prefix's score
                    c, nll_m = ref_budget_key(lp, labels, res.indices[:m])
                    assert res.scores[m - 1] == pytest.approx(c / 20 if objective == "accuracy" else nll_m, abs=1e-12)
                assert res.scores[-1] == pytest.approx(correct / 20 if objective == "accuracy" else nll, abs=1e-12)


def ref_budget_greedy(log_probs, labels, budget, identity, objective):
    chosen = [identity]
    while len(chosen) < budget:
        best = None
        for c in range(log_probs.shape[0]):
            if c in chosen:
                continue
            correct, nll = ref_budget_key(log_probs, labels, chosen + [c])
            key = (-correct, nll) if objective == "accuracy" else (nll,)
            if best is None or key < best[0]:
                best = (key, c)
        chosen.append(best[1])
    return chosen


@pytest.mark.parametrize("objective", ["accuracy", "nll"])
def test_budget_greedy_fallback_above_the_limit(objective):
    differs = 0
    for seed in range(12):
        lp, labels = random_pool(seed, c=7, n=15, k=3, spread=2.5)
        subsets = math.comb(6, 2)
        exhaustive = budget_policy_search(lp, labels, 3, identity=1, objective=objective, exhaustive_limit=subsets)
        greedy = budget_policy_search(lp, labels, 3, identity=1, objective=objective, exhaustive_limit=subsets - 1)
        assert exhaustive.method == "exhaustive" and greedy.method == "greedy"
        assert greedy.indices == ref_budget_greedy(lp, labels, 3, 1, objective)
        assert tuple(sorted(exhaustive.indices)) == ref_budget_best(lp, labels, 3, 1, objective)[1]
        differs += sorted(greedy.indices) != sorted(exhaustive.indices)
    assert differs >= 1  # the fallback is really greedy: somewhere it misses the optimum


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    lp, labels = random_pool(0)
    cases = [
        (lambda: greedy_policy_search(lp[0], labels, 2), "log_probs"),
        (lambda: greedy_policy_search(lp.argmax(2), labels, 2), "log_probs"),
        (lambda: greedy_policy_search(lp * 3, labels, 2), "log_softmax"),
        (lambda: greedy_policy_search(lp.exp(), labels, 2), "log_softmax"),
        (lambda: greedy_policy_search(torch.where(lp > -0.5, float("nan"), lp), labels, 2), "finite"),
        (lambda: greedy_policy_search(torch.where(lp > -0.5, -float("inf"), lp), labels, 2), "finite"),
        (lambda: greedy_policy_search(lp[:, :, :1], labels, 2), "2 classes"),
        (lambda: greedy_policy_search(lp, labels.float(), 2), "labels"),
        (lambda: greedy_policy_search(lp, labels[:-1], 2), "labels"),
        (lambda: greedy_policy_search(lp, labels + 3, 2), "labels must be class indices"),
        (lambda: greedy_policy_search(lp, labels - 1 - labels, 2), "labels must be class indices"),
        (lambda: greedy_policy_search(lp, labels, 0), "n must be"),
        (lambda: greedy_policy_search(lp, labels, True), "n must be"),
        (lambda: greedy_policy_search(lp, labels, 2, temperature=-1.0), "temperature"),
        (lambda: greedy_policy_search(lp, labels, 2, temperature="auto"), "temperature"),
        (lambda: greedy_policy_search(lp, labels, 2, temperature_bounds=(2.0, 1.0)), "temperature_bounds"),
        (lambda: budget_policy_search(lp, labels, 5), "budget must be at most"),
        (lambda: budget_policy_search(lp, labels, 0), "budget must be"),
        (lambda: budget_policy_search(lp, labels, 2, identity=4), "identity"),
        (lambda: budget_policy_search(lp, labels, 2, identity=-1), "identity"),
        (lambda: budget_policy_search(lp, labels, 2, objective="loss"), "objective"),
        (lambda: budget_policy_search(lp, labels, 2, exhaustive_limit=-1), "exhaustive_limit"),
    ]
    for call, needle in cases:
        with pytest.raises((ValueError, TypeError), match=needle):
            call()


# ----------------------------------------------------------------------------- staged (Dufour)
FAMILIES = [None, "rotate", "rotate", "rotate", "zoom", "zoom", "color"]  # candidate 0: the original


def ref_order(correct, nll, objective):
    """Sort key of a policy's (correct, NLL): lower is better."""
    return (-correct, nll) if objective == "accuracy" else (nll,)


def ref_sweep(log_probs, labels, families, identity, objective):
    """Per family, the member whose {identity, member} policy scores best (lowest index of ties)."""
    out = {}
    for c, f in enumerate(families):
        if f is None or c == identity:
            continue
        key = ref_order(*ref_budget_key(log_probs, labels, [identity, c]), objective)
        if f not in out or key < out[f][0]:
            out[f] = (key, c)
    return {f: c for f, (_, c) in out.items()}


def ref_best_over(log_probs, labels, pool, budget, objective):
    """Brute force over the subsets of ``pool`` (``pool[0]`` the original, always in)."""
    best = ref_budget_best(log_probs[pool], labels, budget, 0, objective)
    return sorted(pool[i] for i in best[1]), best[2], best[3]


def composite_source(seed, samples, classes, calls):
    """A stand-in for the model on composites: fixed log-probs per pair, every call recorded."""
    def source(pairs):
        calls.append(list(pairs))
        out = []
        for i, j in pairs:
            g = torch.Generator().manual_seed(seed * 1000 + 10 * i + j)
            out.append(torch.log_softmax(2.0 * torch.randn(samples, classes, generator=g, dtype=torch.float64), 1))
        return torch.stack(out)
    return source


@pytest.mark.parametrize("objective", ["accuracy", "nll"])
def test_staged_stages_equal_brute_force(objective):
    from ttach_instance.staged_search import staged_budget_search

    composites_won = 0
    for seed in range(8):
        lp, labels = random_pool(seed, c=7, n=20, k=4, spread=2.0)
        winners = ref_sweep(lp, labels, FAMILIES, 0, objective)
        pool_b = [0] + sorted(winners.values())
        for budget in (1, 2, 3, 4):
            calls = []
            res = staged_budget_search(lp, labels, budget, FAMILIES, objective=objective,
                                       composite_log_probs=composite_source(seed, 20, 4, calls))
            st = res.details["stages"]
            # (a) the sweep: each family's winner, and every member's paired score
            assert {f: s["winner"] for f, s in st["sweep"].items()} == winners
            for f, s in st["sweep"].items():
                for c, score in zip(s["candidates"], s["scores"]):
                    correct, nll = ref_budget_key(lp, labels, [0, c])
                    assert score == pytest.approx(correct / 20 if objective == "accuracy" else nll, abs=1e-12)
            # (b) the best subset of the original and the winners
            assert st["combinations"]["pool"] == pool_b
            subset_b, correct_b, nll_b = ref_best_over(lp, labels, pool_b, budget, objective)
            assert sorted(st["combinations"]["indices"]) == subset_b
            assert st["combinations"]["indices"][0] == 0 and st["combinations"]["method"] == "exhaustive"
            # (c) pairs of winners composed; the best subset of everything, composites indexed after the pool
            pairs = list(itertools.combinations(sorted(winners.values()), 2))
            assert calls == [pairs] and res.details["composites"] == [list(p) for p in pairs]
            extended = torch.cat([lp, composite_source(seed, 20, 4, [])(pairs)])
            pool_c = pool_b + [7 + k for k in range(len(pairs))]
            subset_c, correct_c, nll_c = ref_best_over(extended, labels, pool_c, budget, objective)
            assert sorted(st["composites"]["indices"]) == subset_c
            # the result: stage (c)'s subset (exhaustive, so never worse than (b)'s), prefixes scored
            assert sorted(res.indices) == subset_c and res.indices[0] == 0 and res.method == "staged"
            for m in range(1, budget + 1):
                correct, nll = ref_budget_key(extended, labels, res.indices[:m])
                assert res.scores[m - 1] == pytest.approx(correct / 20 if objective == "accuracy" else nll, abs=1e-12)
            assert ref_order(correct_c, nll_c, objective) <= ref_order(correct_b, nll_b, objective)
            composites_won += any(i >= 7 for i in res.indices)
    assert composites_won >= 3  # stage (c) mattered somewhere


def test_staged_hand_built_composite_and_sweep():
    """Two samples of class 0 (P(class 0) per candidate by hand). Sweep: rotate(a) pairs with the
    original (0.4, 0.4) to (0.5, 0.65) -- mean 0.45 / 0.525 -- vs rotate(b) (0.7, 0.1): (0.55, 0.25)
    => accuracy 1/2 each; NLL picks rotate(a) (-(log .45 + log .525)/2 = 0.7215 < 0.9916).
    flip: one member. Budget 2: {0, flip (0.9, 0.2)} = (0.65, 0.3), {0, rot a}: (0.45, 0.525);
    NLL .8174 vs .7215 -> rotate(a) wins stage (b). The composite rot a + flip (0.8, 0.8) gives
    (0.6, 0.6): NLL 0.5108 and both right: stage (c) picks it."""
    from ttach_instance.staged_search import staged_budget_search

    lp = torch.stack([two_class([0.4, 0.4]), two_class([0.5, 0.65]), two_class([0.7, 0.1]), two_class([0.9, 0.2])])
    labels = torch.zeros(2, dtype=torch.long)
    families = [None, "rotate", "rotate", "hflip"]
    calls = []

    def composite(pairs):
        calls.append(pairs)
        return torch.stack([two_class([0.8, 0.8])])

    res = staged_budget_search(lp, labels, 2, families, objective="nll", composite_log_probs=composite)
    st = res.details["stages"]
    assert st["sweep"]["rotate"]["winner"] == 1 and st["sweep"]["hflip"]["winner"] == 3
    assert st["sweep"]["rotate"]["scores"] == pytest.approx(
        [-(math.log(0.45) + math.log(0.525)) / 2, -(math.log(0.55) + math.log(0.25)) / 2], abs=1e-12)
    assert st["combinations"]["indices"] == [0, 1]
    assert calls == [[(1, 3)]]
    assert res.indices == [0, 4] and res.details["final_stage"] == "composites"
    assert res.scores == pytest.approx([-math.log(0.4), -math.log(0.6)], abs=1e-12)
    # without stage (c): stage (b)'s choice, here also the best pair of the whole pool
    plain = staged_budget_search(lp, labels, 2, families, objective="nll")
    assert plain.indices == [0, 1] and plain.details["final_stage"] == "combinations"
    assert "composites" not in plain.details["stages"]
    assert plain.indices == budget_policy_search(lp, labels, 2, objective="nll").indices


def test_staged_composite_pool_and_limits():
    from ttach_instance.staged_search import composite_specs, op_families, staged_budget_search

    lp, labels = random_pool(2, c=7, n=20, k=4, spread=2.0)
    calls = []
    staged_budget_search(lp, labels, 3, FAMILIES, composite_log_probs=composite_source(2, 20, 4, calls),
                         composite_pool=2)
    winners = sorted(ref_sweep(lp, labels, FAMILIES, 0, "accuracy").values())
    assert len(winners) == 3
    ranked = sorted(winners, key=lambda c: ref_order(*ref_budget_key(lp, labels, [0, c]), "accuracy"))
    assert calls == [[tuple(sorted(ranked[:2]))]]  # the pairs among the best 2 winners by accuracy, then NLL
    # greedy above the limit: stage (b) and (c) report it
    greedy = staged_budget_search(lp, labels, 3, FAMILIES, composite_log_probs=composite_source(2, 20, 4, []),
                                  exhaustive_limit=0)
    assert greedy.details["stages"]["combinations"]["method"] == "greedy"
    assert greedy.details["stages"]["composites"]["method"] == "greedy"
    # a budget beyond what the stages reach is refused before any composite is predicted
    calls.clear()
    with pytest.raises(ValueError, match=r"budget must be at most the 4 candidates .* 3 family winners and 0 composites"):
        staged_budget_search(lp, labels, 5, FAMILIES)
    with pytest.raises(ValueError, match=r"at most the 7 candidates"):
        staged_budget_search(lp, labels, 8, FAMILIES, composite_log_probs=composite_source(2, 20, 4, calls))
    assert calls == []
    for kwargs, needle in [(dict(families=FAMILIES[:-1]), "families must give each of the 7"),
                           (dict(families=[None, ""] + FAMILIES[2:]), "families"),
                           (dict(composite_log_probs=lambda p: torch.zeros(len(p), 20, 3)), "composite_log_probs must "
                                                                                            "return log-probs"),
                           (dict(composite_log_probs=lambda p: torch.zeros(len(p), 20, 4)), "returned bad values"),
                           (dict(composite_log_probs="yes"), "composite_log_probs must be callable"),
                           (dict(composite_pool=0), "composite_pool"), (dict(identity=7), "identity"),
                           (dict(objective="loss"), "objective")]:
        with pytest.raises((ValueError, TypeError), match=needle):
            staged_budget_search(lp, labels, 2, **{"families": FAMILIES, **kwargs})
    # families and composite specs from a pool's specs
    from ttach_instance.registry import get_space

    pool = get_space("paper12")
    fam = op_families(pool.spec())
    assert fam[0] is None and fam[1] == fam[2] == "rotate" and fam[3] == "zoom" and fam[11] == "color"
    spec = composite_specs(pool.spec(), [(1, 3)])[0]
    assert spec == {"name": "rotate(-20)+zoom(0.8)", "ops": pool.spec()[1]["ops"] + pool.spec()[3]["ops"]}
    with pytest.raises(ValueError, match=r"specs\[1\]"):
        op_families([{"name": "identity", "ops": []}, {"name": "x"}])
