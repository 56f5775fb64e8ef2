"""Vision-Zero's "who is the spy" game (arXiv 2509.25541): its rules, as the paper states them.

n_c civilians see image A, one spy sees its edited twin B (two objects changed in shape and
colour, in the same places). Everyone gives a clue in turn, in a fixed seat order, over two
rounds: a later speaker sees every earlier clue, and each player sees its own earlier reasoning
(the text before its `\\boxed{}` clue), nobody else's. Then each civilian votes, several samples
per vote, for the player it thinks is the spy, or "n/a". No label is needed: the game dealt the
roles, so it knows the spy.

Rewards (the paper's equations 1-6):
- clue stage, zero-sum (`clue_rewards`): with v_k the votes player k received (`vote_counts`)
  and v_c their mean over the civilians, r_spy = -beta (v_spy - v_c) and
  r_cj = (beta / n_c)(v_spy - v_c) - lambda (v_cj - v_c); the sum over players is 0;
- Role-Advantage Estimation (`RoleBaselines`): a per-role EMA baseline b <- alpha b +
  (1 - alpha) mean(r), updated first; a clue's advantage is r - b;
- decision stage (`decision_reward`): +1 the spy, -0.5 "n/a", -1 anyone else (an invalid vote
  too), normalised within the vote samples of one civilian (`grpo.group_advantages`).
Iterative-SPO (`PhaseSwitch`): EMAs (rho) of the vote accuracy and the n/a rate switch training
from the decision stage to the clue stage when acc >= 0.9 and n/a <= 0.1, back when error >= 0.4
or n/a >= 0.5, after at least K_min updates in a stage. Only the active stage's samples get
gradients; both stages are played every step (the clue rewards need the votes).
Where the paper is silent or the released code differs, docs/vision_zero.md lists our choices.
"""

import re
from dataclasses import dataclass

from answers import extract_boxed

NA = "n/a"

# ----------------------------------------------------------------------------
# Games, prompts and parsing


@dataclass(frozen=True)
class Game:
    pair: int                     # index into the pairs
    spy: int                      # the spy's seat, 1..players
    players: int                  # civilians + 1

    def civilians(self):
        return [k for k in range(1, self.players + 1) if k != self.spy]


def deal(rng, pair_indices, players):
    """One game per pair index: the spy's seat drawn uniformly from 1..players."""
    return [Game(pair, rng.randint(1, players), players) for pair in pair_indices]


# Two prompt styles. "paper": the paper's appendix prompts, for instruction-tuned models.
# "compact": the same content in few words, for the embedded default's tiny model (its
# tokenizer was trained on the toy world's language, so every extra word costs many tokens).
PROMPTS = {
    "paper": {
        "clue": (
            "You are PLAYER {player} of the game \"Who is the spy?\". This is ROUND {round}. "
            "There are {players} players: all but one see the same picture; the spy sees a "
            "picture in which {difference}.\n"
            "Your role: {role}\n"
            "Your task is to describe your picture in one sentence, which can only be about the "
            "features of objects and the relationship between objects. The player voted as the "
            "spy will be severely punished, so convince the others that you are not the spy. "
            "{strategy}\n"
            "First reason privately, step by step (your reasoning stays hidden from the others); "
            "then put your one-sentence description inside \\boxed{{}}. It must differ from "
            "every earlier clue.\n"
            "Earlier clues (and your own earlier reasoning):\n{history}"),
        "spy": "SPY (your picture differs from the others')",
        "civilian": "NOT SPY (you have the same picture as most others)",
        "spy_strategy": ("Infer from the clues what the others see, and describe a feature "
                         "that is true of their picture, so that you are not found out."),
        "civilian_strategy": ("Describe a clear, specific feature of your picture that does "
                              "not overlap with earlier clues."),
        "vote": (
            "You are PLAYER {player} of the game \"Who is the spy?\"; you are NOT the spy. "
            "{players} players have each given clues about their pictures; the spy's picture "
            "differs from yours: {difference}. Analyse every clue together with your own "
            "picture and identify the spy. If you are uncertain, you may answer N/A: a wrong "
            "vote costs more than N/A.\n"
            "Reason step by step, then put your final answer (a PLAYER_NUMBER or N/A) inside "
            "\\boxed{{}}, e.g. \\boxed{{2}} or \\boxed{{N/A}}.\n"
            "All clues:\n{history}"),
        "observer": (
            "You are analysing a game of \"Who is the spy?\" where {players} players have just "
            "given clues about their pictures. Identify which player is the spy, whose picture "
            "differs: {difference}. The image you see is the ORIGINAL picture (what the other "
            "players see). Reason step by step, then put your final answer (a PLAYER_NUMBER or "
            "N/A) inside \\boxed{{}}. If you are uncertain, you can answer N/A.\n"
            "All clues:\n{history}"),
        "first": "(You speak first: there is no earlier clue.)",
        "round": "Round {round}:",
        "clue_line": "Player {player}: {clue}",
        "own_line": "Player {player} (you): {reasoning} \\boxed{{{clue}}}",
        "no_clue": "(no valid clue)",
        "separator": "\n",
    },
    "compact": {
        "clue": "spy game, round {round}. you are player {player} of {players}, {role}. "
                "clues: {history}. your clue in \\boxed{{}}:",
        "spy": "the spy: two things of your image differ",
        "civilian": "not the spy",
        "spy_strategy": "",
        "civilian_strategy": "",
        "vote": "spy game. you are player {player} of {players}, not the spy. clues: {history}. "
                "the spy is \\boxed{{}} a player or n/a:",
        "observer": "spy game of {players}. clues: {history}. the spy is \\boxed{{}} a player or "
                    "n/a:",
        "first": "none",
        "round": "",
        "clue_line": "{player}: {clue}",
        "own_line": "{player}: {clue}",
        "no_clue": "none",
        "separator": "; ",
    },
}


