"""Head roles on heads built by hand to have exactly one role (or none), on the planted and toy
models, on other families; the labels a head gets (only where the evidence is strong, checked on
hand-made scores and on the shipped models); and the ``heads`` and ``attention`` commands.

`one_layer_roles` sets every weight of a one-layer GPT-2 so that its residual is a one-hot token
block and a one-hot position block, which its first LayerNorm leaves exactly as they are (the
gain and bias undo the centring and scaling, the same for every such vector). Query and key
weights then give each head a sharp attention score (``SHARP`` after GPT-2's ``1/sqrt(d_head)``
scaling) on exactly the pairs its role names, so its pattern is that role's by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from circuits import cli, get_task
from circuits.errors import OptionError
from circuits.model import load_model
from circuits.reading.roles import (
    DLA_SHARE,
    LABEL_MIN,
    MIXED_GAP,
    ROLES,
    HeadRoles,
    head_roles,
    plot_roles,
    repeated_sequences,
    usable_tokens,
)
from circuits.testing import model_folder, tiny_gpt2, tiny_model
from circuits.toys import induction_model

V, P = 12, 16  # tokens (0 is BOS) and positions of the hand-built model
DH = V + P  # each head's query/key space: a token block and a position block
HEADS = ("previous-token", "first-token", "duplicate-token", "copying", "none")
SHARP = 40.0


def one_layer_roles():
    """A one-layer GPT-2 whose heads are, in order, a previous-token head, a first-token head,
    a duplicate-token head, a copying head (attends to itself, writes its token to the
    unembedding) and a head with no role (attends to itself, writes nothing)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuits.model import Model

    H = len(HEADS)
    d = H * DH
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=d, n_layer=1, n_head=H,
                     layer_norm_epsilon=1e-12, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    s = SHARP * math.sqrt(DH)
    tok = list(range(V))  # residual dimensions of the token one-hots
    pos = [V + p for p in range(P)]  # and of the position one-hots

    def q(h: int, j: int) -> int:
        return h * DH + j

    def k(h: int, j: int) -> int:
        return d + h * DH + j

    with torch.no_grad():
        for param in hf.parameters():
            param.zero_()
        t = hf.transformer
        t.wte.weight[:, :V] = torch.eye(V)  # tied to the unembedding
        t.wpe.weight[:, V:V + P] = torch.eye(P)
        # every embedded vector has two ones among d entries: the same mean and spread, so
        # gain = spread and bias = mean make ln_1 the identity on them
        mean = 2 / d
        t.h[0].ln_1.weight.fill_(math.sqrt(2 / d - mean**2 + 1e-12))
        t.h[0].ln_1.bias.fill_(mean)
        t.ln_f.weight.fill_(1.0)
        w = t.h[0].attn.c_attn.weight  # [d, 3d]: q | k | v, head by head
        for p in range(1, P):  # previous-token: query position p matches key position p - 1
            w[pos[p], q(0, p)] = s
            w[pos[p - 1], k(0, p)] = 1.0
        for p in range(P):  # first-token: every query matches key position 0
            w[pos[p], q(1, 0)] = s
        w[pos[0], k(1, 0)] = 1.0
        for i in range(V):  # duplicate-token: same token, but not the same position
            w[tok[i], q(2, i)] = s
            w[tok[i], k(2, i)] = 1.0
        for p in range(P):
            w[pos[p], q(2, V + p)] = -s / 2
            w[pos[p], k(2, V + p)] = 1.0
        for h in (3, 4):  # copying and no role: attend to the own position
            for p in range(P):
                w[pos[p], q(h, p)] = s
                w[pos[p], k(h, p)] = 1.0
        for i in range(V):  # copying: value = token, output = that token's embedding
            w[tok[i], 2 * d + 3 * DH + i] = 1.0
            t.h[0].attn.c_proj.weight[3 * DH + i, tok[i]] = 1.0
    return Model(hf=hf, tokenizer=None, name="hand-built-roles")


