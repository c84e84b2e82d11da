"""Head roles on heads built by hand to have exactly one role (or none), on the planted and toy
models, on other families, and the ``heads`` and ``attention`` commands.

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


def test_a_head_with_no_role_scores_near_0_on_every_role(hand_built):
    none = HEADS.index("none")
    for role, scores in hand_built.scores.items():
        assert scores[0, none] < 0.02, role
    assert hand_built.best()[f"a0.h{none}"][0] == "none"
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
    assert len(lines) == 2 + len(HEADS) and lines[0].split()[-1] == "best"
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
    code = cli.main(["heads", str(folder), "--task", "ioi", "--n", "4", "--length", "6",
                     "--out", str(out)])
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
    code = cli.main(["attention", str(folder), "--heads", "a1.h2", "a0.h0", "--task", "ioi",
                     "--n", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    wide = matplotlib.image.imread(out)  # 4 panels in one row
    code = cli.main(["attention", str(folder), "--heads", "a1.h2", "--prompt",
                     "When Mary and John went to the store", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    single = matplotlib.image.imread(out)
    assert wide.shape[1] > 2 * single.shape[1]


def test_commands_on_a_shipped_model(tmp_path, capsys):
    code = cli.main(["heads", "planted-induction", "--n", "4", "--out", str(tmp_path / "h")])
    text = capsys.readouterr().out
    assert code == 0
    row = next(line for line in text.splitlines() if line.startswith("a1.h0"))
    assert row.endswith("induction 1.00")
    assert cli.main(["attention", "planted-induction", "--heads", "a1.h0", "--prompt",
                     "<|endoftext|> ash bay cod ash", "-o", str(tmp_path / "a.png")]) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["attention", "planted-ioi", "--heads", "a3.h0", "--prompt", "Mary"], "a3.h0 does not"),
    (["attention", "planted-ioi", "--heads", "head1", "--prompt", "Mary"], "not a head name"),
    (["attention", "planted-ioi", "--heads", "a0.h0", "--prompt", " ".join(["Mary"] * 12)],
     "more than"),
    (["attention", "planted-ioi", "--heads", "a0.h0", "--prompt", "  "], "empty"),
    (["attention", "planted-ioi", "--heads", "a0.h0", "--task", "nope"], "unknown task"),
    (["heads", "planted-ioi", "--length", "1"], "--length"),
    (["heads", "planted-ioi", "--n", "0"], "--n"),
    (["heads", "./no-such-model-folder"], "no model folder"),
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
    assert cli.main(["heads", "planted-ioi", "--out", str(tmp_path / "file")]) == 2
    assert cli.main(["attention", "planted-ioi", "--heads", "a0.h0", "--prompt", "Mary",
                     "-o", str(tmp_path / "a.svg")]) == 2
    assert "PNG" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"


def test_copying_in_chunks_of_heads_is_the_same(monkeypatch):
    from circuits.reading import roles

    model = one_layer_roles()
    whole = head_roles(model, n=2, length=3).scores["copying"]
    assert whole[0, HEADS.index("copying")] == 1.0 and whole.sum() == 1.0
    monkeypatch.setattr(roles, "LOGITS_BUDGET", 1)  # one head at a time
    assert torch.equal(head_roles(model, n=2, length=3).scores["copying"], whole)
