"""Scoring, baseline selection and evaluation text are disjoint (issue: the scores were taken on text the tables
reported on). Proven on the documents and on the token chunks each stage actually uses."""

import hashlib

from conftest import tiny_model, tiny_tokenizer

from common.data import bld_documents, spread_chunks
from common.evaluate import TextEval
from common.text_corpus import all_documents, distill_documents, split_of_documents


def windows(ids, n=24):
    rows = ids.tolist()
    return {tuple(r[i:i + n]) for r in rows for i in range(0, len(r) - n + 1)}


def test_text_splits_are_disjoint_documents_covering_the_mix():
    splits = {s: distill_documents(s) for s in ("train", "heldout", "score", "select")}
    assert sum(map(len, splits.values())) == len(all_documents())
    seen = {}
    for s, docs in splits.items():
        for d in docs:
            assert d not in seen, f"a document is in both {seen.get(d)} and {s}"
            seen[d] = s
    assert len(splits["score"]) >= 8 and len(splits["select"]) >= 4  # enough documents to spread chunks over
    names = sorted(all_documents(), key=lambda k: hashlib.sha1(k.encode()).hexdigest())  # by name hash: fixed
    where = split_of_documents()
    assert {where[k] for k in names[:len(splits["heldout"])]} == {"heldout"}
    assert len(splits["heldout"]) == round(0.15 * len(names))


def test_scoring_selection_and_evaluation_chunks_share_no_text():
    tok = tiny_tokenizer()
    tev = TextEval(tiny_model(), tok, seq_len=64, num_seqs=16)  # the evaluation suite's chunks
    score = spread_chunks(tok, bld_documents(None, "score"), 64, 8)  # 01's scoring chunks
    select = spread_chunks(tok, distill_documents("select"), 64, 8)  # 02's ShortGPT selection chunks
    ev, sc, se = windows(tev.ids), windows(score), windows(select)
    assert ev and sc and se
    assert not (ev & sc) and not (ev & se) and not (sc & se)
    # the scoring chunks come from 8 different documents, not one
    firsts = {tuple(tok(d, add_special_tokens=False)["input_ids"][:64]) for d in distill_documents("score")}
    assert sum(tuple(r) in firsts for r in score.tolist()) == 8
