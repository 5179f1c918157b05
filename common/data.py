"""Chat template with the reasoning toggle, SFT tokenization with a response-only loss mask, sequence packing,
and fixed-length text chunks for BLD / KD from the distillation mix or a local data set (load_text_documents).

    msgs = build_messages(record, reasoning=True)           # system "detailed thinking on" + the user turns
    prompt = render_prompt(tokenizer, msgs)                 # the string a generator continues
    ex = tokenize_sft_example(tokenizer, record, max_len)   # labels -100 except the response and its <|im_end|>
    packs = pack_examples([ex, ...], seq_len, pad_id)       # position ids restart per example
    batch = collate(packs)                                  # tensors + block-diagonal causal attention_mask

The toggle is the system prompt, as in Llama-Nemotron: "detailed thinking on" / "detailed thinking off".
"""

import json
import os

import torch

from common.text_corpus import distill_documents

SYSTEM_ON = "detailed thinking on"
SYSTEM_OFF = "detailed thinking off"
END_OF_TURN = "<|im_end|>"
IGNORE = -100


def build_messages(record_or_prompt, reasoning: bool) -> list[dict]:
    """[system toggle, user turn(s)] from a prompt string or a record (whose `input` may be a string)."""
    inp = record_or_prompt["input"] if isinstance(record_or_prompt, dict) else record_or_prompt
    turns = [{"role": "user", "content": inp}] if isinstance(inp, str) else [dict(m) for m in inp]
    return [{"role": "system", "content": SYSTEM_ON if reasoning else SYSTEM_OFF}] + turns


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-templated prompt ending with the assistant header, as text (tokenize with add_special_tokens=False)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return tid if tid is not None and tid != tokenizer.unk_token_id else tokenizer.eos_token_id


