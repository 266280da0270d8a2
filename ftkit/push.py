"""ftkit push: an adapter run dir, a merged/model dir or an exported GGUF -> a Hub repository, with a model card.

The card is written from the files ftkit left behind (recipe.yaml, metrics.json, the merge and
export reports), so it states what was trained, on what, with which numbers, and how to load
the upload. Transfers go through huggingface_hub (create_repo + one upload_folder commit); its
endpoint follows HF_ENDPOINT. The token is passed to huggingface_hub and never printed or written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ftkit.errors import UserError
from ftkit.model_card import REPO_NAME, collect, model_card

def _hub_error(exc: Exception, endpoint: str) -> UserError | None:
    """Known hub failures as exit-2 messages (never echoing the token); None for anything else."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return UserError("ftkit push needs the network, but HF_HUB_OFFLINE=1 is set; unset it (or run where the "
                         "Hub is reachable) and push again")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return UserError(f"the Hub at {endpoint} refused the token ({code}); check it has write access "
                             "(HF_TOKEN, --token or `hf auth login`)")
        return UserError(f"the Hub at {endpoint} answered {code}: {str(exc).splitlines()[0]}")
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)) or \
            type(exc).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
        return UserError(f"cannot reach the Hub at {endpoint} (offline?); check the network or HF_ENDPOINT")
    return None


def push(target: str, repo: str, private: bool = False, token: str | None = None, log=print) -> str:
    if not REPO_NAME.match(repo):
        raise UserError(f"--repo: {repo!r} is not a Hub repository id; write it as org/name")
    src = Path(target).expanduser()
    kind, files, facts = collect(src)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import get_token

    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        raise UserError("ftkit push needs the network, but HF_HUB_OFFLINE=1 is set; unset it and push again")
    token = token or get_token()
    if not token:
        raise UserError("no Hub token: set HF_TOKEN, pass --token, or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="ftkit-push-") as tmp:
        stage = Path(tmp)
        for f in files:  # hard links where possible: a GGUF is not copied just to be uploaded
            try:
                (stage / f.name).hardlink_to(f)
            except OSError:
                shutil.copy2(f, stage / f.name)
        (stage / "README.md").write_text(model_card(kind, repo, files, facts), encoding="utf-8")
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            log(f"uploading {len(files) + 1} files ({kind}) to {url} ...")
            api.upload_folder(repo_id=repo, folder_path=str(stage), repo_type="model",
                              commit_message=f"ftkit push: {kind} from {src.name}")
        except Exception as exc:
            err = _hub_error(exc, endpoint)
            if err is None:
                raise
            raise err from None
    log(f"[green]pushed:[/] {endpoint.rstrip('/')}/{repo}")
    return f"{endpoint.rstrip('/')}/{repo}"
