"""`ftkit serve`, `ftkit export` and `ftkit push`: registered on the main app by ftkit.cli (imports stay light here)."""

from __future__ import annotations

from typing import Optional

import typer


def serve(model: str = typer.Argument(..., help="Run dir, merged dir, model alias or hub id"),
          host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)"),
          port: int = typer.Option(8000, "--port", help="TCP port"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FTKIT_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on every request "
                                                     "(or set FTKIT_API_KEY)"),
          name: Optional[str] = typer.Option(None, "--name", help="Model id clients ask for (default: dir name)"),
          base: Optional[str] = typer.Option(None, "--base", help="Base model for an adapter dir"),
          quiet: bool = typer.Option(False, "--quiet", help="No log line per request (method, path, status, "
                                                            "tokens, ms) on stderr"),
          max_tokens: int = typer.Option(2048, "--max-tokens", min=1, help="Most new tokens one request may ask for (400 above)"),
          queue: int = typer.Option(16, "--queue", min=0, help="Requests waiting beyond the batch generating; "
                                                               "more get 503 + Retry-After"),
          max_batch: int = typer.Option(8, "--max-batch", min=1, help="Waiting requests generated together "
                                                                      "in one batch (1: one at a time)"),
          batch_wait_ms: float = typer.Option(10, "--batch-wait-ms", min=0, help="When the model is idle, how long "
                                              "a request waits for others to join its batch"),
          request_timeout: float = typer.Option(300, "--request-timeout", min=1,
                                                help="Seconds a request may wait and generate; then it ends"),
          threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for generation "
                                                "(default: all cores but one, kept for answering requests)"),
          max_body_kb: int = typer.Option(1024, "--max-body-kb", min=1, help="Largest request body (413 above)"),
          read_timeout: float = typer.Option(10, "--read-timeout", min=0.1,
                                             help="Seconds for a request body to arrive (408 after)")):
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    from ftkit.serve import Limits
    from ftkit.serve import serve as run_server
    from ftkit.ui import log

    limits = Limits(max_body_bytes=max_body_kb * 1024, read_timeout_s=read_timeout, max_tokens=max_tokens, queue=queue,
                    request_timeout_s=request_timeout, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    run_server(model, host=host, port=port, api_key=api_key, name=name, base=base, log=log, quiet=quiet,
               limits=limits, threads=threads)


def export(model: str = typer.Argument(..., help="Run dir (LoRA is merged first), merged dir, alias or .gguf"),
           fmt: str = typer.Option(..., "--format", "-f", help="gguf | safetensors"),
           quantize: str = typer.Option("f16", "--quantize", "-q",
                                        help="gguf: f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m · "
                                             "safetensors: f32 | f16 | bnb-4bit"),
           output: str = typer.Option(..., "--output", "-o", help="Output .gguf file, or dir for safetensors"),
           imatrix_text: Optional[str] = typer.Option(None, "--imatrix-text",
                                                      help="Calibration text file for an importance matrix (k-quants)"),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output")):
    """Export for deployment (GGUF + Ollama Modelfile, checked by llama.cpp; or a 4-bit checkpoint)."""
    from ftkit.export import export as run_export
    from ftkit.ui import log

    run_export(model, fmt, quantize, output, overwrite=overwrite, log=log, imatrix_text=imatrix_text)


def push(target: str = typer.Argument(..., help="Run dir (adapter), merged/model dir, or exported .gguf"),
         repo: str = typer.Option(..., "--repo", help="Hub repository, org/name"),
         private: bool = typer.Option(False, "--private", help="Create the repository private"),
         token: Optional[str] = typer.Option(None, "--token", envvar="HF_TOKEN",
                                             help="Hub token (default: HF_TOKEN or `hf auth login`)")):
    """Upload an adapter, merged model or GGUF to the Hugging Face Hub with a model card."""
    from ftkit.push import push as run_push
    from ftkit.ui import log

    run_push(target, repo, private=private, token=token, log=log)


def register(app: typer.Typer, handle_errors) -> None:
    app.command()(handle_errors(serve))
    app.command()(handle_errors(export))
    app.command()(handle_errors(push))
