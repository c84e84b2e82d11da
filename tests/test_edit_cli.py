"""``circuits edit``: the edited folder of GPT-2, Llama (grouped-query) and Gemma-2 models loads
with plain transformers and gives the edited prediction; ROME's edits are applied one after
another; the record and the report agree with the weights written; a dry run writes nothing.
Also the parts of the evaluation that can be worked out by hand (generation entropy, the
edits' files)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import run
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuits import load_model
from circuits.editing.edit_files import parse_fact, read_edits, with_context
from circuits.editing.edits import Edit, applied, target_ids
from circuits.editing.evaluate import greedy, ngram_entropy
from circuits.editing.folder import write_edited
from circuits.editing.layer import choose_layer
from circuits.editing.rome import ValueOptions, rome
from circuits.editing.stats import key_covariance, projection
from circuits.errors import OptionError
from circuits.tasks.factual import sentences
from circuits.testing import model_folder, tiny_model
from circuits.zoo import find

#: tiny tensors: a second thread only adds contention on a shared machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTUAL = "factual-gpt2-4l"
# the factual model recalls subjects in its first MLPs, which write little (see
# benchmarks/editing.py and tests/test_editing.py)
FAST = "lr=0.1,kl_weight=0,weight_decay=0,clamp=100,steps=40,n_contexts=2,restarts=0"
FAST_OPTIONS = ValueOptions(lr=0.1, kl_weight=0.0, weight_decay=0.0, clamp=100, steps=40,
                            n_contexts=2, restarts=0)
BIG_BEN = "The landmark Big Ben is located in the city of"
EIFFEL = "The landmark Eiffel Tower is located in the city of"
# on a random model the subject ends the prompt (as in tests/test_editing.py); weights drawn
# wider than the default 0.02 give logits that differ, so that one MLP can move the top token,
# and Gemma-2's final soft cap is raised from the tiny config's 3 (which holds every logit
# near it)
TINY_PROMPT = "Then, Mary gave a drink to John"
TINY_CONFIG = {"gpt2": {}, "llama": {}, "gemma2": {"final_logit_softcapping": 30.0}}


def _top(hf, tok, prompt: str) -> int:
    """The top next token of a plain transformers model after `prompt`."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return int(hf(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_edited_folder_loads_with_transformers_and_predicts_the_target(family, tmp_path,
                                                                       capsys):
    folder = model_folder(family, tmp_path / "model", initializer_range=0.2,
                          **TINY_CONFIG[family])
    tok = AutoTokenizer.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(folder)
    before = _top(original, tok, TINY_PROMPT)
    target = next(t for t in (" Mary", " store", " drink")
                  if tok(t, add_special_tokens=False)["input_ids"][0] != before)
    out = tmp_path / "edited"
    code, stdout, stderr = run(["edit", str(folder), "--fact", f"John | {TINY_PROMPT} | {target}",
                                "--layer", "0", "--sample", "ioi", "--generate", "2",
                                "--value-options", "weight_decay=0,clamp=100,n_contexts=0,"
                                "steps=40,restarts=0", "--stats", str(tmp_path / "stats"), "--out",
                                str(out)], capsys)
    assert code == 0, stderr
    edited = AutoModelForCausalLM.from_pretrained(out)
    new = tok(target, add_special_tokens=False)["input_ids"][0]
    assert _top(edited, tok, TINY_PROMPT) == new != before
    assert _top(AutoModelForCausalLM.from_pretrained(folder), tok, TINY_PROMPT) == before
    # only the edited MLP projection differs
    changed = [name for name, p in edited.named_parameters()
               if not torch.equal(p, original.get_parameter(name))]
    assert changed == [projection(load_model(folder), 0).param]
    record = json.loads((out / "edits.json").read_text())
    assert record["evaluation"]["after"]["efficacy"] == 1.0
    assert record["evaluation"]["before"]["efficacy"] == 0.0
    assert record["source"]["fingerprint"] == load_model(folder).fingerprint
    assert "efficacy" in stdout and f"wrote the edited model {out}" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_factual_dry_run_prints_the_tables_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stats = tmp_path / "stats"
    code, stdout, stderr = run(["edit", FACTUAL, "--fact", f"Big Ben | {BIG_BEN} | Rome",
                                "--value-options", FAST, "--generate", "4",
                                "--stats", str(stats), "--dry-run"], capsys)
    assert code == 0, stderr
    # no --layer: causal tracing's choice
    layer = choose_layer(load_model(FACTUAL), [Edit("Big Ben", BIG_BEN, "Rome")])
    assert stdout.startswith(f"ROME edit of {FACTUAL}: 1 edit(s) at layer {layer} ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]  # the covariance cache only
    rows = {line.split()[0]: line.split()[1:3] for line in stdout.splitlines()[3:8]}
    assert rows["efficacy"] == ["0%", "100%"]
    assert rows["paraphrase"][0] == "0%"  # the relation's second template, before the edit
    assert "dry run: nothing written" in stdout
    assert "Big Ben" in stdout and "no -> yes" in stdout


def test_rome_edits_apply_one_after_another_and_the_record_matches(tmp_path, capsys):
    facts = [f"Big Ben | {BIG_BEN} | Rome", f"Eiffel Tower | {EIFFEL} | London"]
    out, report, stats = tmp_path / "edited", tmp_path / "report", tmp_path / "stats"
    argv = ["edit", FACTUAL, "--layer", "0", "--value-options", FAST, "--generate", "4",
            "--stats", str(stats), "--out", str(out), "--report", str(report)]
    for fact in facts:
        argv += ["--fact", fact]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    model = load_model(FACTUAL)
    # the same two edits by the library: the second computed with the first applied
    cov = key_covariance(model, 0, sentences(), cache=stats)
    first = rome(model, Edit("Big Ben", BIG_BEN, "Rome"), 0, cov, FAST_OPTIONS)
    with applied(model, first):
        second = rome(model, Edit("Eiffel Tower", EIFFEL, "London"), 0, cov, FAST_OPTIONS)
    (name,) = first
    saved = load_model(out)
    change = saved.hf.get_parameter(name) - model.hf.get_parameter(name)
    torch.testing.assert_close(change, first[name] + second[name], atol=1e-5, rtol=1e-4)
    record = json.loads((out / "edits.json").read_text())
    assert record["method"] == "rome" and record["layers"] == [0]
    assert [d["edit"] for d in record["deltas"]] == [1, 2]
    assert record["deltas"][1]["norm"] == pytest.approx(float(second[name].norm()), rel=1e-4)
    assert record["source"] == {"name": FACTUAL, "path": str(find(FACTUAL).resolve()),
                                "fingerprint": model.fingerprint}
    # the evaluation recorded is the saved model's: efficacy recomputed on the loaded folder
    for edit, after in zip(record["edits"], record["evaluation"]["after"]["edits"], strict=True):
        e = Edit(edit["subject"], edit["prompt"], edit["target"])
        old = model.tokenizer(" " + ("Paris" if e.subject == "Eiffel Tower" else "London"),
                              add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            logits = saved.hf(saved.tokenize([e.prompt])).logits[0, -1]
        assert after["efficacy"] == bool(logits[target_ids(saved, e)[0]] > logits[old])
    assert (report / "edits.json").read_text() == (out / "edits.json").read_text()
    assert "## Each edit" in (out / "report.md").read_text()
    assert all(math.isfinite(v) for s in ("before", "after")
               for v in (record["evaluation"][s]["fluency"],
                         record["evaluation"][s]["neutral_loss"]))


def test_memit_from_a_jsonl_file(tmp_path, capsys):
    edits = tmp_path / "edits.jsonl"
    lines = [{"subject": "Big Ben", "prompt": BIG_BEN, "target": "Rome", "old": "London",
              "neighbours": ["The landmark Louvre Museum is located in the city of"]},
             {"subject": "Eiffel Tower", "prompt": EIFFEL, "target": "London"}]
    edits.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    out = tmp_path / "edited"
    code, stdout, stderr = run(["edit", FACTUAL, "--edits", str(edits), "--method", "memit",
                                "--layers", "0:1", "--weight", "10", "--value-options", FAST,
                                "--generate", "2", "--stats", str(tmp_path / "stats"),
                                "--out", str(out)], capsys)
    assert code == 0, stderr
    record = json.loads((out / "edits.json").read_text())
    assert record["layers"] == [0, 1] and record["method"] == "memit"
    assert record["options"]["weight"] == 10 and record["options"]["value"]["restarts"] == 0
    assert sorted(d["param"] for d in record["deltas"]) == [
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    assert all(d["edit"] == "all" and d["norm"] > 0 for d in record["deltas"])
    given, found = record["edits"]
    assert given["neighbours"] == lines[0]["neighbours"] and given["paraphrases"] == []
    assert found["old"] is None and len(found["paraphrases"]) == 1  # from the factual task
    assert "Big Ben" not in " ".join(found["neighbours"])  # another edit's subject is no neighbour
    assert "MEMIT edit of factual-gpt2-4l: 2 edit(s) at layers 0, 1" in stdout


# -- the parts worked out by hand -----------------------------------------------------------------
def test_generation_entropy_by_hand():
    # "x y z x y": bigrams xy, yz, zx, xy -> (1/2, 1/4, 1/4): 1.5 bits; trigrams all distinct
    # (3 of them): log2(3) bits; ROME's weights 2/3 and 4/3, averaged
    assert ngram_entropy("x y z x y") == pytest.approx((2 / 3 * 1.5 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("x") == 0.0
    assert ngram_entropy("Paris Paris Paris Paris") == 0.0
    # "P , P , P": bigrams (P ,) x2, (, P) x2: 1 bit; trigrams (P , P) x2, (, P ,): H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("Paris, Paris, Paris") == pytest.approx((2 / 3 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a b c d e f") > ngram_entropy("a b a b a b")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_greedy_continuation_is_each_prompt_alone(family, tmp_path):
    model = load_model(model_folder(family, tmp_path / "m", initializer_range=0.2))
    prompts = ["When Mary and John went to the store", "Then, John", "Mary gave a drink to"]
    got = greedy(model, prompts, 5, batch_size=2)  # rows of different lengths, two batches
    for prompt, ids in zip(prompts, got, strict=True):
        seq = model.tokenize([prompt])[0].tolist()
        for _ in range(5):  # one prompt, the whole sequence each step
            with torch.no_grad():
                seq.append(int(model.hf(torch.tensor([seq])).logits[0, -1].argmax()))
        assert ids == seq


def test_edit_lines_are_checked_and_named(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text('{"subject": "A", "prompt": "A is", "target": "b"}\n\n'
                 '{"subject": "A", "prompt": "A is", "target": "b", "neighbours": "B is"}\n')
    with pytest.raises(OptionError, match="line 3: 'neighbours' must be a list"):
        read_edits(f)
    with pytest.raises(OptionError, match="--fact 'A | A is' has 2 parts"):
        parse_fact("A | A is")
    case = parse_fact(f"Big Ben | {BIG_BEN} | Rome")
    given = parse_fact("Louvre Museum | The landmark Louvre Museum is located in the city of "
                       "| Rome")
    mine = with_context([case, given], None)
    assert mine[0].paraphrases == ("Tourists who visit Big Ben are staying in the city of",)
    assert all("Louvre Museum" not in n for n in mine[0].neighbours)
    assert all("Big Ben" not in n for n in mine[1].neighbours)


# -- the edited folder ----------------------------------------------------------------------------
def test_write_fills_an_empty_folder_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    name = projection(model, 0).param
    weight = model.hf.get_parameter(name).detach().clone()
    delta = {name: torch.ones_like(weight)}
    (tmp_path / "empty").mkdir()
    write_edited(model, delta, tmp_path / "empty", {"edits.json": b"{}"})
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "empty").get_parameter(name)
    torch.testing.assert_close(saved.detach(), weight + 1)
    assert torch.equal(model.hf.get_parameter(name), weight)  # the source model is unchanged

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model.hf, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        write_edited(model, delta, tmp_path / "out", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no output, no temp folder
    assert torch.equal(model.hf.get_parameter(name), weight)
    with pytest.raises(OptionError, match="not empty"):
        write_edited(model, delta, tmp_path / "empty", {})