@pytest.fixture(scope="module")
def hand_built() -> HeadRoles:
    return head_roles(one_layer_roles(), n=8, length=7)


@pytest.mark.parametrize("head", range(len(HEADS) - 1))
def test_a_head_built_for_a_role_scores_near_1_on_it(hand_built, head):
    assert hand_built.scores[HEADS[head]][0, head] > 0.97
    assert hand_built.best()[f"a0.h{head}"][0] == HEADS[head]
    assert hand_built.labels()[f"a0.h{head}"].role == HEADS[head]


def test_a_head_with_no_role_scores_near_0_on_every_role(hand_built):
    none = HEADS.index("none")
    for role, scores in hand_built.scores.items():
        assert scores[0, none] < 0.02, role
    assert hand_built.best()[f"a0.h{none}"][0] == "none"
    assert hand_built.labels()[f"a0.h{none}"].role == ""
    # and a role head scores low on the roles it was not built for (the previous-token head
    # reaches position 0 from position 1 only: 1 of 14 queries)
    assert hand_built.scores["first-token"][0, 0] < 1 / 14 + 0.01
    assert hand_built.scores["induction"][0, :].max() < 0.02


def test_induction_toy():
    roles = head_roles(induction_model(), n=8)
    induction = roles.scores["induction"]
    assert induction[1, 0] > 0.97  # the induction head
    assert induction[0, 1] < 0.02 and induction[1, 1] < 0.02  # self-attending distractors
    assert roles.scores["previous-token"][0, 0] > 0.97
    assert roles.scores["copying"][1, 0] > 0.97  # its value copies the token to the logits
    assert roles.scores["copying"][0, 0] < 0.02  # writes where the unembedding does not read


def test_planted_induction_head_scores_highest_on_induction():
    roles = head_roles(load_model("planted-induction"), n=8)
    induction = roles.scores["induction"]
    assert divmod(int(induction.argmax()), induction.shape[1]) == (1, 0)
    assert induction[1, 0] > 0.9
    assert roles.best()["a1.h0"][0] == "induction"
    assert roles.best()["a0.h0"][0] == "previous-token"


def test_planted_name_mover():
    model = load_model("planted-ioi")
    task = get_task("planted-ioi", model.tokenizer, n=16)
    mover = head_roles(model, task, n=16).scores["name-mover"]
    assert mover[2, 0] > 0.97
    # a1.h1 attends to the first name, the answer in half the prompts, but writes where the
    # unembedding does not read, so it promotes nothing; every other head looks elsewhere
    others = mover.clone()
    others[2, 0] = 0
    assert others.max() < 0.02


def test_roles_present_and_absent():
    no_task = head_roles(tiny_gpt2(n_layer=2, n_head=2), n=2, length=4)
    assert list(no_task.scores) == [r for r in ROLES if r != "name-mover"]
    no_adapter = head_roles(tiny_model("phi"), n=2, length=4)  # 2 layers, 4 heads
    assert list(no_adapter.scores) == list(ROLES[:4])
    for roles, shape in ((no_task, (2, 2)), (no_adapter, (2, 4))):
        for scores in roles.scores.values():
            assert scores.shape == shape and bool(((scores >= 0) & (scores <= 1)).all())


@pytest.mark.parametrize("family", ["llama", "gemma2", "neox"])
def test_other_families(family):
    roles = head_roles(tiny_model(family, initializer_range=0.2), n=3, length=5)
    assert set(roles.scores) == set(ROLES) - {"name-mover"}
    for scores in roles.scores.values():
        assert scores.shape == (2, 4) and bool(((scores >= 0) & (scores <= 1)).all())


