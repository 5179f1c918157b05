"""The distillation text mix, from English prose that ships with every Python 3.11 (no downloads).

    train = distill_documents("train")      # BLD (01) and global KD (04)
    held = distill_documents("heldout")     # the evaluation suite: LM loss, KL and top-1 agreement vs the parent

Documents: each `pydoc_data.topics` entry (the language reference, ~465k characters) and, for a fixed list of
pure-Python standard library modules, the module's docstrings (module, classes, functions) read from source
with `ast` (nothing is imported, so the set does not depend on the platform). The split is by document: the
15 % whose names hash lowest are held out, so it is the same on every machine and never mixes a document.
"""

import ast
import functools
import hashlib
import os
import sysconfig

HELDOUT_FRACTION = 0.15
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
    return docs


def distill_documents(split: str = "train") -> list[str]:
    """Documents of the training part ("train") or the disjoint held-out part ("heldout"), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"distill_documents: split must be 'train' or 'heldout', got {split!r}")
    docs = all_documents()
    by_hash = sorted(docs, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    held = set(by_hash[:round(HELDOUT_FRACTION * len(docs))])
    return [docs[k] for k in docs if (k in held) == (split == "heldout")]
