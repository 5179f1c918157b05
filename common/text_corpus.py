"""The distillation text mix, from English prose that ships with every Python 3.11 (no downloads).

    train = distill_documents("train")      # BLD (01), global KD (04), FFN Fusion's dependency map (03)
    held = distill_documents("heldout")     # the evaluation suite: LM loss, KL and top-1 agreement vs the parent
    score = distill_documents("score")      # 01's replace-one-block scores (what the search optimizes)
    select = distill_documents("select")    # choices baselines make from text (02's ShortGPT layer ranking)

Documents: each `pydoc_data.topics` entry (the language reference, ~465k characters) and, for a fixed list of
pure-Python standard library modules, the module's docstrings (module, classes, functions) read from source
with `ast` (nothing is imported, so the set does not depend on the platform). The split is by document, ranked
by the hash of its name: the lowest 15 % are the evaluation text ("heldout"), the next 10 % the scoring text, the
next 5 % the selection text, the rest training text. So it is the same on every machine, never mixes a document,
and what the search optimizes (scores), what a baseline picks its layers on and what the tables report are three
disjoint sets of documents (tests/test_data.py proves it on the tokens).
"""

import ast
import functools
import hashlib
import os
import sysconfig

SPLITS = (("heldout", 0.15), ("score", 0.10), ("select", 0.05))  # by hash rank, in this order; the rest: "train"
MODULES = """abc argparse ast base64 bdb bisect calendar cmd code codecs colorsys configparser contextlib copy csv
dataclasses datetime difflib dis doctest enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext
glob gzip heapq hmac imaplib inspect ipaddress keyword linecache locale mailbox mimetypes numbers operator optparse
pathlib pdb pickle pickletools platform plistlib pprint profile pstats queue quopri random reprlib sched secrets
selectors shelve shlex shutil smtplib socket socketserver statistics string struct subprocess tarfile tempfile
textwrap threading timeit tokenize trace traceback tracemalloc types typing uuid warnings wave weakref zipfile
_pydecimal _pyio""".split()


def _module_docs(name: str) -> str | None:
    path = os.path.join(sysconfig.get_paths()["stdlib"], f"{name}.py")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d for d in docs if d and len(d) > 40) or None


def all_documents() -> dict[str, str]:
    """name -> text for every document in the mix (pydoc topics first, then module docstrings)."""
    return dict(_documents())


@functools.lru_cache(maxsize=1)
def _documents() -> dict[str, str]:
    from pydoc_data.topics import topics
    docs = {f"topic:{k}": v.strip() for k, v in sorted(topics.items())}
    for m in MODULES:
        text = _module_docs(m)
        if text:
            docs[f"module:{m}"] = text
    first = {}  # a text under two names (the "if" and "else" topics) is one document, under its first name
    return {k: v for k, v in docs.items() if first.setdefault(v, k) == k}


def split_of_documents() -> dict[str, str]:
    """document name -> its split ("heldout", "score", "select" or "train")."""
    docs = all_documents()
    by_hash = sorted(docs, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    out, start = {}, 0
    for name, frac in SPLITS:
        end = start + round(frac * len(docs))
        out.update({k: name for k in by_hash[start:end]})
        start = end
    return {k: out.get(k, "train") for k in docs}


def distill_documents(split: str = "train") -> list[str]:
    """Documents of one split ("train", "heldout", "score" or "select"; pairwise disjoint), in a fixed order."""
    names = ("train",) + tuple(n for n, _ in SPLITS)
    if split not in names:
        raise ValueError(f"distill_documents: split must be one of {', '.join(names)}; got {split!r}")
    where = split_of_documents()
    return [text for k, text in all_documents().items() if where[k] == split]