def test_repeated_sequences():
    model = tiny_gpt2(vocab_size=40, n_positions=11)
    ids, start, half = repeated_sequences(model, n=3, length=20, seed=1)
    assert (start, half) == (1, 5) and ids.shape == (3, 11)  # shortened to fit 11 positions
    assert bool((ids[:, 0] == 0).all()) and bool((ids[:, 1:6] == ids[:, 6:]).all())
    assert all(len(set(row[1:6].tolist())) == 5 for row in ids)  # distinct within a half
    assert 0 not in ids[:, 1:]  # no special token inside
    again, _, _ = repeated_sequences(model, n=3, length=20, seed=1)
    assert torch.equal(ids, again)
    assert 0 not in usable_tokens(load_model("planted-ioi")).tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n=0), "n must be"), (dict(length=1), "length must be"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(OptionError, match=message):
        head_roles(tiny_gpt2(), **kwargs)
    with pytest.raises(OptionError, match="too few"):
        head_roles(tiny_gpt2(n_positions=4))


def test_head_roles_value(hand_built, tmp_path):
    record = json.loads(json.dumps(hand_built.to_dict()))
    assert record["n_layers"] == 1 and record["n_heads"] == len(HEADS)
    assert record["best"]["a0.h2"]["role"] == "duplicate-token"
    assert len(record["scores"]["copying"][0]) == len(HEADS)
    lines = hand_built.table().splitlines()
    assert len(lines) == 2 + len(HEADS) and lines[0].split()[-1] == "label"
    assert lines[2].split()[-2:][0] == "previous-token"
    out = plot_roles(hand_built, tmp_path / "heads.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the commands ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "neox"])
def folder(request, tmp_path_factory) -> Path:
    """A random-weight model folder of a non-GPT-2 family with the IOI model's tokenizer."""
    return model_folder(request.param, tmp_path_factory.mktemp(request.param),
                        initializer_range=0.2)


def test_heads_command_on_other_families(folder, tmp_path, capsys):
    out = tmp_path / "heads"
    code = cli.main(["heads", "--model", str(folder), "--task", "ioi", "--n", "4", "--length",
                     "6", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    record = json.loads((out / "heads.json").read_text())
    assert record["roles"] == list(ROLES)
    for scores in record["scores"].values():
        assert len(scores) == 2 and all(len(row) == 4 for row in scores)
    assert len(record["best"]) == 8
    assert (out / "heads.png").read_bytes()[:4] == b"\x89PNG"
    assert "a1.h3" in text and "name-mover" in text
    assert sorted(p.name for p in out.iterdir()) == ["heads.json", "heads.png"]


def test_attention_command_on_other_families(folder, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "a.png"
    code = cli.main(["attention", "--model", str(folder), "--heads", "a1.h2,a0.h0", "--task",
                     "ioi", "--n", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    wide = matplotlib.image.imread(out)  # 4 panels in one row
    code = cli.main(["attention", "--model", str(folder), "--heads", "a1.h2", "--prompt",
                     "When Mary and John went to the store", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    single = matplotlib.image.imread(out)
    assert wide.shape[1] > 2 * single.shape[1]


def test_commands_on_a_shipped_model(tmp_path, capsys):
    code = cli.main(["heads", "--model", "planted-induction", "--n", "4", "-o",
                     str(tmp_path / "h")])
    text, err = capsys.readouterr()
    assert code == 0 and err == ""
    row = next(line for line in text.splitlines() if line.startswith("a1.h0"))
    assert row.endswith("induction 1.00")
    assert cli.main(["attention", "--model", "planted-induction", "--heads", "a1.h0",
                     "--prompt", "<|endoftext|> ash bay cod ash", "-o",
                     str(tmp_path / "a.png")]) == 0


def test_the_positional_model_still_works_with_one_warning(tmp_path, capsys):
    out = tmp_path / "h"
    assert cli.main(["heads", "planted-induction", "--n", "2", "--length", "3", "--out",
                     str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["circuits: warning: `circuits heads MODEL`: the positional MODEL is "
                   "deprecated; use --model MODEL"]
    assert (out / "heads.json").is_file()
    assert cli.main(["attention", "planted-induction", "--heads", "a1.h0", "--prompt", "ash",
                     "-o", str(tmp_path / "a.png")]) == 0
    assert "positional MODEL is deprecated" in capsys.readouterr().err


ATTENTION = ["attention", "--model", "planted-ioi"]


@pytest.mark.parametrize(("argv", "message"), [
    ([*ATTENTION, "--heads", "a3.h0", "--prompt", "Mary"], "a3.h0 does not"),
    ([*ATTENTION, "--heads", "head1", "--prompt", "Mary"], "not a head name"),
    ([*ATTENTION, "--heads", "a0.h0,a9", "--prompt", "Mary"], "'a9' is not a head name"),
    ([*ATTENTION, "--heads", "a0.h0", "--prompt", " ".join(["Mary"] * 12)], "more than"),
    ([*ATTENTION, "--heads", "a0.h0", "--prompt", "  "], "empty"),
    ([*ATTENTION, "--heads", "a0.h0", "--prompt", "Mary \udcff"], "not valid UTF-8"),
    ([*ATTENTION, "--heads", "a0.h0", "--task", "nope"], "unknown task"),
    (["attention", "--heads", "a0.h0", "--prompt", "Mary"], "needs a model"),
    (["heads", "--model", "planted-ioi", "--length", "1"], "--length"),
    (["heads", "--model", "planted-ioi", "--n", "0"], "--n"),
    (["heads", "--model", "./no-such-model-folder"], "no model folder"),
    (["heads", "planted-ioi", "--model", "planted-induction"], "two models"),
])
def test_command_errors_are_one_line(argv, message, tmp_path, capsys):
    extra = ["-o", str(tmp_path / "a.png")] if argv[0] == "attention" else [
        "--out", str(tmp_path / "h")]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "h").exists()


def test_outputs_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    assert cli.main(["heads", "--model", "planted-ioi", "--out", str(tmp_path / "file")]) == 2
    assert cli.main([*ATTENTION, "--heads", "a0.h0", "--prompt", "Mary", "-o",
                     str(tmp_path / "a.svg")]) == 2
    assert "PNG" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"


def test_copying_in_chunks_of_heads_is_the_same(monkeypatch):
    from circuits.reading import roles

    model = one_layer_roles()
    whole = head_roles(model, n=2, length=3).scores["copying"]
    assert whole[0, HEADS.index("copying")] == 1.0 and whole.sum() == 1.0
    monkeypatch.setattr(roles, "LOGITS_BUDGET", 1)  # one head at a time
    assert torch.equal(head_roles(model, n=2, length=3).scores["copying"], whole)


# -- labels ------------------------------------------------------------------------------------
def scored(dla=None, dla_total=None, **scores: float) -> HeadRoles:
    """One head (a0.h0) with the given role scores (role names with _ for -)."""
    return HeadRoles({r.replace("_", "-"): torch.tensor([[v]]) for r, v in scores.items()},
                     dla=None if dla is None else torch.tensor([[dla]]), dla_total=dla_total)


def label(roles: HeadRoles) -> tuple[str, tuple[str, ...]]:
    found = roles.labels()["a0.h0"]
    return found.role, found.mixed


@pytest.mark.parametrize(("roles", "want"), [
    # below the threshold however it compares with the other roles: unlabelled
    (scored(first_token=LABEL_MIN - 0.01, previous_token=0.02), ("", ())),
    (scored(first_token=LABEL_MIN), ("first-token", ())),
    # two attention roles within MIXED_GAP: mixed, strongest first
    (scored(previous_token=0.6, first_token=0.6 - MIXED_GAP + 0.01),
     ("mixed", ("previous-token", "first-token"))),
    (scored(previous_token=0.6, first_token=0.6 - MIXED_GAP - 0.01), ("previous-token", ())),
    # copying labels a head only when no attention role does
    (scored(induction=0.5, copying=1.0), ("induction", ())),
    (scored(induction=0.3, copying=0.9), ("copying", ())),
    # name-mover needs the head to raise the answer in contrastive DLA, by DLA_SHARE of the
    # metric's difference; without DLA (or short of it) a weaker qualifying role names it
    (scored(name_mover=0.9, copying=0.9), ("copying", ())),
    (scored(name_mover=0.9, dla=2.0 * DLA_SHARE - 0.01, dla_total=2.0), ("", ())),
    (scored(name_mover=0.9, dla=-1.0, dla_total=-2.0), ("", ())),
    (scored(name_mover=0.9, dla=2.0 * DLA_SHARE, dla_total=2.0), ("name-mover", ())),
    (scored(name_mover=0.9, first_token=0.5, dla=0.01, dla_total=2.0), ("first-token", ())),
])
def test_label_rule_on_hand_made_scores(roles, want):
    assert label(roles) == want


def test_label_text_and_json():
    roles = scored(previous_token=0.6, first_token=0.55)
    assert str(roles.labels()["a0.h0"]) == "mixed (previous-token, first-token) 0.60"
    assert roles.to_dict()["labels"]["a0.h0"] == {
        "role": "mixed", "score": 0.6, "mixed": ["previous-token", "first-token"]}
    assert str(scored(induction=0.1).labels()["a0.h0"]) == "-"


@pytest.fixture(scope="module")
def ioi_roles() -> HeadRoles:
    model = load_model("ioi-gpt2-4l")
    return head_roles(model, get_task("ioi", model.tokenizer, n=16), n=16)


def test_ioi_heads_that_write_the_answer_are_not_labelled_by_weak_roles(ioi_roles):
    """a3.h2 and a3.h3 carry most of the IOI metric directly (contrastive DLA +4 and +7 of
    about 12) while every attention role of theirs is at chance (~0.1): they were labelled
    'first-token 0.10'; now they have no label."""
    labels = ioi_roles.labels()
    for name, (layer, head) in (("a3.h2", (3, 2)), ("a3.h3", (3, 3))):
        assert float(ioi_roles.dla[layer, head]) > 0.25 * ioi_roles.dla_total
        assert max(float(s[layer, head]) for s in ioi_roles.scores.values()) < LABEL_MIN
        assert labels[name].role != "first-token" and labels[name].role == ""


def test_induction_layer_0_heads_are_not_name_movers():
    """The induction model's layer-0 heads read fixed positions, which hold the answer in some
    prompts and a wrong word in the others; they were labelled name-mover."""
    model = load_model("induction-gpt2-2l")
    roles = head_roles(model, get_task("induction", model.tokenizer, n=16), n=16)
    labels = roles.labels()
    assert all(labels[f"a0.h{h}"].role != "name-mover" for h in range(4))


def test_role_scoring_shows_progress_and_bounds_the_copying_sample(monkeypatch):
    """10 sequences in chunks of 8 are 2 forwards; copying adds one step per layer (2); and
    however large n, copying reads at most COPY_TOKENS_MAX tokens."""
    from test_tuned_lens import record_progress

    from circuits.reading import roles as module

    bars = record_progress(monkeypatch)
    seen = []
    real = module.sample_tokens
    monkeypatch.setattr(module, "sample_tokens", lambda m, n, s: seen.append(n) or real(m, n, s))
    monkeypatch.setattr(module, "COPY_TOKENS_MAX", 7)
    head_roles(tiny_gpt2(vocab_size=40), n=10, length=3)
    assert [(b.desc, b.total, b.done) for b in bars] == [("head roles", 4, 4)]
    assert seen == [7]


@pytest.mark.parametrize("command", ["heads", "attention"])
def test_help_names_the_model_with_model(command, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser([command]).parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "--model MODEL" in text and f"circuits {command} --model " in text
    assert "positional" not in text  # the deprecated form is not advertised