def tokenize_sft_example(tokenizer, record: dict, max_len: int) -> dict:
    """input_ids of the whole conversation; labels = input_ids on the response and its end-of-turn token, -100
    elsewhere (system, user, assistant header, anything the template adds after <|im_end|>). Truncated to max_len.

    The prompt is tokenized alone and as part of the conversation; the two must agree on the prefix, otherwise
    a token merges across the boundary and the mask would be off by one: that raises instead.
    """
    reasoning = record.get("reasoning", "on" if record.get("system_prompt") == SYSTEM_ON else "off") == "on"
    msgs = build_messages(record, reasoning)
    prompt = render_prompt(tokenizer, msgs)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": record["output"]}], tokenize=False)
    prompt_ids, ids = _ids(tokenizer, prompt), _ids(tokenizer, full)
    if not full.startswith(prompt) or ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"record {record.get('id')}: the tokenized prompt is not a prefix of the tokenized "
                         f"conversation; the chat template must end the prompt at the assistant header")
    eot = end_of_turn_id(tokenizer)
    try:
        end = ids.index(eot, len(prompt_ids)) + 1
    except ValueError:
        end = len(ids)
    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):end] + [IGNORE] * (len(ids) - end)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def first_answer_token_weights(labels: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Loss weights for an SFT batch: `weight` on each answer's first token (a labelled token after an unlabelled
    one; in a packed row every example's answer follows its own prompt), 1 elsewhere; None when weight is 1. That
    token is where "detailed thinking on/off" decides whether a think block opens; in a plain mean it is one of
    ~100-200 answer tokens of its example."""
    if weight == 1.0:
        return None
    first = (labels != IGNORE) & (torch.roll(labels, 1, dims=-1) == IGNORE)
    return 1.0 + (weight - 1.0) * first.float()


def pack_examples(examples: list[dict], seq_len: int, pad_id: int = 0) -> list[dict]:
    """Greedy packing in order: examples go into the current row until the next one does not fit.

    Each row: input_ids, labels, position_ids (restarting at 0 per example), seq_ids (0, 1, ... per example in
    the row; -1 for padding, whose labels are -100). Examples longer than seq_len are truncated.
    """
    rows, cur = [], []

    def flush():
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_ids": []}
        for k, ex in enumerate(cur):
            n = len(ex["input_ids"])
            row["input_ids"] += ex["input_ids"]
            row["labels"] += ex["labels"]
            row["position_ids"] += list(range(n))
            row["seq_ids"] += [k] * n
        pad = seq_len - len(row["input_ids"])
        for key, v in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0), ("seq_ids", -1)):
            row[key] += [v] * pad
        rows.append(row)

    used = 0
    for ex in examples:
        ex = {"input_ids": list(ex["input_ids"][:seq_len]), "labels": list(ex["labels"][:seq_len])}
        if not ex["input_ids"]:
            continue
        if used + len(ex["input_ids"]) > seq_len:
            flush()
            cur, used = [], 0
        cur.append(ex)
        used += len(ex["input_ids"])
    if cur:
        flush()
    return rows


def packed_attention_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B,1,T,T), True = may attend: causal within the same example only. A padding position (-1) sees only
    itself, so no row is empty (an all-masked row gives NaN in softmax)."""
    seq_ids = torch.as_tensor(seq_ids)
    if seq_ids.dim() == 1:
        seq_ids = seq_ids[None]
    T = seq_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)
    eye = torch.eye(T, dtype=torch.bool, device=seq_ids.device)
    return ((same & causal) | eye)[:, None]


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Stack rows into tensors (right-padding rows of different lengths) and add the packed attention_mask.

    Unpacked examples (only input_ids/labels) get position_ids 0..n-1 and seq_ids 0, so one path serves both.
    """
    T = max(len(b["input_ids"]) for b in batch)
    out = {k: [] for k in ("input_ids", "labels", "position_ids", "seq_ids")}
    for b in batch:
        n, pad = len(b["input_ids"]), T - len(b["input_ids"])
        out["input_ids"].append(list(b["input_ids"]) + [pad_id] * pad)
        out["labels"].append(list(b.get("labels", b["input_ids"])) + [IGNORE] * pad)
        out["position_ids"].append(list(b.get("position_ids", range(n))) + [0] * pad)
        out["seq_ids"].append(list(b.get("seq_ids", [0] * n)) + [-1] * pad)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    out["attention_mask"] = packed_attention_mask(out["seq_ids"])
    return out


def sft_records(path: str, split: str = "train") -> list[dict]:
    """The chat records of a data_gen.build directory (<path>/<split>.jsonl); ValueError naming the fix if absent."""
    f = os.path.join(path, f"{split}.jsonl")
    if not os.path.isfile(f):
        raise ValueError(f"--data {path} has no {split}.jsonl; give a directory written by data_gen.build")
    return [r for _, r in json_lines(f)]


def record_problem(record: dict) -> dict:
    """The problem a record asks, in the form the evaluations read (common.evaluate.generation_eval): question
    (the user turns), answer, difficulty (when set), constraints as a list (when set), id, category."""
    inp = record["input"]
    question = inp if isinstance(inp, str) else "\n\n".join(m["content"] for m in inp if m.get("role") == "user")
    p = {"id": record.get("id"), "category": record.get("category"), "question": question,
         "answer": record.get("answer")}
    if record.get("difficulty") is not None:
        p["difficulty"] = record["difficulty"]
    if record.get("constraints"):
        c = record["constraints"]
        p["constraints"] = json.loads(c) if isinstance(c, str) else c
    return p


def eval_sets(path: str) -> dict[str, list[dict]]:
    """The evaluation sets of a data_gen.build directory (<path>/eval.jsonl) as problems, one per id (the on and
    off records of a problem are one problem), in the file's order: {"math": [...], "chat": [...]}. build writes the
    math problems round robin by level, so the first n of either list is an evaluation set of size n."""
    out, seen = {"math": [], "chat": []}, set()
    for r in sft_records(path, "eval"):
        if r.get("category") in out and r.get("id") not in seen:
            seen.add(r.get("id"))
            out[r["category"]].append(record_problem(r))
    return out


def chat_documents(tokenizer, records: list[dict]) -> list[str]:
    """Each record's whole conversation as the chat template renders it (toggle system prompt, user turns, the
    assistant's output): documents for text_chunks, when a stage trains on all tokens of the SFT data."""
    docs = []
    for r in records:
        reasoning = r.get("reasoning", "on" if r.get("system_prompt") == SYSTEM_ON else "off") == "on"
        msgs = build_messages(r, reasoning) + [{"role": "assistant", "content": r["output"]}]
        docs.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return docs