@dataclass
class Turn:
    """One clue: who spoke, in which round, what it reasoned (private) and what it said."""
    player: int
    round: int
    reasoning: str
    clue: str | None              # None: unparsable (no \\boxed{} with text)


def history_text(turns, viewer, style):
    """The clues so far as `viewer` sees them: every player's clue, round by round; the viewer's
    own turns with its reasoning. viewer None: nobody's reasoning (the vote prompts)."""
    p = PROMPTS[style]
    lines, current = [], None
    for turn in turns:
        if turn.round != current and p["round"]:
            lines.append(p["round"].format(round=turn.round))
        current = turn.round
        clue = turn.clue if turn.clue is not None else p["no_clue"]
        if turn.player == viewer:
            lines.append(p["own_line"].format(player=turn.player, clue=clue,
                                              reasoning=turn.reasoning.strip()))
        else:
            lines.append(p["clue_line"].format(player=turn.player, clue=clue))
    if not lines:
        return p["first"]
    return p["separator"].join(lines)


def clue_prompt_text(game, player, round_number, turns, *, style, difference):
    """The user text of `player`'s clue turn in round `round_number`, after `turns`."""
    p = PROMPTS[style]
    spy = player == game.spy
    return p["clue"].format(player=player, round=round_number, players=game.players,
                            difference=difference, role=p["spy" if spy else "civilian"],
                            strategy=p["spy_strategy" if spy else "civilian_strategy"],
                            history=history_text(turns, player, style))


def vote_prompt_text(game, voter, turns, *, style, difference):
    """The user text of civilian `voter`'s vote (voter None: an observer, the released code's
    decision prompt, which sees the original image and every clue)."""
    return PROMPTS[style]["vote" if voter is not None else "observer"].format(
        player=voter, players=game.players, difference=difference,
        history=history_text(turns, None, style))


def parse_clue(text):
    """(reasoning, clue): the clue is the last `\\boxed{}`'s text, the reasoning what comes before
    it. No box, or an empty one: clue None (unparsable)."""
    clue = extract_boxed(text)
    where = text.rfind("\\boxed")
    reasoning = text[:where] if where >= 0 else text
    if clue is None or not clue.strip():
        return reasoning, None
    return reasoning, " ".join(clue.split())


_NA = re.compile(r"^\s*n\s*/?\s*a\s*\.?\s*$", re.IGNORECASE)
_SEAT = re.compile(r"^\s*(?:player\s*)?(\d+)\s*\.?\s*$", re.IGNORECASE)


def parse_vote(text, players):
    """A vote: a seat 1..players, NA, or None (invalid: no box, or a box that names no seat of
    this game and does not say n/a). "n/a" counts as NA only when the box says so."""
    boxed = extract_boxed(text)
    if boxed is None:
        return None
    if _NA.match(boxed):
        return NA
    m = _SEAT.match(boxed)
    if m and 1 <= int(m.group(1)) <= players:
        return int(m.group(1))
    return None


# ----------------------------------------------------------------------------
# Rewards


def vote_counts(votes, players):
    """v[k] for k = 1..players (index 0 unused): the votes player k received. votes: one list of
    sampled votes per voter; each voter casts ONE vote, split evenly over its samples (a sample
    naming k gives k 1/samples), so v sums to at most the number of voters, as the paper's one
    vote per civilian does. NA and invalid samples count for nobody."""
    v = [0.0] * (players + 1)
    for samples in votes:
        for vote in samples:
            if isinstance(vote, int):
                v[vote] += 1.0 / len(samples)
    return v


def clue_rewards(v, spy, *, beta, lam):
    """The paper's equation 1: {player: clue reward}; zero-sum over the players."""
    civilians = [k for k in range(1, len(v)) if k != spy]
    mean = sum(v[k] for k in civilians) / len(civilians)
    rewards = {spy: -beta * (v[spy] - mean)}
    for k in civilians:
        rewards[k] = beta / len(civilians) * (v[spy] - mean) - lam * (v[k] - mean)
    return rewards


