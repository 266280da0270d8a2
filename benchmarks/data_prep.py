"""ftkit data prep tokens/s vs the raw batched fast tokenizer on the same text, and the cached rerun.

    python benchmarks/data_prep.py [--rows 4000] [--repeat 5] [--model smollm2-135m-instruct]

"raw" tokenizes the already-rendered chat text with `tokenizer(texts)` (batched, fast tokenizer):
it is the floor any pipeline pays. ftkit also reads the file, renders the chat template to place
the response-only labels, builds the labels, and (first run) writes the cache.

Timings on a shared VM swing by a third from run to run, so raw and ftkit are timed alternately
`--repeat` times and both the best and the median ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


TRIM = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim "
        "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--template", choices=["model", "trim"], default="model",
                    help="model: the tokenizer's template; trim: a Llama-3-style one that trims contents, "
                    "which takes the reference (render every prefix) path")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftkit-bench-"))

    from ftkit.data import cache as dcache
    from ftkit.data import prepare
    from ftkit.data.templates import resolve_template
    from ftkit.models import load_tokenizer, resolve_model
    from ftkit.recipe import load_recipe

    rows = [{"messages": [
        {"role": "user", "content": f"Question {i}: " + "please explain how the thing works, in words. " * 6},
        {"role": "assistant", "content": "Sure. " + "Here is one sentence of a longer answer. " * 20},
        {"role": "user", "content": "Could you shorten that?"},
        {"role": "assistant", "content": "In short: " + "it works. " * 25}]} for i in range(args.rows)]
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tmp / "r.yaml"
    template = {"model": None, "trim": TRIM}[args.template]
    recipe.write_text(yaml.safe_dump({"model": {"name": args.model},
                                      "data": {"train": str(data), "max_length": 4096, "template": template}}),
                      encoding="utf-8")
    r = load_recipe(recipe)
    tok = load_tokenizer(resolve_model(r.model.name))
    dcache.cache_root = lambda: tmp / "data-cache"  # a throwaway cache, not the user's
    template = resolve_template(tok, template)
    texts = [tok.apply_chat_template(x["messages"], chat_template=template, tokenize=False) for x in rows]

    quiet = lambda *_: None  # noqa: E731
    raw_t, ftkit_t = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        n_raw = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
        raw_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first = prepare(r, tok, log=quiet, cache=False)
        ftkit_t.append(time.perf_counter() - t0)
        n = first.train_stats.tokens
        assert n == n_raw, (n, n_raw)  # the very same tokens
    raw_s, ftkit_s = min(raw_t), min(ftkit_t)
    ratios = sorted(r_ / f_ for r_, f_ in zip(raw_t, ftkit_t))

    t0 = time.perf_counter()
    prepare(r, tok, log=quiet, cache=True)
    miss_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hit = prepare(r, tok, log=quiet, cache=True)
    hit_s = time.perf_counter() - t0
    assert hit.cache == "hit"

    print(f"rows: {args.rows} · tokens: {n:,} · cpus: {os.cpu_count()} · template: {args.template}")
    print(f"raw tokenizer(texts):        {n / raw_s:>12,.0f} tok/s  (best of {args.repeat}: {raw_s:.2f} s)")
    print(f"ftkit prepare (no cache):    {n / ftkit_s:>12,.0f} tok/s  (best of {args.repeat}: {ftkit_s:.2f} s)  "
          f"= {raw_s / ftkit_s:.2f}x raw (best/best); median of paired ratios {ratios[len(ratios) // 2]:.2f}x")
    print(f"ftkit prepare (cache write): {miss_s:.2f} s")
    print(f"ftkit prepare (cache hit):   {hit_s:.2f} s  ({n / hit_s:,.0f} tok/s)")


if __name__ == "__main__":
    main()
