"""The spy game's rules (vision_zero/rules.py) against numbers worked out by hand."""

import os
import random

import pytest

from config import ConfigError, load_config
from vision_zero import rules as spy
from vision_zero.rules import NA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_clue_rewards_by_hand_and_zero_sum():
    # 5 players, the spy in seat 2; votes received v1..v5 = 1, 2, 0.5, 0.5, 0.
    # civilians' mean = (1 + 0.5 + 0.5 + 0) / 4 = 0.5; v_spy - mean = 1.5
    # spy: -0.1 * 1.5 = -0.15; civilian j: 0.1 / 4 * 1.5 - 0.1 * (v_j - 0.5)
    r = spy.clue_rewards([0.0, 1.0, 2.0, 0.5, 0.5, 0.0], 2, beta=0.1, lam=0.1)
    expected = {1: 0.0375 - 0.05, 2: -0.15, 3: 0.0375, 4: 0.0375, 5: 0.0375 + 0.05}
    assert r.keys() == expected.keys()
    for k, value in expected.items():
        assert r[k] == pytest.approx(value, abs=1e-12), k
    assert sum(r.values()) == pytest.approx(0.0, abs=1e-12)
    # each term alone: beta only moves the spy-vs-civilians part, lambda the civilians' spread
    only_beta = spy.clue_rewards([0.0, 1.0, 2.0, 0.5, 0.5, 0.0], 2, beta=0.1, lam=0.0)
    assert [only_beta[k] for k in (1, 3, 4, 5)] == pytest.approx([0.0375] * 4)
    only_lam = spy.clue_rewards([0.0, 1.0, 2.0, 0.5, 0.5, 0.0], 2, beta=0.0, lam=0.1)
    assert only_lam[2] == 0 and [only_lam[k] for k in (1, 3, 4, 5)] == pytest.approx(
        [-0.05, 0.0, 0.0, 0.05])
    for seed in range(20):  # zero-sum for any votes
        rng = random.Random(seed)
        v = [0.0] + [rng.random() * 3 for _ in range(6)]
        assert sum(spy.clue_rewards(v, rng.randint(1, 6), beta=0.3, lam=0.7).values()) == \
            pytest.approx(0.0, abs=1e-12)


def test_vote_counts_split_each_voters_vote_over_its_samples():
    votes = [[2, 2, NA, None], [2, 1, 1, 3], [5, 2, 2, 2]]
    assert spy.vote_counts(votes, 5) == pytest.approx([0.0, 0.5, 1.5, 0.25, 0.0, 0.25])


def test_decision_reward():
    assert [spy.decision_reward(v, 2) for v in (2, NA, 3, None)] == [1.0, -0.5, -1.0, -1.0]


def test_role_baselines_update_before_they_are_subtracted():
    b = spy.RoleBaselines(0.95)
    b.update(-0.15, 0.0375)
    assert (b.spy, b.civilian) == pytest.approx((-0.0075, 0.001875))
    assert b.advantage(-0.15, True) == pytest.approx(-0.1425)
    assert b.advantage(0.0375, False) == pytest.approx(0.035625)
    b.update(0.1, -0.025)  # 0.95 * -0.0075 + 0.05 * 0.1; 0.95 * 0.001875 + 0.05 * -0.025
    assert (b.spy, b.civilian) == pytest.approx((-0.002125, 0.00053125))
    copy = spy.RoleBaselines(0.5)
    copy.load_state_dict(b.state_dict())
    assert copy.state_dict() == b.state_dict()


def test_phase_switch_follows_the_rule_worked_out_by_hand():
    # rho 0.5, K_min 2, no patience; (acc, n/a) per update -> EMAs -> the next update's stage:
    #  1 (1, 0)   acc .5                d 1 < 2                      decision
    #  2 (1, 0)   acc .75               acc < .9                     decision
    #  3 (1, 0)   acc .875              acc < .9                     decision
    #  4 (1, 0)   acc .9375, na 0       d 4: acc >= .9, na <= .1     -> clue (d 0)
    #  5 (.2, 0)  acc .56875            error .43 >= .4 but d 1 < 2  clue
    #  6 (.2, 0)  acc .384375           d 2: error >= .4             -> decision
    #  7 (1, .8)  acc .6921875, na .4   d 1                          decision
    #  8 (1, 0)   acc .846, na .2       acc < .9                     decision
    #  9 (1, 0)   acc .923, na .1       d 3: acc >= .9, na <= .1     -> clue
    switch = spy.PhaseSwitch(rho=0.5, k_min=2, patience=0)
    assert switch.phase == spy.DECISION
    seen = [switch.observe(acc, na) for acc, na in [(1, 0), (1, 0), (1, 0), (1, 0), (0.2, 0),
                                                     (0.2, 0), (1, 0.8), (1, 0), (1, 0)]]
    D, C = spy.DECISION, spy.CLUE
    assert seen == [D, D, D, C, C, D, D, D, C]
    assert (switch.acc, switch.na) == pytest.approx((0.923046875, 0.1))
    # the n/a rule alone sends the clue stage back: na >= .5 with accuracy high
    switch = spy.PhaseSwitch(rho=0.0, k_min=1, patience=0)
    assert [switch.observe(*x) for x in [(1, 0), (1, 0.6), (1, 0.05)]] == [C, D, C]