def vote_tally(games, vote_owner, votes):
    """[votes, right, n/a, invalid] over `votes` (the samples of each vote prompt, whose (game,
    voter) is in `vote_owner`): how many name the game's spy, say n/a, or are invalid."""
    flat = [(v, games[i].spy) for (i, _), samples in zip(vote_owner, votes) for v in samples]
    return [len(flat), sum(v == spy for v, spy in flat), sum(v == NA for v, _ in flat),
            sum(v is None for v, _ in flat)]


def decision_reward(vote, spy, *, right=1.0, na=-0.5, wrong=-1.0):
    """The paper's equation 4: +1 the spy, -0.5 "n/a", -1 anyone else; an invalid vote (None)
    is "anyone else"."""
    if vote == spy:
        return right
    return na if vote == NA else wrong


class RoleBaselines:
    """Role-Advantage Estimation (equation 2): one EMA baseline per role, both starting at 0,
    updated with the role's mean clue reward of the step BEFORE it is subtracted."""

    def __init__(self, alpha):
        self.alpha = alpha
        self.spy = 0.0
        self.civilian = 0.0

    def update(self, spy_mean, civilian_mean):
        """spy_mean: the spies' mean clue reward this step; civilian_mean: the civilians'
        (each game's civilians averaged, then games averaged)."""
        self.spy = self.alpha * self.spy + (1 - self.alpha) * spy_mean
        self.civilian = self.alpha * self.civilian + (1 - self.alpha) * civilian_mean

    def advantage(self, reward, is_spy):
        return reward - (self.spy if is_spy else self.civilian)

    def state_dict(self):
        return {"alpha": self.alpha, "spy": self.spy, "civilian": self.civilian}

    def load_state_dict(self, state):
        self.alpha, self.spy, self.civilian = state["alpha"], state["spy"], state["civilian"]


DECISION, CLUE = "decision", "clue"


class PhaseSwitch:
    """Iterative-SPO's stage switch (equations 8-10), starting in the decision stage.

    After every update `observe(acc, na)`: the EMAs (both starting at 0) take the step's
    accuracy and n/a rate; the dwell counter d counts the updates in the current stage; then
    decision -> clue when d >= k_min and acc >= acc_up and na <= na_down; clue -> decision when
    d >= k_min and (1 - acc >= err_up or na >= na_up). patience > 0: a stage also ends after
    `patience` updates (Table 5's "rounds before forcing change"; the paper gives no rule).
    debias: the rules read the EMAs divided by 1 - rho^t after t updates (as Adam's moments), so
    the first updates' estimates are not pulled towards 0: with rho 0.95 the plain EMA of an
    accuracy of 1 is still 0.64 after 20 updates. schedule "alternate": the released code's rule
    instead, one update per stage in turn. `reason` says why the last update switched (None: it
    did not).
    """

    def __init__(self, *, rho=0.95, acc_up=0.9, na_down=0.1, err_up=0.4, na_up=0.5, k_min=5,
                 patience=20, schedule="iterative-spo", debias=False):
        self.rho, self.acc_up, self.na_down = rho, acc_up, na_down
        self.err_up, self.na_up, self.k_min, self.patience = err_up, na_up, k_min, patience
        self.schedule, self.debias = schedule, debias
        self.phase, self.dwell, self.acc, self.na, self.t = DECISION, 0, 0.0, 0.0, 0
        self.reason = None

    def estimates(self):
        """(accuracy, n/a rate) as the rules read them: the EMAs, bias-corrected with debias."""
        correction = 1 - self.rho ** self.t if self.debias else 1.0
        if correction <= 0:  # no update yet, or rho 1 (EMAs that never move)
            return self.acc, self.na
        return self.acc / correction, self.na / correction

    def observe(self, acc, na):
        """One update's statistics; returns the stage of the next update."""
        self.acc = self.rho * self.acc + (1 - self.rho) * acc
        self.na = self.rho * self.na + (1 - self.rho) * na
        self.t += 1
        self.dwell += 1
        acc, na = self.estimates()
        reason = None
        if self.schedule == "alternate":
            reason = "alternate"
        elif self.dwell >= self.k_min and self.phase == DECISION:
            if acc >= self.acc_up and na <= self.na_down:
                reason = f"accuracy {acc:.3f} >= {self.acc_up} and n/a {na:.3f} <= {self.na_down}"
        elif self.dwell >= self.k_min:
            if 1 - acc >= self.err_up:
                reason = f"error {1 - acc:.3f} >= {self.err_up}"
            elif na >= self.na_up:
                reason = f"n/a {na:.3f} >= {self.na_up}"
        if reason is None and self.patience and self.dwell >= self.patience:
            reason = f"patience ({self.patience} updates)"
        self.reason = reason
        if reason is not None:
            self.phase = CLUE if self.phase == DECISION else DECISION
            self.dwell = 0
        return self.phase

    def state_dict(self):
        return {"phase": self.phase, "dwell": self.dwell, "acc": self.acc, "na": self.na,
                "t": self.t}

    def load_state_dict(self, state):
        self.phase, self.dwell = state["phase"], state["dwell"]
        # t: absent from checkpoints made before debias existed, where it was never read
        self.acc, self.na, self.t = state["acc"], state["na"], state.get("t", 0)