def text_chunks(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """(N, seq_len) token ids: documents tokenized, joined with EOS between them, cut into full chunks."""
    eos = tokenizer.eos_token_id
    ids = []
    for doc in documents:
        ids += _ids(tokenizer, doc) + [eos]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"text_chunks: {len(ids)} tokens make no chunk of {seq_len}; "
                         f"give more text or a shorter seq_len")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def spread_chunks(tokenizer, documents: list[str], seq_len: int, n: int) -> torch.Tensor:
    """(n, seq_len) token ids spread over as many documents as possible: the first chunk of every document (in
    order), then the second of each, and so on. A small scoring set drawn this way samples n documents, not one."""
    per_doc = []
    for doc in documents:
        ids = _ids(tokenizer, doc)
        per_doc.append([ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)])
    rows = [c[k] for k in range(max(map(len, per_doc), default=0)) for c in per_doc if k < len(c)][:n]
    if len(rows) < n:
        raise ValueError(f"spread_chunks: the documents make {len(rows)} chunks of {seq_len} tokens, need {n}; "
                         f"give more text or a shorter seq_len")
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------
# Local text data sets (BLD, KD): every failure is one ValueError naming the file (and line) and the fix

TEXT_FORMATS = {"jsonl": "json", "json": "json", "txt": "text", "parquet": "parquet", "csv": "csv"}


def json_lines(path: str, parse: bool = True, fix: str = "re-encode the file as UTF-8"):
    """(line number, parsed object) for every non-blank line of a JSON-lines (or, parse=False, text) file; the
    first line that is not UTF-8 or not JSON raises ValueError naming file:line and the fix."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                                 f"{fix}") from None
            if not line.strip() or not parse:
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); fix or delete the "
                                 f"line") from None


def bld_documents(path: str | None, split: str) -> list[str]:
    """01's training ("train") or scoring ("score") documents: the distillation mix's own disjoint splits
    (common.text_corpus; the evaluation suite's text is a third), or a local text/JSONL file split 9:1 by document
    (score: every 10th). 02 reads the scoring text the same way (its --rescore-rounds)."""
    if path is None:
        return distill_documents(split)
    return [d for i, d in enumerate(load_text_documents(path)) if (i % 10 == 0) == (split == "score")]


def load_text_documents(path: str, text_column: str = "text") -> list[str]:
    """The non-empty texts of a local data set: a .jsonl/.json/.txt/.parquet/.csv file or a directory of them
    (`datasets` reads them). Bytes that are not UTF-8, a malformed JSON line, a missing column or no text at all
    raise ValueError naming the file (and line)."""
    if not os.path.exists(path):
        raise ValueError(f"--data {path} does not exist; give a local .txt/.jsonl/.json/.parquet/.csv file or a "
                         f"directory of them")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if not f.startswith(".") and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise ValueError(f"--data {path} is an empty directory; put .txt/.jsonl/.json/.parquet/.csv files in it")
    exts = sorted({f.rsplit(".", 1)[-1] if "." in os.path.basename(f) else "" for f in files})
    kinds = {TEXT_FORMATS.get(e) for e in exts}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"--data {path}: cannot tell one format from {['.' + e for e in exts]}; use files of one of "
                         f"{', '.join(TEXT_FORMATS)}")
    kind = kinds.pop()
    if kind != "parquet":
        for f in files:
            for _ in json_lines(f, parse=f.endswith(".jsonl")):
                pass
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"--data {path} is empty; give a file with text")
    import datasets
    try:
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # noqa: BLE001 (datasets wraps parser errors in its own types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"--data {path} does not read as {kind} ({first}); fix the file or convert it to "
                         f".jsonl") from None
    if text_column not in ds.column_names:
        raise ValueError(f"--data {path} has no column {text_column!r} (columns {ds.column_names}); "
                         f"name the text column (--text-column where the stage has it)")
    docs = [t for t in ds[text_column] if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError(f"--data {path} has no text in column {text_column!r} (only blank rows); give a file "
                         f"with text")
    return docs
