"""Head annotations of a discovered circuit: what is stored per head (a label only where the
evidence is strong), and a warning (not a failure) where the readers do not apply."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

import circuits
from circuits.annotate import annotate_heads, circuit_heads, example_prompt
from circuits.circuit import circuit_from_edges
from circuits.errors import UnsupportedModelError
from circuits.graph import Graph
from circuits.reading.roles import Label


@dataclass(frozen=True)
class Roles:
    scores: dict

    def labels(self):
        """The strongest role, unlabelled below 0.3 (the fake's own threshold)."""
        out = {}
        for layer in range(2):
            for head in range(4):
                role, score = max(((r, float(s[layer, head])) for r, s in self.scores.items()),
                                  key=lambda x: x[1])
                out[f"a{layer}.h{head}"] = Label(role if score >= 0.3 else "", score)
        return out


@pytest.fixture
def readers(monkeypatch):
    """Role and attribution readers with known outputs: role 'b' scores 0.1 * head + layer / 4,
    role 'a' 0.5 except 0.2 at a0.h0; the attribution of a{l}.h{h} is 10 l + h on the clean
    prompts and l + h on the corrupted ones."""
    scores = {"a": torch.full((2, 4), 0.5).index_put_((torch.tensor(0), torch.tensor(0)),
                                                        torch.tensor(0.2)),
              "b": torch.arange(2)[:, None] / 4 + torch.arange(4)[None, :] * 0.1}
    layer, head = torch.arange(2)[:, None].float(), torch.arange(4)[None, :].float()

    def attribution(model, task, contrast=False):
        assert contrast
        clean, corrupt = 10 * layer + head, layer + head
        return types.SimpleNamespace(heads=clean - corrupt,
                                     clean=types.SimpleNamespace(heads=clean))

    monkeypatch.setattr("circuits.annotate.head_roles",
                        lambda model, task=None, **kw: Roles(scores))
    monkeypatch.setattr("circuits.annotate.direct_logit_attribution", attribution)


@pytest.fixture(scope="module")
def model_and_task():
    model = circuits.load_model("induction-gpt2-2l")
    return model, circuits.get_task("induction", model.tokenizer, n=4)


def test_heads_get_role_scores_attribution_and_attention(readers, model_and_task):
    from circuits.reading.attention import attention_patterns

    model, task = model_and_task
    g = Graph(2, 4)
    c = circuit_from_edges(g, ["input->a0.h1<q>", "a0.h1->a1.h3<k>", "a1.h3->logits",
                               "input->a0.h0<v>", "a0.h0->logits"])
    assert circuit_heads(c) == [(0, 0), (0, 1), (1, 3)]
    assert annotate_heads(c, model, task) == []
    a13 = c.node_info["a1.h3"]
    # b = 0.25 + 0.3 = 0.55 beats a = 0.5 for a1.h3; a = 0.5 beats b = 0.1 for a0.h1
    assert (a13["role"], a13["role_score"], a13["roles"]) == ("b", 0.55, {"a": 0.5, "b": 0.55})
    assert c.node_info["a0.h1"]["role"] == "a"
    assert (a13["dla"], a13["dla_contrast"]) == (13.0, 9.0)
    # a0.h0's best, a = 0.2, is below the label threshold: no role and no role score, so the
    # diagrams show none
    assert c.node_info["a0.h0"]["role"] == "" and "role_score" not in c.node_info["a0.h0"]
    tokens, pattern = a13["attention"]["tokens"], torch.tensor(a13["attention"]["pattern"])
    ids, shown = example_prompt(model, task)
    # the task's shortest prompt, its tokens as text
    assert ids.shape[1] == min(len(model.tokenizer(e.clean).input_ids) for e in task.examples)
    assert tokens == shown == [model.tokenizer.decode([t]) for t in ids[0].tolist()]
    want = attention_patterns(model, ids, [(1, 3)])[0, 0]
    assert pattern.shape == (len(tokens), len(tokens))
    assert torch.allclose(pattern, want, atol=6e-4)  # rounded to 3 decimals
    assert set(c.node_info) == {"a0.h0", "a0.h1", "a1.h3"}  # MLPs, input, logits get nothing


def test_readers_that_do_not_apply_give_a_warning(readers, model_and_task, monkeypatch):
    model, task = model_and_task

    def refuse(*args, **kwargs):
        raise UnsupportedModelError("no adapter for this family")

    monkeypatch.setattr("circuits.annotate.head_roles", refuse)
    c = circuit_from_edges(Graph(2, 4), ["input->a0.h1<q>", "a0.h1->logits"])
    warnings = annotate_heads(c, model, task)
    assert warnings == ["head roles skipped: the readers do not apply to 'induction-gpt2-2l' "
                        "(no adapter for this family)"]
    assert c.node_info == {}
    # a circuit without heads reads nothing
    assert annotate_heads(circuit_from_edges(Graph(2, 4), ["input->m0", "m0->logits"]),
                          model, task) == []


def test_heads_that_write_the_ioi_answer_get_no_weak_label():
    """On the IOI reference model a3.h2 and a3.h3 write most of the answer directly but score
    about 0.1 in every attention role; they used to be labelled 'first-token 0.10'."""
    from circuits.render import role_text

    model = circuits.load_model("ioi-gpt2-4l")
    task = circuits.get_task("ioi", model.tokenizer, n=8)
    c = circuit_from_edges(Graph(4, 4), ["input->a3.h2<v>", "a3.h2->logits",
                                         "input->a3.h3<v>", "a3.h3->logits"])
    assert annotate_heads(c, model, task) == []
    for name in ("a3.h2", "a3.h3"):
        info = c.node_info[name]
        assert info["role"] == "" and "role_score" not in info
        assert info["dla_contrast"] > 1.0 and max(info["roles"].values()) < 0.4
        assert role_text(c, name) == ""