def test_debiased_switch_reads_the_emas_over_one_minus_rho_to_the_t():
    # rho 0.5, K_min 2, no patience; accuracy 0.95 every update, n/a 0:
    #  t 1: EMA .475,   / (1 - .5)   = .95   d 1 < 2                      decision
    #  t 2: EMA .7125,  / (1 - .25)  = .95   d 2: .95 >= .9, n/a 0 <= .1  -> clue
    # without debias: .475, .7125, .83125, .890625, .9203125: the switch waits for t 5
    switch = spy.PhaseSwitch(rho=0.5, k_min=2, patience=0, debias=True)
    assert switch.observe(0.95, 0) == spy.DECISION and switch.reason is None
    assert switch.estimates() == pytest.approx((0.95, 0.0))
    assert switch.observe(0.95, 0) == spy.CLUE
    assert switch.reason == "accuracy 0.950 >= 0.9 and n/a 0.000 <= 0.1"
    assert (switch.acc, switch.t) == pytest.approx((0.7125, 2))
    plain = spy.PhaseSwitch(rho=0.5, k_min=2, patience=0)
    assert [plain.observe(0.95, 0) for _ in range(5)] == ["decision"] * 4 + ["clue"]
    assert plain.acc == pytest.approx(0.9203125) and plain.estimates()[0] == plain.acc
    # clue stage, t 3 and 4 with accuracy 0.5: EMAs .60625 and .553125, over .875 and .9375:
    # .6929 (error .307: stay), .59 (error .41 >= .4 and d 2: -> decision)
    assert switch.observe(0.5, 0) == spy.CLUE and switch.reason is None
    assert switch.observe(0.5, 0) == spy.DECISION
    assert switch.reason == "error 0.410 >= 0.4"
    resumed = spy.PhaseSwitch(rho=0.5, k_min=2, patience=0, debias=True)
    resumed.load_state_dict(switch.state_dict())
    assert resumed.estimates() == switch.estimates()


def test_switch_reasons_name_the_rule_that_fired():
    switch = spy.PhaseSwitch(rho=0.0, k_min=1, patience=0)
    switch.observe(1, 0)
    switch.observe(1, 0.6)  # clue -> decision by the n/a rule, accuracy high
    assert switch.reason == "n/a 0.600 >= 0.5"
    forced = spy.PhaseSwitch(rho=0.5, k_min=1, patience=2)
    forced.observe(0, 0)
    forced.observe(0, 0)
    assert forced.phase == spy.CLUE and forced.reason == "patience (2 updates)"


def test_phase_switch_patience_and_the_released_codes_alternation():
    switch = spy.PhaseSwitch(rho=0.5, k_min=1, patience=3)  # accuracy 0: only patience moves it
    assert [switch.observe(0, 0) for _ in range(4)] == ["decision", "decision", "clue",
                                                        "decision"]
    alternate = spy.PhaseSwitch(schedule="alternate")
    assert [alternate.observe(1, 0) for _ in range(4)] == ["clue", "decision", "clue", "decision"]
    resumed = spy.PhaseSwitch()
    resumed.load_state_dict(switch.state_dict())
    assert resumed.state_dict() == switch.state_dict()


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{3}", 3), ("I think so. \\boxed{Player 2}", 2), ("\\boxed{N/A}", NA),
    ("\\boxed{n/a}", NA), ("\\boxed{NA}", NA), ("\\boxed{7}", None), ("\\boxed{0}", None),
    ("player 3", None), ("\\boxed{nobody}", None), ("\\boxed{3 or 4}", None), ("", None)])
def test_parse_vote(text, expected):
    assert spy.parse_vote(text, 5) == expected


def test_parse_clue():
    assert spy.parse_clue("I see red. \\boxed{red  circle}") == ("I see red. ", "red circle")
    assert spy.parse_clue("thinking \\boxed{}")[1] is None
    assert spy.parse_clue("no box at all") == ("no box at all", None)


def test_history_shows_every_clue_and_only_the_viewers_own_reasoning():
    game = spy.Game(0, 2, 3)
    turns = [spy.Turn(1, 1, "secret-1", "a cube"), spy.Turn(2, 1, "secret-2", None),
             spy.Turn(3, 1, "secret-3", "a ball"), spy.Turn(1, 2, "secret-1b", "a cone")]
    for style in ("paper", "compact"):
        text = spy.clue_prompt_text(game, 3, 2, turns, style=style, difference="x")
        assert "a cube" in text and "a ball" in text and "a cone" in text
        assert spy.PROMPTS[style]["no_clue"] in text  # player 2's unparsable clue
        assert "secret-1" not in text and "secret-2" not in text
        vote = spy.vote_prompt_text(game, 1, turns, style=style, difference="x")
        assert "a cone" in vote and "secret" not in vote
        observer = spy.vote_prompt_text(game, None, turns, style=style, difference="x")
        assert "a cone" in observer and "secret" not in observer and "player 1 of" not in observer
    own = spy.clue_prompt_text(game, 3, 2, turns, style="paper", difference="x")
    assert "secret-3" in own
    spy_prompt = spy.clue_prompt_text(game, 2, 2, turns, style="paper", difference="two swaps")
    assert spy.PROMPTS["paper"]["spy"] in spy_prompt and "two swaps" in spy_prompt
    civilian = spy.clue_prompt_text(game, 1, 2, turns, style="paper", difference="two swaps")
    assert spy.PROMPTS["paper"]["civilian"] in civilian
    first = spy.clue_prompt_text(game, 1, 1, [], style="paper", difference="x")
    assert spy.PROMPTS["paper"]["first"] in first


@pytest.mark.parametrize("override, key", [
    ("spy.voters=judge", "spy.voters"), ("spy.schedule=sometimes", "spy.schedule"),
    ("spy.civilians=1", "spy.civilians"), ("spy.rae_alpha=1.5", "spy.rae_alpha"),
    ("spy.k_min=0", "spy.k_min"), ("method=spy", "method"), ("spy.group_size=1",
                                                              "spy.group_size")])
def test_bad_spy_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(os.path.join(ROOT, "configs", "vision-zero.yaml"), [override])
