"""A run's report: loss/learning-rate curves (PNG) and one self-contained HTML page.

Everything comes from files in the run dir (metrics.jsonl, metrics.json, recipe.yaml,
samples.jsonl), so `ftkit report RUN_DIR` can rebuild it at any time.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ftkit.errors import UserError



def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def curves(history: list[dict]) -> dict:
    """Series for the plots: step -> train loss, eval loss, learning rate."""
    train = [h for h in history if h.get("kind", "train") == "train" and "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    return {
        "loss": {"step": [h["step"] for h in train], "value": [h["loss"] for h in train]},
        "eval_loss": {"step": [h["step"] for h in evals], "value": [h["eval_loss"] for h in evals]},
        "learning_rate": {"step": [h["step"] for h in train if "learning_rate" in h],
                          "value": [h["learning_rate"] for h in train if "learning_rate" in h]},
    }


def plot_png(data: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    ax_loss.plot(data["loss"]["step"], data["loss"]["value"], label="train loss", marker="." if len(data["loss"]["step"]) < 40 else None)
    if data["eval_loss"]["step"]:
        ax_loss.plot(data["eval_loss"]["step"], data["eval_loss"]["value"], label="eval loss", marker="o")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(data["learning_rate"]["step"], data["learning_rate"]["value"], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows.items() if not isinstance(v, dict))
    return f"<table>{cells}</table>"


def render_html(title: str, png: bytes, data: dict, metrics: dict, recipe_text: str, samples: list[dict]) -> str:
    img = base64.b64encode(png).decode("ascii")
    sample_html = "".join(
        "<div class='sample'><b>prompt</b><pre>{}</pre><b>generated</b><pre>{}</pre>{}</div>".format(
            html.escape(s.get("prompt", "")), html.escape(s.get("generated", "")),
            f"<b>reference</b><pre>{html.escape(s['reference'])}</pre>" if s.get("reference") else "")
        for s in samples
    ) or "<p>none recorded</p>"
    # The curve data travels inside the page too, so tools (and tests) can read it without the PNG.
    curve_json = json.dumps(data).replace("</", "<\\/")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ddd;padding:3px 8px;text-align:left}}
pre{{background:#f6f6f6;padding:8px;white-space:pre-wrap}}.sample{{margin-bottom:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Curves</h2><img alt="loss and learning rate" src="data:image/png;base64,{img}" style="max-width:100%">
<h2>Metrics</h2>{_table(metrics)}
<h2>Sample generations</h2>{sample_html}
<h2>Recipe</h2><pre>{html.escape(recipe_text)}</pre>
<script type="application/json" id="curves">{curve_json}</script>
</body></html>
"""


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.png and report.html into run_dir from its metrics; returns their paths."""
    run = Path(run_dir)
    history = read_jsonl(run / "metrics.jsonl")
    if not run.is_dir() or not history:
        raise UserError(f"{run}: not a run dir with metrics.jsonl (was it written by `ftkit sft`/`ftkit pt`?)")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8")) if (run / "metrics.json").is_file() else {}
    recipe_text = (run / "recipe.yaml").read_text(encoding="utf-8") if (run / "recipe.yaml").is_file() else ""
    data = curves(history)
    title = f"ftkit run: {run.name.removesuffix('.partial')}"
    png = plot_png(data, title)
    png_path, html_path = run / "report.png", run / "report.html"
    try:
        png_path.write_bytes(png)
        html_path.write_text(render_html(title, png, data, metrics, recipe_text, read_jsonl(run / "samples.jsonl")),
                             encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{run}: cannot write the report: {exc.strerror}") from None
    return png_path, html_path


def write_samples(recipe, work: Path, model, tok, log=print) -> None:
    """Greedy replies to a few held-out (else training) prompts, for the report (output.samples of
    them, output.sample_tokens new tokens each at most: the time this takes is bounded by both)."""
    import time

    from ftkit.data import read_canonical
    from ftkit.inference import generate

    n = recipe.output.samples
    if n == 0:
        return
    field = "eval" if recipe.data.eval else "train"
    _, rows = read_canonical(recipe, field)
    chats = [r["messages"] for r in rows if "messages" in r and r["messages"][-1]["role"] == "assistant"][:n]
    if not chats:
        return
    prompts = [c[:-1] for c in chats]
    log(f"sampling {len(prompts)} replies (≤ {recipe.output.sample_tokens} tokens each) for samples.jsonl "
        "(output.samples: 0 turns this off) ...")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        replies = generate(model, tok, prompts, max_new_tokens=recipe.output.sample_tokens)
    finally:
        model.train(was_training)
    log(f"samples written in {time.perf_counter() - t0:.1f}s")
    with (work / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for chat, reply in zip(chats, replies):
            prompt = next((m["content"] for m in reversed(chat[:-1]) if m["role"] == "user"), "")
            fh.write(json.dumps({"prompt": prompt, "reference": chat[-1]["content"], "generated": reply}) + "\n")
