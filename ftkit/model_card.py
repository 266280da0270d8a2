"""The model card (README.md) of a run dir, a merged/model dir or an exported GGUF, written from the
files ftkit left behind (recipe.yaml, metrics.json, the merge and export reports): what was trained,
on what, with which numbers, and how to load it. The training lifecycle writes one into every run dir;
`ftkit push` writes one for the upload."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ftkit import safe_yaml
from ftkit.errors import UserError

REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Files a user loads; the rest of a run dir (checkpoints, logs, plots, PEFT's placeholder card) stays home.
_RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "recipe.yaml", "metrics.json", "ftkit_merge.json", "ftkit_export.json")


def _read(path: Path) -> dict:
    """A file ftkit wrote; a run dir may come from elsewhere, so the YAML goes through the bounded loader."""
    if not path.is_file():
        return {}
    if path.suffix in (".yaml", ".yml"):
        data = safe_yaml.load(safe_yaml.read_text(path), str(path))
    else:
        try:
            data = json.loads(safe_yaml.read_text(path))
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); not written by ftkit, or damaged") from None
    return data if isinstance(data, dict) else {}


def _hub_base(name: str | None) -> str | None:
    """The base model as a Hub id (aliases resolved); None for local paths, which mean nothing on the Hub."""
    if not name:
        return None
    from ftkit.models import ALIASES

    if name in ALIASES:
        return ALIASES[name].hub_id
    return name if REPO_NAME.match(name) and not Path(name).expanduser().exists() else None


def collect(target: Path) -> tuple[str, list[Path], dict]:
    """(kind, files to upload, facts for the card) for a GGUF, an adapter dir or a model dir."""
    if target.is_file() and target.suffix == ".gguf":
        files = [target] + [p for p in (target.with_suffix(".Modelfile"), target.with_suffix(".export.json"))
                            if p.is_file()]
        return "gguf", files, {"export": _read(target.with_suffix(".export.json"))}
    if not target.is_dir():
        raise UserError(f"{target}: not a run dir, model dir or .gguf file")
    kind = "adapter" if (target / "adapter_config.json").is_file() else "model" if (target / "config.json").is_file() else None
    if kind is None:
        raise UserError(f"{target}: neither a run dir (adapter_config.json) nor a model dir (config.json)")
    files = [target / f for f in _RUN_FILES if (target / f).is_file()]
    files += sorted(p for p in target.glob("model*.safetensors*") if p.is_file()) if kind == "model" else []
    facts = {"recipe": _read(target / "recipe.yaml"), "metrics": _read(target / "metrics.json"),
             "merge": _read(target / "ftkit_merge.json"), "export": _read(target / "ftkit_export.json")}
    return kind, files, facts


def _metrics_lines(facts: dict) -> list[str]:
    m, lines = facts.get("metrics") or {}, []
    for key in ("train_loss", "first_loss", "last_loss", "eval_loss", "steps", "tokens", "epochs"):
        if m.get(key) is not None:
            v = m[key]
            lines.append(f"| {key} | {v:.4g} |" if isinstance(v, float) else f"| {key} | {v} |")
    for key, val in sorted((m.get("eval") or {}).items()) if isinstance(m.get("eval"), dict) else []:
        if isinstance(val, (int, float)):
            lines.append(f"| eval {key} | {val:.4g} |")
    exp = facts.get("export") or {}
    if "next_token_agreement" in exp:
        lines.append(f"| llama.cpp next-token agreement vs source ({exp.get('quantize')}) | "
                     f"{exp['next_token_agreement']:.1%} |")
    if "max_abs_logit_diff" in (facts.get("merge") or {}):
        lines.append(f"| merge: max logit diff vs base+adapter | {facts['merge']['max_abs_logit_diff']:.2e} |")
    return (["| metric | value |", "|---|---|"] + lines) if lines else ["No metrics were recorded with this upload."]


def _usage(kind: str, repo: str, files: list[Path], base: str | None) -> str:
    if kind == "gguf":
        gguf = next(f.name for f in files if f.suffix == ".gguf")
        return (f"```bash\nhf download {repo} --local-dir model\nllama-cli -m model/{gguf} -cnv\n"
                f"ollama create my-model -f model/{Path(gguf).stem}.Modelfile   # Ollama\n```")
    if kind == "adapter":
        return ("```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained({repo!r})  # loads {base or 'the base model'}"
                f" + this adapter\ntokenizer = AutoTokenizer.from_pretrained({repo!r})\n```")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({repo!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n```")


def model_card(kind: str, repo: str, files: list[Path], facts: dict, intro: str | None = None) -> str:
    """The README.md of an upload (repo: org/name) or of a run dir (repo: its path, intro: how it was made)."""
    recipe = facts.get("recipe") or {}
    model, method, data = (safe_yaml.section(recipe, k, "recipe.yaml") for k in ("model", "method", "data"))
    base_name = model.get("name") or (facts.get("metrics") or {}).get("base_model")
    base = _hub_base(base_name)
    front = {"library_name": {"adapter": "peft", "model": "transformers", "gguf": "gguf"}[kind],
             "pipeline_tag": "text-generation", "tags": ["ftkit", kind] + ([method["type"]] if method.get("type") else [])}
    if base:
        front["base_model"] = base
    mtype = method.get("type")
    how = (f"{mtype} (r={method.get('r')}, alpha={method.get('alpha')})" if mtype in ("lora", "qlora", "dora", "rslora")
           else mtype or "not recorded")
    sources = data.get("train")
    sources = ", ".join(sources) if isinstance(sources, list) else sources
    exp = facts.get("export") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo.split('/')[-1]}", "",
             intro or f"Fine-tuned with ftkit and uploaded by `ftkit push` as a {kind}.", "",
             "## Training", "", f"- **Base model:** {base or base_name or 'not recorded'}",
             f"- **Stage:** {recipe.get('stage', 'not recorded')}", f"- **Method:** {how}",
             f"- **Data:** {sources or 'not recorded'} (format: {data.get('format', 'not recorded')})"]
    if data.get("system"):
        lines.append(f"- **System prompt:** {data['system']}")
    if kind == "gguf" and exp:
        lines.append(f"- **GGUF:** {exp.get('quantize')}, checked by llama.cpp against the source model")
    lines += ["", "## Metrics", "", *_metrics_lines(facts), "", "## How to load", "", _usage(kind, repo, files, base),
              "", "## Files", "", *[f"- `{f.name}`" for f in files], ""]
    return "\n".join(lines)
